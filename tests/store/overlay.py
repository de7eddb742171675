"""Kernel overlayfs mounts for store tests: the reference that image lowers are checked with."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path


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
