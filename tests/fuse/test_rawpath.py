"""The raw path (LAYERFS_LOOP=raw, off by default): the poll loop reads each request itself
and answers LOOKUP, GETATTR, GETXATTR, FORGET and BATCH_FORGET without pyfuse3; the rest
goes to libfuse through the session's custom io (layerfs.fusehooks._RawPath). The same tests
run on its compiled form (LAYERFS_LOOP=craw, layerfs._craw, built by scripts/setup.sh).

What it must keep: the lookup count (every positive LOOKUP reply is a reference the kernel
gives back in a FORGET: the daemon's node table returns to its size once the kernel forgot),
the adapter's answers (negative entries, errnos, xattr sizes: the same as pyfuse3's path,
request for request), and the read duty while other handlers await on worker threads
(tests/fuse/test_poll_loop.py runs its parallel clients with the raw path too).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.mounts import Layout, is_mounted, subject_named

from layerfs import fusehooks

pytestmark = pytest.mark.fuse

STATS = "trusted.layerfs.statistics"
FILES = 600


def _stats(mnt: Path) -> dict[str, int]:
    return dict(json.loads(os.getxattr(mnt, STATS)))


def _built(loop: str) -> str:
    """LOOP, skipped where it is the compiled path and scripts/setup.sh could not build it."""
    if loop == "craw" and fusehooks.craw_module() is None:
        pytest.skip("layerfs._craw is not built (scripts/setup.sh builds it: Cython and gcc)")
    return loop


LOOPS = pytest.mark.parametrize("loop", ["raw", "craw"])


@LOOPS
def test_forget_storm_leaves_no_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """Files created, hard-linked (a second reference on the node), looked up and removed:
    the kernel forgets them, in FORGETs and BATCH_FORGETs the raw path serves, and the node
    table comes back to its size. A node forgotten too early would fail the stats, the
    links or the unlinks meanwhile (ENOENT, ESTALE); one never forgotten stays counted."""
    monkeypatch.setenv("LAYERFS_LOOP", _built(loop))
    layout = Layout.create(tmp_path / "fs", 1)
    with layout.mount(subject_named("layerfs")) as m:
        work = m.mnt / "work"
        work.mkdir()
        base = _stats(m.mnt)["nodes"]
        for i in range(FILES):
            (work / f"f{i}").write_bytes(b"x")
            os.link(work / f"f{i}", work / f"g{i}")
            assert os.stat(work / f"g{i}").st_nlink == 2
        grown = _stats(m.mnt)
        assert grown["nodes"] >= base + FILES, (base, grown)
        assert grown["loop_raw"] > FILES, grown  # the lookups and getattrs went the raw way
        for i in range(FILES):
            os.unlink(work / f"f{i}")
            os.unlink(work / f"g{i}")
        deadline = time.monotonic() + 60
        while (now := _stats(m.mnt))["nodes"] > base:  # forgets come between requests
            assert time.monotonic() < deadline, (base, now)
            time.sleep(0.1)
        assert os.listdir(work) == []
        os.rmdir(work)


def _getxattr_size(path: Path, name: bytes, size: int) -> int:
    """libc's getxattr with a buffer of SIZE bytes (0: the value's size is asked): the
    length, or -errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(max(size, 1))
    n = libc.getxattr(os.fsencode(path), name, buf if size else None, ctypes.c_size_t(size))
    return int(n) if n >= 0 else -ctypes.get_errno()


def _answers(mnt: Path) -> list[object]:
    """What a client sees of lookups, getattrs and getxattrs that go the raw way."""
    out: list[object] = []

    def probe(fn: object, *args: object) -> None:
        try:
            out.append(fn(*args))  # type: ignore[operator]
        except OSError as e:
            out.append(errno.errorcode[e.errno or 0])

    d = mnt / "d"
    probe(os.lstat, d / "missing")  # a negative entry
    (d / "missing").write_bytes(b"now here")  # ... that a create replaces
    probe(lambda p: os.lstat(p).st_size, d / "missing")
    probe(os.lstat, d / ("n" * 256))  # ENAMETOOLONG from the engine
    probe(os.lstat, d / "file" / "below")  # ENOTDIR
    st = os.lstat(d / "file")
    out.append((st.st_mode, st.st_nlink, st.st_size, st.st_uid, st.st_gid))
    out.append((st.st_atime_ns, st.st_mtime_ns))
    root = os.stat(mnt)  # a GETATTR: the root is never looked up
    out.append((root.st_mode, root.st_nlink, root.st_uid, root.st_gid))
    dev = os.lstat(d / "null")
    out.append((dev.st_mode, os.major(dev.st_rdev), os.minor(dev.st_rdev)))
    out.append(os.lstat(d / "link").st_ino == os.lstat(d / "file").st_ino)  # one st_ino
    probe(os.getxattr, d / "file", "user.small")
    probe(os.getxattr, d / "file", "user.none")  # ENODATA
    out.append(_getxattr_size(d / "file", b"user.big", 0))  # the size asked
    out.append(_getxattr_size(d / "file", b"user.big", 10))  # ERANGE
    out.append(_getxattr_size(d / "file", b"user.big", 5000))
    # SETATTRs and a MKNOD in the upper (the compiled path serves them: no copy-up due)
    new = d / "missing"
    os.truncate(new, 3)
    os.chmod(new, 0o640)
    os.utime(new, ns=(5_000_000_007, -3_000_000_001))  # last: a truncate sets the mtime
    st = os.lstat(new)
    out.append((st.st_mode, st.st_size, st.st_atime_ns, st.st_mtime_ns))
    probe(os.chmod, d / "gone" / "x", 0o600)  # ENOENT on the way
    os.mknod(d / "fifo", 0o600 | stat.S_IFIFO)
    out.append(os.lstat(d / "fifo").st_mode)
    probe(os.mknod, d / "fifo", 0o600 | stat.S_IFIFO)  # EEXIST
    return out


def _tree(lower: Path) -> None:
    d = lower / "d"
    d.mkdir()
    (d / "file").write_bytes(b"12345")
    os.setxattr(d / "file", "user.small", b"v")
    os.setxattr(d / "file", "user.big", b"b" * 3000)
    os.link(d / "file", d / "link")
    os.mknod(d / "null", 0o20644, os.makedev(1, 3))
    os.utime(d / "file", ns=(1_000_000_123, -2_000_000_456))  # before the epoch too


@LOOPS
def test_answers_as_pyfuse3_gives_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """The raw replies against the same requests served by pyfuse3 (the poll loop): the
    same entries, attributes, errnos and xattr answers."""
    seen = {}
    for serving in ("poll", _built(loop)):
        monkeypatch.setenv("LAYERFS_LOOP", serving)
        layout = Layout.create(tmp_path / serving, 1)
        _tree(layout.lowers[0])
        with layout.mount(subject_named("layerfs")) as m:
            seen[serving] = _answers(m.mnt)
            raw = _stats(m.mnt).get("loop_raw", 0)
        assert (raw > 10) == (serving == loop), (serving, raw)
    assert seen[loop] == seen["poll"]
    assert seen[loop][0] == "ENOENT" and seen[loop][1] == 8
    assert seen[loop][2:4] == ["ENAMETOOLONG", "ENOTDIR"]
    assert seen[loop][5] == (1_000_000_123, -2_000_000_456)
    assert seen[loop][-9:-4] == [b"v", "ENODATA", 3000, -errno.ERANGE, 3000]
    assert seen[loop][-4] == (0o100640, 3, 5_000_000_007, -3_000_000_001)
    assert seen[loop][-3:] == ["ENOENT", 0o10600, "EEXIST"]


ORIGINLESS = 30


@pytest.mark.parametrize("loop", ["poll", "raw", "craw"])
def test_reply_waits_for_the_listing_it_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """Upper directories another tool wrote (no origin) over lower ones: a plain listing of
    their parent shows each one's own inode, and the first LOOKUP of one writes its origin
    (``Overlay.fix_origin``), after which the listing shows the lower's (st_ino). The
    handler drops the kernel's cached listing of the parent before it answers (the
    invalidation waits on a worker thread); the raw paths answered first and dropped it
    after, so a listing read right after the stat was the cached one (write-diff's
    test_plain_listing_of_merged_dir_without_origin). Each LOOKUP's reply is held for it
    (``loop_deferred``), its reference kept: once all is removed the kernel's forgets bring
    the node table back to its size."""
    monkeypatch.setenv("LAYERFS_LOOP", _built(loop) if loop != "poll" else loop)
    layout = Layout.create(tmp_path / "fs", 1)
    assert layout.upper is not None
    for i in range(ORIGINLESS):  # a parent each: its first impure mark is written too
        (layout.lowers[0] / f"p{i}" / "s").mkdir(parents=True)
        (layout.upper / f"p{i}" / "s").mkdir(parents=True)
    with layout.mount(subject_named("layerfs")) as m:
        base = _stats(m.mnt)
        for i in range(ORIGINLESS):
            parent = m.mnt / f"p{i}"
            assert os.listdir(parent) == ["s"]  # cached by the kernel
            st_ino = os.lstat(parent / "s").st_ino  # the first LOOKUP: the origin written
            assert st_ino == os.lstat(layout.lowers[0] / f"p{i}" / "s").st_ino
            shown = {e.name: e.inode() for e in os.scandir(parent)}["s"]
            assert shown == st_ino, (i, shown, st_ino)
        deferred = _stats(m.mnt).get("loop_deferred", 0) - base.get("loop_deferred", 0)
        assert (deferred >= ORIGINLESS) == (loop != "poll"), deferred
        for i in range(ORIGINLESS):
            os.rmdir(m.mnt / f"p{i}" / "s")
            os.rmdir(m.mnt / f"p{i}")
        deadline = time.monotonic() + 60
        while (now := _stats(m.mnt))["nodes"] > base["nodes"]:  # forgets come meanwhile
            assert time.monotonic() < deadline, (base, now)
            time.sleep(0.1)


def test_install_refused_leaves_the_session_alone() -> None:
    """Where libfuse refuses the custom io (here: no descriptor), the raw path is not used
    and the session keeps libfuse's own reads (and splice, if asked)."""
    hooks = fusehooks.Hooks(session=0)

    async def invalidate(ids: list[int]) -> None:
        pass

    ops = fusehooks.RawOps(
        lookup=lambda p, n: None, getattr=lambda n: 0, getxattr=lambda n, x: 0,
        forget=lambda items: None, listings=[], invalidate=invalidate, timeout=1.0,
    )  # fmt: skip
    assert fusehooks._RawPath.install(hooks, -1, ops, {}) is None
    assert not hooks.raw


@pytest.mark.parametrize(("asked", "serves"), [(None, "poll"), ("craw", "raw")])
def test_craw_without_its_build(tmp_path: Path, asked: str | None, serves: str) -> None:
    """A copy of the package without the compiled raw path's build, whose default loop
    (ops.DEFAULT_LOOP) is craw: with LAYERFS_LOOP unset the poll loop serves (the Python raw
    path costs more than it saves: docs/benchmarks.md, session 13 rawpath); asked for by
    LAYERFS_LOOP=craw, the Python raw path does."""
    pkg = Path(fusehooks.__file__).parent
    copy = tmp_path / "code"
    shutil.copytree(pkg, copy / "layerfs", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    ops = copy / "layerfs" / "ops.py"
    text = ops.read_text()
    assert 'DEFAULT_LOOP = "' in text
    ops.write_text(text.replace('DEFAULT_LOOP = "poll"', 'DEFAULT_LOOP = "craw"'))
    layout = Layout.create(tmp_path / "fs", 1)
    assert layout.upper is not None and layout.work is not None
    env = {k: v for k, v in os.environ.items() if k not in ("LAYERFS_LOOP", "LAYERFS_COMPILED")}
    env["PYTHONPATH"] = str(copy)
    if asked:
        env["LAYERFS_LOOP"] = asked
    cmd = [sys.executable, "-P", "-m", "layerfs.cli", "mount", "-f", str(layout.lowers[0])]
    cmd += [str(layout.upper), str(layout.mnt), "--workdir", str(layout.work)]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not is_mounted(layout.mnt):
            assert proc.poll() is None and time.monotonic() < deadline, proc.returncode
            time.sleep(0.05)
        for i in range(20):
            assert not (layout.mnt / f"missing{i}").exists()
        stats = _stats(layout.mnt)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(layout.mnt)], check=False)
        _, err = proc.communicate(timeout=60)
    assert stats.get("loop_poll", 0) > 0, stats
    assert (stats.get("loop_raw", 0) >= 20) == (serves == "raw"), stats
    assert ("raw path in Python" in err) == (serves == "raw"), err
