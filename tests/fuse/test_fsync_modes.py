"""fsync=auto|strict|volatile, as kernel overlayfs 6.12+ has them (default auto).

auto syncs a copy-up of data before it is put in place, and neither metadata-only copy-ups
nor directories; strict syncs those too (each copied object before it goes into place,
not its parent); volatile syncs nothing, and fsync requests are ignored.
Counted with the daemon's statistics xattr (``copyup_fsyncs``), for the same three
operations on every mode: a data copy-up, a directory copy-up (a file created in a lower
directory), and a metadata-only copy-up of a file with metacopy=on.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
from support.mounts import mount_layerfs

pytestmark = pytest.mark.fuse


def _fsyncs(mnt: Path) -> int:
    stats = json.loads(os.getxattr(mnt, "trusted.layerfs.statistics"))
    return int(stats["copyup_fsyncs"])


def _syncs_per_step(tmp_path: Path, options: list[str]) -> list[int]:
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower / "dir", lower / "meta", upper, work, mnt):
        d.mkdir(parents=True)
    (lower / "data").write_bytes(b"x" * 5000)
    (lower / "meta" / "f").write_bytes(b"y" * 5000)
    counts = []
    with mount_layerfs([lower], upper, work, mnt, options=["metacopy=on", *options]):
        counts.append(_fsyncs(mnt))
        with open(mnt / "data", "ab") as f:  # data copy-up
            f.write(b"!")
        counts.append(_fsyncs(mnt))
        (mnt / "dir" / "new").write_bytes(b"")  # copy-up of dir/, then a create in it
        counts.append(_fsyncs(mnt))
        os.chmod(mnt / "meta" / "f", 0o600)  # metadata only (metacopy), its parent first
        counts.append(_fsyncs(mnt))
        fd = os.open(mnt / "dir" / "new", os.O_WRONLY)
        try:
            os.write(fd, b"z")
            os.fsync(fd)  # a request: served or ignored, never counted as a copy-up's
        finally:
            os.close(fd)
    assert (upper / "data").read_bytes() == b"x" * 5000 + b"!"
    return [b - a for a, b in itertools.pairwise(counts)]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ([], [1, 0, 0]),  # the default is auto
        (["fsync=auto"], [1, 0, 0]),
        (["fsync=1"], [1, 0, 0]),
        # one per copied object, as the kernel's ovl_copy_up_metadata (no parent directory
        # syncs): the file; dir/; meta/ then f (a metacopy)
        (["fsync=strict"], [1, 1, 2]),
        (["fsync=volatile"], [0, 0, 0]),
        (["volatile"], [0, 0, 0]),
        (["fsync=0"], [0, 0, 0]),  # fuse-overlayfs' meaning: no syncs at all
    ],
)
def test_copy_up_syncs(tmp_path: Path, options: list[str], expected: list[int]) -> None:
    assert _syncs_per_step(tmp_path, options) == expected


def test_serial_copy_ups_sync_inline(tmp_path: Path) -> None:
    """chmod of lower files one after another, as `chmod -R` does: each copy-up's fsync is
    made on the serving thread (no hand-off to a worker and back), and each is made.

    Counted from the second chmod: the first request pyfuse3 serves starts its second
    reader task, which is ready to run while that request's copy-up syncs (so that fsync
    goes to a thread). On the poll loop that request came before the first chmod (the
    mount's first LOOKUP or GETATTR); on the raw paths (LAYERFS_LOOP=raw, craw), which
    answer every request before it themselves, it is the first chmod's SETATTR (a copy-up:
    pyfuse3's)."""
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    for i in range(21):
        (lower / f"f{i}").write_bytes(b"x" * (100 + i))
    with mount_layerfs([lower], upper, work, mnt):
        os.chmod(mnt / "f20", 0o600)
        before = json.loads(os.getxattr(mnt, "trusted.layerfs.statistics"))
        for i in range(20):
            os.chmod(mnt / f"f{i}", 0o600)
        after = json.loads(os.getxattr(mnt, "trusted.layerfs.statistics"))
    assert after["copyup_fsyncs"] - before["copyup_fsyncs"] == 20
    assert after["copyup_fsyncs_inline"] - before.get("copyup_fsyncs_inline", 0) == 20
    for i in range(20):
        assert (upper / f"f{i}").read_bytes() == b"x" * (100 + i)
