"""Engine tier: the Overlay driven directly (no FUSE) on real directories.

Each test ends with ``check_upper``, an fsck of what the engine left on disk.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from layerfs import _sys
from layerfs.attrs import Caller, SetAttr
from layerfs.config import MountConfig
from layerfs.copyup import THREAD_THRESHOLD
from layerfs.inodes import ROOT_ID
from layerfs.overlay import Overlay

from ._stack import make_stack, overlay

ROOT = Caller(0, 0, 0o022, 1)


def check_upper(up: Path, work: Path) -> None:
    """fsck of the upper: an empty workdir, well-formed whiteouts, no partial copies."""
    assert os.listdir(work / "work") == [], "leftovers in the workdir"
    for dirpath, dirnames, filenames in os.walk(up):
        for name in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISCHR(st.st_mode):
                assert st.st_rdev == 0, f"char device in upper that is not a whiteout: {name}"


def lookup(ov: Overlay, path: bytes) -> int:
    node = ROOT_ID
    for part in path.split(b"/"):
        node = ov.lookup(node, part).id
    return node


async def test_racing_opens_copy_up_once(tmp_path: Path) -> None:
    low, up, work, mnt = make_stack(tmp_path)
    data = os.urandom(3 << 20)  # above the inline threshold: the copy runs on a thread
    (low / "big").write_bytes(data)
    ov = overlay(low, up, work, mnt)
    try:
        ino = lookup(ov, b"big")
        handles: list[int] = []

        async def opener() -> None:
            handles.append(await ov.open(ino, os.O_WRONLY, ROOT))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(opener)
        assert ov.copyup.statistics()["files"] == 1
        assert (up / "big").read_bytes() == data
        for fh in handles:
            ov.release(fh)
        check_upper(up, work)
    finally:
        ov.close()


async def test_requests_served_during_a_large_copy_up(tmp_path: Path) -> None:
    """A big copy-up runs on a worker thread: other requests complete while it runs."""
    low, up, work, mnt = make_stack(tmp_path)
    (low / "huge").write_bytes(os.urandom(64 << 20))
    (low / "small").write_bytes(b"x")
    ov = overlay(low, up, work, mnt)
    try:
        ino = lookup(ov, b"huge")
        order: list[str] = []

        async def writer() -> None:
            fh = await ov.open(ino, os.O_WRONLY, ROOT)
            order.append("copy-up done")
            ov.release(fh)

        async def reader() -> None:
            await trio.lowlevel.checkpoint()  # let the writer start its copy
            ov.getattr(lookup(ov, b"small"))
            order.append("getattr done")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(reader)
        assert order == ["getattr done", "copy-up done"]
        check_upper(up, work)
    finally:
        ov.close()


@pytest.mark.parametrize(
    ("waiting", "concurrent", "inline"),
    [
        (None, None, 0),  # no way to tell whether requests wait (no FUSE): always a thread
        (False, None, 3),  # a copy-up alone, nothing waiting: synced inline, as the kernel
        (True, None, 0),  # a request waits in /dev/fuse: a thread, the loop serves it
        # another copy-up in progress (its big copy on a thread): the three on threads, their
        # syncs overlap; the big one's own sync is inline, alone again by then
        (False, "in progress", 1),
        # three started at once, none begun: each is alone when it syncs (in FUSE a request
        # not yet begun is still in /dev/fuse: the poll sees it, the case above)
        (False, "not begun", 3),
    ],
)
async def test_copy_up_fsync_inline_only_when_alone(
    tmp_path: Path, waiting: bool | None, concurrent: str | None, inline: int
) -> None:
    """fsync=auto syncs each data copy-up once, inline only when nothing else waits."""
    low, up, work, mnt = make_stack(tmp_path)
    names = [b"a", b"b", b"c"]
    for name in names:
        (low / name.decode()).write_bytes(name * 5000)
    big = os.urandom(THREAD_THRESHOLD + 1)
    (low / "big").write_bytes(big)
    ov = overlay(low, up, work, mnt)
    if waiting is not None:
        ov.copyup.requests_waiting = lambda: waiting
    try:
        inos = [lookup(ov, name) for name in names]
        big_ino = lookup(ov, b"big")

        async def chmod(ino: int) -> None:
            await ov.setattr(ino, SetAttr(mode=0o600), None, ROOT)

        # The big copy's thread waits until the small ones are done, however long they take:
        # a fixed pause (0.5 s) let a loaded host finish it first, and the last small ones
        # then synced alone (inline), which is right, but not the case this one is about.
        small_done = threading.Event()
        async with trio.open_nursery() as nursery:
            if concurrent == "not begun":
                for ino in inos:
                    nursery.start_soon(chmod, ino)
            else:
                if concurrent == "in progress":
                    copy = ov.copyup._copy

                    def slow_copy(*args: Any) -> str:
                        if args[2] > THREAD_THRESHOLD:  # on its thread: the small ones meanwhile
                            assert small_done.wait(timeout=120), "the small copy-ups hang"
                        return copy(*args)

                    ov.copyup._copy = slow_copy  # type: ignore[method-assign]
                    nursery.start_soon(chmod, big_ino)
                    await trio.testing.wait_all_tasks_blocked()  # the big copy on its thread
                    assert ov.copyup.active == 1
                try:
                    for ino in inos:
                        await chmod(ino)
                finally:
                    small_done.set()
        stats = ov.copyup.statistics()
        syncs = 4 if concurrent == "in progress" else 3
        assert (stats["fsyncs"], stats["fsyncs_inline"]) == (syncs, inline)
        for name in names:
            assert (up / name.decode()).read_bytes() == name * 5000
            assert stat.S_IMODE((up / name.decode()).stat().st_mode) == 0o600
        check_upper(up, work)
    finally:
        ov.close()


class _Steps(trio.abc.Instrument):
    """Counts the steps the scheduler runs of one task: each is a pass through trio."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += task is self.task


@pytest.mark.parametrize(("fsync", "syncs"), [("volatile", 0), ("auto", 1)])
async def test_small_copy_up_alone_never_passes_through_trio(
    tmp_path: Path, fsync: str, syncs: int
) -> None:
    """A small copy-up alone runs without a schedule point, its fsync inline (the poll loop
    then answers the request without a pass through trio: ~200,000 instructions a chmod)."""
    low, up, work, mnt = make_stack(tmp_path)
    (low / "d").mkdir()
    (low / "d" / "f").write_bytes(b"x" * 5000)
    ov = overlay(low, up, work, mnt)
    ov.copyup.fsync = fsync != "volatile"
    ov.copyup.requests_waiting = lambda: False
    try:
        ino = lookup(ov, b"d/f")
        probe = _Steps(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(probe)
        try:
            await ov.setattr(ino, SetAttr(mode=0o600), None, ROOT)  # the parent d too
        finally:
            trio.lowlevel.remove_instrument(probe)
        assert probe.steps == 0
        assert ov.copyup.statistics()["fsyncs_inline"] == syncs
        assert stat.S_IMODE((up / "d" / "f").stat().st_mode) == 0o600
        check_upper(up, work)
    finally:
        ov.close()


async def test_truncating_open_copies_no_data(tmp_path: Path) -> None:
    low, up, work, mnt = make_stack(tmp_path)
    (low / "f").write_bytes(b"y" * (2 << 20))
    ov = overlay(low, up, work, mnt)
    try:
        fh = await ov.open(lookup(ov, b"f"), os.O_WRONLY | os.O_TRUNC, ROOT)
        ov.release(fh)
        assert ov.copyup.statistics()["bytes"] == 0
        assert (up / "f").stat().st_size == 0
        check_upper(up, work)
    finally:
        ov.close()


# A regular file is built as an O_TMPFILE; "named" is the path taken where the upper's
# filesystem refuses O_TMPFILE (a temporary name in the workdir, renamed into place).
BUILDS = pytest.mark.parametrize("tmpfile", [True, False], ids=["tmpfile", "named"])


@BUILDS
async def test_copy_up_keeps_holes_metadata_and_capabilities(tmp_path: Path, tmpfile: bool) -> None:
    low, up, work, mnt = make_stack(tmp_path)
    sparse = low / "sparse"
    fd = os.open(sparse, os.O_WRONLY | os.O_CREAT, 0o644)
    os.pwrite(fd, b"end", 64 << 20)
    os.close(fd)
    os.chown(sparse, 1234, 5678)
    os.chmod(sparse, 0o4755)
    os.setxattr(sparse, "user.k", b"v")
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    os.setxattr(sparse, "security.capability", cap)
    os.utime(sparse, ns=(1_000_000_001, 2_000_000_002))
    ov = overlay(low, up, work, mnt)
    ov.copyup.tmpfile = tmpfile
    try:
        ino = lookup(ov, b"sparse")
        await ov.setxattr(ino, b"user.other", b"1")  # a metadata change: copy-up
        st_l, st_u = os.lstat(sparse), os.lstat(up / "sparse")
        assert (st_u.st_uid, st_u.st_gid, st_u.st_mode) == (st_l.st_uid, st_l.st_gid, st_l.st_mode)
        assert st_u.st_mtime_ns == st_l.st_mtime_ns
        assert st_u.st_size == st_l.st_size
        assert st_u.st_blocks <= st_l.st_blocks + 8, "holes were filled in"
        assert os.getxattr(up / "sparse", "security.capability") == cap
        assert os.getxattr(up / "sparse", "user.k") == b"v"
        assert ov.getattr(ino).ino == st_l.st_ino  # st_ino survives copy-up
        fd = os.open(up / "sparse", os.O_RDONLY)
        try:
            assert os.pread(fd, 16, 64 << 20) == b"end"
        finally:
            os.close(fd)
        assert ov.copyup.tmpfile == tmpfile  # this filesystem has O_TMPFILE: no fallback
        check_upper(up, work)
    finally:
        ov.close()


@BUILDS
async def test_failed_copy_up_leaves_nothing(tmp_path: Path, tmpfile: bool) -> None:
    """A copy-up that fails (here: the lower vanished) leaves the workdir and upper clean."""
    low, up, work, mnt = make_stack(tmp_path)
    (low / "f").write_bytes(b"data")
    ov = overlay(low, up, work, mnt)
    ov.copyup.tmpfile = tmpfile
    try:
        ino = lookup(ov, b"f")
        os.unlink(low / "f")  # lowers must not change; here we break the rule on purpose
        with pytest.raises(OSError):
            await ov.open(ino, os.O_WRONLY, ROOT)
        assert not (up / "f").exists()
        check_upper(up, work)
    finally:
        ov.close()


async def test_chmod_of_lower_file_by_setattr(tmp_path: Path) -> None:
    low, up, work, mnt = make_stack(tmp_path)
    (low / "f").write_bytes(b"abc")
    ov = overlay(low, up, work, mnt)
    try:
        ino = lookup(ov, b"f")
        attr = await ov.setattr(ino, SetAttr(mode=0o600), None, ROOT)
        assert stat.S_IMODE(attr.mode) == 0o600
        assert stat.S_IMODE(os.lstat(low / "f").st_mode) != 0o600  # the lower is untouched
        assert (up / "f").read_bytes() == b"abc"
        check_upper(up, work)
    finally:
        ov.close()


def test_fifo_under_a_whiteout_marker_name_does_not_block(tmp_path: Path) -> None:
    """Where mknod is refused, whiteouts are ``.wh.`` files: an upper holding a FIFO named
    ``.wh.n`` beside ``n`` made the unlink of ``n`` open that FIFO for writing, which blocks
    the serving loop until a reader comes. Now the request fails (ENXIO)."""
    low, up, work, mnt = make_stack(tmp_path)
    (low / "n").write_text("lower\n")
    (up / "n").write_text("upper\n")
    os.mkfifo(up / ".wh.n", 0o644)
    ov = overlay(low, up, work, mnt)
    ov.ns.mknod_whiteouts = False  # as on an upper that refuses mknod

    def blocked(signum: int, frame: object) -> None:
        raise TimeoutError("the unlink blocked")

    old = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(10)  # a blocking open(2) only a signal interrupts
    try:
        with pytest.raises(OSError) as exc:
            trio.run(ov.unlink, ROOT_ID, b"n")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        ov.close()
    assert exc.value.errno == 6  # ENXIO


# source shapes for copy_data: (size, data extents as (offset, length)); 1 MiB apart so that
# each hole is whole blocks on any filesystem
_M = 1 << 20
SHAPES = {
    "dense": (5000, [(0, 5000)]),
    "hole-head": (3 * _M, [(2 * _M, _M)]),
    "hole-middle": (3 * _M, [(0, _M), (2 * _M, _M)]),
    "hole-tail": (3 * _M, [(0, _M)]),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("cut", [None, 100, _M + 100, 2 * _M + 100])
@pytest.mark.parametrize("into", ["new", "metacopy"])
def test_copy_data_shapes(tmp_path: Path, shape: str, cut: int | None, into: str) -> None:
    """_sys.copy_data gives DST exactly the first LENGTH bytes of SRC, holes kept, into a new
    empty file (the caller gives the source's size) or over a metacopy's all-hole file of the
    full size (no size given: it is cut to LENGTH first)."""
    size, extents = SHAPES[shape]
    src_path, dst_path = tmp_path / "src", tmp_path / "dst"
    with open(src_path, "wb") as f:
        f.truncate(size)
        for off, n in extents:
            f.seek(off)
            f.write(os.urandom(n))
    with open(dst_path, "wb") as f:
        if into == "metacopy":
            f.truncate(size)
    length = size if cut is None else min(cut, size)
    src = os.open(src_path, os.O_RDONLY)
    dst = os.open(dst_path, os.O_WRONLY)
    try:
        _sys.copy_data(src, dst, length, size if into == "new" else None)
    finally:
        os.close(src)
        os.close(dst)
    assert dst_path.read_bytes() == src_path.read_bytes()[:length]
    data = sum(max(0, min(off + n, length) - off) for off, n in extents)
    assert dst_path.stat().st_blocks * 512 <= data + (1 << 16), "holes were filled in"


async def test_copy_up_keeps_its_directories_across_a_wait(tmp_path: Path) -> None:
    """A copy-up that waits for a worker thread holds its own fds of the two parent
    directories: the layers' cached ones may be evicted and closed (and their numbers reused)
    by the requests served meanwhile. With a one-entry fd cache every other lookup evicts."""
    low, up, work, mnt = make_stack(tmp_path)
    data = os.urandom(48 << 20)  # above THREAD_THRESHOLD: copied on a worker thread
    (low / "d0").mkdir()
    (low / "d0" / "huge").write_bytes(data)
    for i in range(1, 6):
        (low / f"d{i}").mkdir()
        (low / f"d{i}" / "f").write_bytes(b"x")
    ov = overlay(low, up, work, mnt)
    try:
        for layer in ov.stack.layers():
            layer._fd_cache = 1
        ino = lookup(ov, b"d0/huge")
        d0 = lookup(ov, b"d0")
        await ov.setattr(d0, SetAttr(mode=0o755), None, ROOT)  # d0 in the upper first

        async def writer() -> None:
            ov.release(await ov.open(ino, os.O_WRONLY, ROOT))

        async def others() -> None:
            while not ov.copyup.limiter.borrowed_tokens:  # noqa: ASYNC110 (a thread, no event)
                await trio.sleep(0.001)
            for i in range(1, 6):
                ov.getattr(lookup(ov, b"d%d/f" % i))  # lower dirs' fds: evicts d0's
                attr = await ov.mkdir(ROOT_ID, b"n%d" % i, 0o755, ROOT)  # upper dirs' fds
                fh, _ = await ov.create(attr.id, b"g", 0o644, os.O_WRONLY, ROOT)
                ov.release(fh)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(others)
        assert ov.copyup.statistics()["files"] == 1
        assert (up / "d0" / "huge").read_bytes() == data
        assert sorted(os.listdir(up / "d0")) == ["huge"]
        check_upper(up, work)
    finally:
        ov.close()


async def test_setattr_of_lower_file_made_on_the_copy(tmp_path: Path) -> None:
    """Owner, mode and times of a setattr land on the copy with the copy-up, in a setattr's
    order (chown clears setuid first, then the mode sets it again); the reply is the upper's
    lstat."""
    low, up, work, mnt = make_stack(tmp_path)
    (low / "f").write_bytes(b"abc")
    os.chmod(low / "f", 0o4755)
    atime = os.lstat(low / "f").st_atime_ns  # before the copy reads the lower
    ov = overlay(low, up, work, mnt)
    try:
        ino = lookup(ov, b"f")
        ch = SetAttr(mode=0o4750, uid=1000, gid=1001, mtime_ns=1_000_000_123)
        attr = await ov.setattr(ino, ch, None, ROOT)
        st = os.lstat(up / "f")
        assert (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns) == (
            0o104750,
            1000,
            1001,
            1_000_000_123,
        )
        assert st.st_atime_ns == atime  # not asked: the lower's
        assert (attr.mode, attr.uid, attr.gid, attr.mtime_ns, attr.ctime_ns) == (
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )
        assert (up / "f").read_bytes() == b"abc"
        check_upper(up, work)
    finally:
        ov.close()


@pytest.mark.parametrize("how", ["rename", "link"])
async def test_copy_found_again_after_forget_marks_new_parent_impure(
    tmp_path: Path, how: str
) -> None:
    """A file copied up in this mount, forgotten by the kernel and looked up again, still
    shows its lower's st_ino (the kernel's inode stays hashed by its lower while cached): a
    move or link of it into another directory marks that one impure, as before the forget.
    With userxattr the copy's overlay.origin is empty, and the found-again node was judged by
    it: no mark, which kernel overlayfs (its inode cached) writes (an unreproduced
    test_random_operations[layerfs-userns] failure of session 11 had this shape)."""
    low, up, work, mnt = make_stack(tmp_path)
    for d in ("a", "d"):
        (low / d).mkdir()
    (low / "a/f").write_bytes(b"f")
    lower_ino = os.lstat(low / "a/f").st_ino
    cfg = MountConfig(
        lowers=(str(low),), upper=str(up), workdir=str(work), mountpoint=str(mnt), userxattr=True
    )
    ov = Overlay(cfg.validate())
    try:
        a, d = lookup(ov, b"a"), lookup(ov, b"d")
        f = lookup(ov, b"a/f")
        await ov.setattr(f, SetAttr(mode=0o600), None, ROOT)  # the copy-up
        ov.forget([(f, 1)])
        again = ov.lookup(a, b"f")
        assert again.ino == lower_ino
        if how == "rename":
            await ov.rename(a, b"f", d, b"f", 0)
        else:
            await ov.link(again.id, d, b"f")
        assert "user.overlay.impure" in os.listxattr(up / "d")
        check_upper(up, work)
    finally:
        ov.close()
