"""fsync=auto|strict|volatile: the syncs the daemon makes, counted, against the kernel's rule.

Kernel overlayfs (6.12+ stable, fs/overlayfs/copy_up.c, ovl_should_sync/_metadata) does, per
copy-up: auto, one fsync of a regular file's copy that has data (not a metacopy, not an empty
file) before it is linked in; strict, one fsync of every copied regular file and directory
(metadata-only too) before it goes into place; volatile, none, and users' fsync(2) are no-ops
(ovl_fsync). A new directory (mkdir) is never synced by overlayfs itself. The kernel's own
syncs cannot be observed from here, so the rule is the expectation: strace counts the
fsync/fdatasync/syncfs calls of the layerfs daemon during each operation.
``volatile`` and fuse-overlayfs' ``fsync=0`` are fsync=volatile; its ``fsync=1`` is auto.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.mounts import mount_layerfs
from support.strace import Strace

pytestmark = [pytest.mark.fuse]

# (operation, metacopy) -> syncs per mode: the kernel's rule written out
EXPECTED: dict[tuple[str, bool], dict[str, int]] = {
    # append to a lower file in a lower dir: the dir and the file are copied up
    ("write", False): {"auto": 1, "strict": 2, "volatile": 0},
    ("write", True): {"auto": 1, "strict": 2, "volatile": 0},
    # chmod of a lower file at the root: a data copy-up, or with metacopy a metadata-only one
    ("chmod", False): {"auto": 1, "strict": 1, "volatile": 0},
    ("chmod", True): {"auto": 0, "strict": 1, "volatile": 0},
    # chmod of an empty lower file: a copy-up with no data
    ("chmod-empty", False): {"auto": 0, "strict": 1, "volatile": 0},
    # mkdir at the root, and in a lower dir (which is copied up first)
    ("mkdir", False): {"auto": 0, "strict": 0, "volatile": 0},
    ("mkdir-in-lower", False): {"auto": 0, "strict": 1, "volatile": 0},
    # the user's fsync(2) and fdatasync(2) of a new file, and fsync of its directory
    ("user-fsync", False): {"auto": 3, "strict": 3, "volatile": 0},
}

OPS: dict[str, Callable[[Path], None]] = {}


def _op(name: str) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    def deco(fn: Callable[[Path], None]) -> Callable[[Path], None]:
        OPS[name] = fn
        return fn

    return deco


@_op("write")
def _write(m: Path) -> None:
    with open(m / "dir" / "data", "ab") as f:
        f.write(b"more")


@_op("chmod")
def _chmod(m: Path) -> None:
    os.chmod(m / "top", 0o600)


@_op("chmod-empty")
def _chmod_empty(m: Path) -> None:
    os.chmod(m / "empty", 0o600)


@_op("mkdir")
def _mkdir(m: Path) -> None:
    os.mkdir(m / "new")


@_op("mkdir-in-lower")
def _mkdir_in_lower(m: Path) -> None:
    os.mkdir(m / "dir2" / "new")


@_op("user-fsync")
def _user_fsync(m: Path) -> None:
    fd = os.open(m / "created", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _strace(pid: int, out: Path) -> Strace:
    return Strace(pid, out, "fsync,fdatasync,syncfs")


def _syncs(tracer: Strace) -> list[str]:
    return [ln for ln in tracer.stop() if "sync" in ln]


@pytest.fixture
def layers(tmp_path: Path) -> Iterator[dict[str, Path]]:
    d = {n: tmp_path / n for n in ("lower", "upper", "work", "merged")}
    for p in d.values():
        p.mkdir()
    (d["lower"] / "dir").mkdir()
    (d["lower"] / "dir" / "data").write_bytes(b"lower data " * 100)
    (d["lower"] / "dir2").mkdir()
    (d["lower"] / "top").write_bytes(b"top data " * 100)
    (d["lower"] / "empty").write_bytes(b"")
    yield d


CASES = [
    (op, metacopy, mode, EXPECTED[(op, metacopy)][mode])
    for (op, metacopy) in EXPECTED
    for mode in ("auto", "strict", "volatile")
]


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.parametrize(("op", "metacopy", "mode", "expected"), CASES)
def test_syncs_per_operation(
    layers: dict[str, Path], op: str, metacopy: bool, mode: str, expected: int
) -> None:
    options = [f"fsync={mode}", f"metacopy={'on' if metacopy else 'off'}"]
    with mount_layerfs(
        [layers["lower"]], layers["upper"], layers["work"], layers["merged"], options=options
    ) as m:
        assert m.proc is not None
        os.listdir(m.mnt)  # the daemon is serving
        tracer = _strace(m.proc.pid, layers["merged"].parent / "strace.out")
        try:
            OPS[op](m.mnt)
        finally:
            calls = _syncs(tracer)
    assert len(calls) == expected, calls


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.parametrize(
    ("spelling", "mode"), [("volatile", "volatile"), ("fsync=0", "volatile"), ("fsync=1", "auto")]
)
def test_other_spellings(layers: dict[str, Path], spelling: str, mode: str) -> None:
    """volatile is the kernel's alias of fsync=volatile; fuse-overlayfs' fsync=0 (no fsync
    requests, and it never syncs a copy-up) is volatile too, its fsync=1 auto."""
    counts = []
    with mount_layerfs(
        [layers["lower"]], layers["upper"], layers["work"], layers["merged"], options=[spelling]
    ) as m:
        assert m.proc is not None
        os.listdir(m.mnt)
        for i, op in enumerate(("write", "user-fsync")):
            tracer = _strace(m.proc.pid, layers["merged"].parent / f"strace{i}.out")
            try:
                OPS[op](m.mnt)
            finally:
                counts.append(len(_syncs(tracer)))
    assert counts == [EXPECTED[("write", False)][mode], EXPECTED[("user-fsync", False)][mode]]
