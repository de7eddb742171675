"""Start layerfs-snapshotter as containerd does (its console script on a unix socket) and talk
to it with a gRPC client made from the same message definitions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2

from layerfs_snapshotter.api import snapshots_pb2 as pb

BIN = Path(sys.executable).parent / "layerfs-snapshotter"
SERVICE = "/containerd.services.snapshots.v1.Snapshots/"
_RESPONSES: dict[str, Any] = {
    "Prepare": pb.PrepareSnapshotResponse,
    "View": pb.ViewSnapshotResponse,
    "Mounts": pb.MountsResponse,
    "Commit": empty_pb2.Empty,
    "Remove": empty_pb2.Empty,
    "Stat": pb.StatSnapshotResponse,
    "Update": pb.UpdateSnapshotResponse,
    "Usage": pb.UsageResponse,
    "Cleanup": empty_pb2.Empty,
}


class Client:
    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel

    def call(self, method: str, request: Any) -> Any:
        fn = self.channel.unary_unary(
            SERVICE + method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=_RESPONSES[method].FromString,
        )
        return fn(request, timeout=60)

    def list(self, *filters: str) -> list[Any]:
        fn = self.channel.unary_stream(
            SERVICE + "List",
            request_serializer=pb.ListSnapshotsRequest.SerializeToString,
            response_deserializer=pb.ListSnapshotsResponse.FromString,
        )
        return [i for resp in fn(pb.ListSnapshotsRequest(filters=list(filters))) for i in resp.info]


@dataclass
class Service:
    root: Path
    sock: Path
    proc: subprocess.Popen[bytes]
    client: Client

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


def start(root: Path, sock: Path, *extra: str) -> Service:
    proc = subprocess.Popen(
        [str(BIN), "--address", str(sock), "--root", str(root), *extra],
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"layerfs-snapshotter did not start (exit {proc.poll()})")
        time.sleep(0.05)
    channel = grpc.insecure_channel(f"unix:{sock}")
    grpc.channel_ready_future(channel).result(timeout=30)
    return Service(root, sock, proc, Client(channel))


@contextmanager
def running(*extra: str) -> Iterator[Service]:
    with tempfile.TemporaryDirectory(prefix="layerfs-snap-") as tmp:
        svc = start(Path(tmp, "root"), Path(tmp, "snap.sock"), *extra)
        try:
            yield svc
        finally:
            svc.client.channel.close()
            if svc.proc.poll() is None:
                svc.stop()


def mounted(m: Any, target: str) -> None:
    """Mount one containerd Mount message on TARGET as containerd's mount package does."""
    if m.type.startswith("fuse3."):
        args = ["mount.fuse3", m.source, target, "-t", m.type.removeprefix("fuse3.")]
        for o in m.options:
            args += ["-o", o]
        env = dict(os.environ, PATH=f"{BIN.parent}:{os.environ['PATH']}")
        subprocess.run(args, check=True, env=env)
    elif m.type == "bind":
        opts = ",".join(o for o in m.options if o not in ("rbind", "bind"))
        subprocess.run(["mount", "--rbind", m.source, target], check=True)
        if "ro" in m.options:
            subprocess.run(["mount", "-o", f"remount,bind,{opts}", target], check=True)
    else:
        subprocess.run(
            ["mount", "-t", m.type, m.source, target, "-o", ",".join(m.options)], check=True
        )


def unmount(target: str) -> None:
    if os.path.ismount(target):
        with open("/proc/self/mountinfo") as f:
            fuse = any(
                line.split()[4] == target and " - fuse" in line for line in f.read().splitlines()
            )
        cmd = ["fusermount3", "-u", "-z", target] if fuse else ["umount", "-l", target]
        subprocess.run(cmd, check=False)
