"""A SETATTR that copies a lower file up, answered by the compiled raw path (LAYERFS_LOOP=craw,
the default) where the copy-up needs no wait: a lone chmod of a small file, its fsync inline
(``CopyUp.begin_at_once``). One that would wait (a copy big enough for a worker thread)
goes to pyfuse3's handler as before, and builds its copy there.

Each file the mount leaves is compared with what kernel overlayfs leaves for the same chmods
on the same lower, in each fsync= mode; the syncs are counted (the daemon's statistics), and
``loop_raw`` says which way each SETATTR went.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from support.mounts import mount_kernel, mount_layerfs

from layerfs import copyup, fusehooks

pytestmark = pytest.mark.fuse

FILES = 30
BIG = copyup.THREAD_THRESHOLD + 4096  # its data is copied on a worker thread


def _stats(mnt: Path) -> dict[str, int]:
    return dict(json.loads(os.getxattr(mnt, "trusted.layerfs.statistics")))


def _lower(root: Path) -> Path:
    lower = root / "lower"
    (lower / "dir").mkdir(parents=True)
    for i in range(FILES):  # f0 empty: a copy without data, which no mode syncs but strict
        (lower / "dir" / f"f{i}").write_bytes(b"data %d\n" % i * i)
        os.utime(lower / "dir" / f"f{i}", ns=(1_000_000_000 + i, 2_000_000_000 + i))
    (lower / "big").write_bytes(b"b" * BIG)
    return lower


def _chmod_all(mnt: Path) -> None:
    os.chmod(mnt / "dir", 0o775)
    for i in range(FILES):
        os.chmod(mnt / "dir" / f"f{i}", 0o604 + i % 2 * 0o20)


def _upper_files(upper: Path) -> dict[str, tuple[int, int, int, bytes, bytes | None]]:
    """Each upper file: mode, size, mtime, data and overlay.origin; and the impure marks."""
    out: dict[str, tuple[int, int, int, bytes, bytes | None]] = {}
    for p in sorted(upper.rglob("*")):
        st = os.lstat(p)
        rel = str(p.relative_to(upper))
        attrs = os.listxattr(p, follow_symlinks=False)
        origin = (
            os.getxattr(p, "trusted.overlay.origin") if "trusted.overlay.origin" in attrs else None
        )
        if stat.S_ISDIR(st.st_mode):
            impure = b"impure" if "trusted.overlay.impure" in attrs else b""
            out[rel] = (st.st_mode, 0, 0, impure, origin)
        else:
            out[rel] = (st.st_mode, st.st_size, st.st_mtime_ns, p.read_bytes(), origin)
    return out


@pytest.mark.parametrize("fsync", ["auto", "volatile", "strict"])
def test_lone_chmod_copy_up_answered_from_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: str
) -> None:
    """chmod of each small lower file, one after the other: every SETATTR answered from C,
    each copy with data synced inline (auto, strict: the empty one too under strict), the
    files as the kernel's; the big file's copy-up goes to pyfuse3 (a thread's copy), right
    too. Without the copy-up at once, loop_raw grew by the statistics reads alone."""
    if fusehooks.craw_module() is None:
        pytest.skip("layerfs._craw is not built (scripts/setup.sh builds it)")
    monkeypatch.setenv("LAYERFS_LOOP", "craw")
    lower = _lower(tmp_path)
    uppers = {}
    for kind in ("layerfs", "kernel"):
        upper, work, mnt = (tmp_path / f"{kind}-{n}" for n in ("upper", "work", "mnt"))
        for d in (upper, work, mnt):
            d.mkdir()
        if kind == "kernel":
            with mount_kernel([lower], upper, work, mnt, options=[f"fsync={fsync}"]):
                _chmod_all(mnt)
                os.chmod(mnt / "big", 0o600)
        else:
            with mount_layerfs([lower], upper, work, mnt, options=[f"fsync={fsync}"]):
                os.lstat(mnt / "big")
                os.listdir(mnt / "dir")  # the lookups, before the counts
                before = _stats(mnt)
                _chmod_all(mnt)
                after = _stats(mnt)
                os.chmod(mnt / "big", 0o600)
                last = _stats(mnt)
            raw = after["loop_raw"] - before.get("loop_raw", 0)
            assert raw >= FILES + 1, (before, after)
            syncs = after["copyup_fsyncs"] - before.get("copyup_fsyncs", 0)
            inline = after["copyup_fsyncs_inline"] - before.get("copyup_fsyncs_inline", 0)
            # auto: each file with data (not f0); strict: every file and dir/
            expected = {"auto": FILES - 1, "volatile": 0, "strict": FILES + 1}[fsync]
            assert (syncs, inline) == (expected, expected), (before, after)
            assert last["copyup_files"] - after["copyup_files"] == 1  # by pyfuse3's handler
            assert last["copyup_fsyncs"] - after["copyup_fsyncs"] == (fsync != "volatile")
        uppers[kind] = _upper_files(upper)
    assert uppers["layerfs"] == uppers["kernel"]
    assert stat.S_IMODE(uppers["layerfs"]["dir/f1"][0]) == 0o624
