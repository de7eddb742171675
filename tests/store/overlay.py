"""Mounts for store tests: kernel overlayfs, the reference that image lowers are checked with,
and ``layerfs mount --image``."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from support.mounts import is_mounted, layerfs_command, unmount_fuse


@contextlib.contextmanager
def kernel_overlay(
    lowers: list[str], mnt: Path, upper: Path | None = None, work: Path | None = None
) -> Iterator[Path]:
    """Mount ``lowers`` (topmost first) at ``mnt``, read-only without ``upper``."""
    mnt.mkdir(parents=True, exist_ok=True)
    opts = ["lowerdir=" + ":".join(lowers), "redirect_dir=off", "index=off", "metacopy=off"]
    if upper is not None:
        assert work is not None
        upper.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        opts += [f"upperdir={upper}", f"workdir={work}"]
    if len(lowers) == 1 and upper is None:
        # overlayfs wants two lowers for a read-only stack: a bind mount shows the same tree.
        subprocess.run(["mount", "--bind", "-o", "ro", lowers[0], str(mnt)], check=True)
    else:
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", ",".join(opts), str(mnt)], check=True
        )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@contextlib.contextmanager
def layerfs_image_mount(store_root: str, ref: str, tmp: Path) -> Iterator[tuple[Path, Path]]:
    """``layerfs mount --image REF`` on TMP/upper, TMP/work, TMP/mnt: yields (mnt, upper);
    unmounts at the end and checks nothing is left mounted."""
    upper, work, mnt = tmp / "upper", tmp / "work", tmp / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    cmd = [*layerfs_command(), "mount", "--image", ref, "--store", store_root]
    r = subprocess.run(
        [*cmd, str(upper), str(mnt), "--workdir", str(work)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    try:
        assert is_mounted(mnt)
        yield mnt, upper
    finally:
        assert unmount_fuse(mnt) == []
