"""``layerfs-snapshotter --address SOCK --root DIR``: serve in the foreground until SIGTERM or
SIGINT; log to stderr."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from layerfs_snapshotter.service import make_server
from layerfs_snapshotter.snapshotter import Snapshotter

log = logging.getLogger("layerfs-snapshotter")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="layerfs-snapshotter",
        description="containerd snapshotter (proxy plugin) whose mounts are layerfs",
    )
    p.add_argument("--address", required=True, help="unix socket to listen on")
    p.add_argument("--root", required=True, help="directory for the metadata and the layers")
    p.add_argument(
        "--kernel-extract",
        choices=("auto", "on", "off"),
        default="auto",
        help="kernel overlay mounts for image unpack (auto: when root in the initial user "
        "namespace)",
    )
    p.add_argument(
        "--fuse-program",
        default="mount.layerfs",
        help="the FUSE program containerd runs for layered mounts (default mount.layerfs; "
        "fuse-overlayfs takes the same options: for comparisons)",
    )
    p.add_argument("--debug", action="store_true", help="log every error answered")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s layerfs-snapshotter %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    kernel_extract = {"auto": None, "on": True, "off": False}[args.kernel_extract]
    sn = Snapshotter(
        args.root, kernel_extract=kernel_extract, fuse_type=f"fuse3.{args.fuse_program}"
    )
    sn.cleanup()  # repair what a crash left
    address = os.path.abspath(args.address)
    os.makedirs(os.path.dirname(address), exist_ok=True)
    if os.path.exists(address):  # a stale socket of a previous run
        os.unlink(address)
    server = make_server(sn, address)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    log.info(
        "serving %s, root %s, kernel extract %s",
        address,
        sn.root,
        "on" if sn.kernel_extract else "off",
    )
    while not stop.wait(1.0):
        pass
    server.stop(grace=2).wait()
    sn.close()
    if os.path.exists(address):
        os.unlink(address)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
