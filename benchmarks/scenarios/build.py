"""An image build as users run one: ``podman build --no-cache --network host`` of

    FROM <Debian 12 minbase>
    RUN apt-get update && apt-get install -y python3

on a private podman storing on the target (as :mod:`benchmarks.scenarios.podman`): apt's
downloads over the host's network (the same for every target, alternating), then dpkg
unpacking and configuring ~30 packages through the overlay: the sum of the write rows as a
user meets it. The base is a ``debootstrap --variant=minbase`` rootfs without python3, built
once beside the data sets. Only when named (``--only podman-build``): it needs the Debian
mirror and takes 20-60 s a sample."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from benchmarks.dataset import Dataset, debian_mirror, debootstrap
from benchmarks.model import Measurement, Mounted, Scenario
from benchmarks.scenarios import podman
from benchmarks.scenarios.podman import finish, private_podman, timed_podman

BASE = "localhost/layerfs-bench-debian:latest"
BUILT = "localhost/layerfs-bench-built:latest"
CONTAINERFILE = f"FROM {BASE}\nRUN apt-get update && apt-get install -y python3\n"
SAMPLES = 2  # per mount; rounds multiply them
_base: str | None = None  # the rootfs, or why there is none: "!" + reason


def network_unreachable(mirror: str) -> str | None:
    """Why MIRROR's release file cannot be fetched from here, or None."""
    url = mirror.rstrip("/") + "/dists/bookworm/Release"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            r.read(1)
    except OSError as e:
        return f"the Debian mirror is unreachable ({url}: {e})"
    return None


def prepare(dataset: Dataset) -> None:
    global _base
    podman.prepare(dataset)
    if _base is not None:
        return
    why = network_unreachable(debian_mirror())
    if why:
        _base = "!" + why
        return
    _base = str(debootstrap(dataset.root.parent, include=""))


def _need(ds: Dataset) -> str | None:
    why = podman._need_podman(ds)
    if why:
        return why
    if _base is None:
        return "not prepared"
    return _base[1:] if _base.startswith("!") else None


def build(mnt: Mounted) -> list[Measurement]:
    env = private_podman(mnt)
    assert mnt.work is not None and _base is not None
    ctx = mnt.work / "context"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(CONTAINERFILE)
    samples = []
    try:
        env.import_rootfs(Path(_base), BASE)
        for _ in range(SAMPLES):
            args = ("build", "--no-cache", "--network", "host", "-q", "-t", BUILT, str(ctx))
            samples.append(timed_podman(env, *args))
            env.run("rmi", "-f", BUILT)
    finally:
        finish(env)
    return [Measurement("podman build apt-get install python3", samples)]


SCENARIOS = [
    Scenario(
        "podman-build",
        "podman build --no-cache --network host: FROM Debian minbase, RUN apt-get update && "
        "apt-get install -y python3; only with --only podman-build (network)",
        build,
        requires=_need,
        explicit=True,
        timeout=900,
        daemon_cpu=False,  # the data set's mount idles: podman mounts its own
    ),
]
