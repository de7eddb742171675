"""WRITE on the compiled raw path (LAYERFS_LOOP=craw): answered in C with the data where the
device read put it (``Files.write_now``, no copy into libfuse's buffer), or handed to pyfuse3
where the write must wait (a copy-up first, a nameless lower file's detach, a page cache
that might throttle it: tests/fuse/test_write_throttle.py runs with craw too).

What clients see must be what pyfuse3's path gives them (the poll loop): the same data at
the same offsets for sizes from a byte to a full 1 MiB WRITE, O_APPEND, a descriptor opened
on a lower file before and after its copy-up, an open file unlinked, setuid and setgid
cleared by a non-owner's write and kept by root's, the kernel's own refusals (EBADF), and
the same request counts; and on craw the writes to the upper must be answered by C.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from support.mounts import Layout, subject_named

from layerfs import fusehooks

pytestmark = pytest.mark.fuse

STATS = "trusted.layerfs.statistics"
WRITER = 2000  # a non-owner allowed to write (files 0o6777 / 0o4777)
SIZES = (1, 4095, 4096, 65537, 1 << 20)
FAST = 64  # writes to an upper file, each a WRITE C answers on craw


def _stats(mnt: Path) -> dict[str, int]:
    return dict(json.loads(os.getxattr(mnt, STATS)))


def _as(uid: int, path: Path, data: bytes, flags: int = os.O_WRONLY) -> str:
    """Write DATA to PATH at its start in a child with uid and gid UID: 'ok' or the errno."""
    pid = os.fork()
    if pid == 0:  # the child: never return into the test runner
        code = 0
        try:
            os.chdir(path.parent)  # pytest's directories above are root's, 0700
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fd = os.open(path.name, flags)
            os.pwrite(fd, data, 0)
            os.close(fd)
        except OSError as e:
            code = e.errno or 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return "ok" if code == 0 else errno.errorcode.get(code, str(code))


def _tree(lower: Path) -> None:
    d = lower / "d"
    d.mkdir()
    os.chmod(d, 0o777)
    (d / "low").write_bytes(b"lower data " * 100)
    (d / "gone").write_bytes(b"a lower file unlinked while open")
    for name, mode in (("suid", 0o4777), ("sgid", 0o2777), ("sgid-nx", 0o2767)):
        (d / name).write_bytes(b"#!/bin/sh\n")
        os.chown(d / name, 1000, 1000)
        os.chmod(d / name, mode)


def _seen(mnt: Path) -> list[object]:
    """What a client sees of writes on one mount."""
    out: list[object] = []
    d = mnt / "d"

    def digest(p: Path | int) -> tuple[int, str]:
        data = os.pread(p, 1 << 24, 0) if isinstance(p, int) else p.read_bytes()
        return len(data), hashlib.sha256(data).hexdigest()

    # a new file (MKNOD keeps its descriptor): sizes at offsets, past the end (a hole)
    new = d / "new"
    fd = os.open(new, os.O_CREAT | os.O_RDWR, 0o644)
    off = 0
    for i, size in enumerate(SIZES):
        out.append(os.pwrite(fd, bytes([i + 1]) * size, off))
        off += size + 3 * i  # gaps: holes between writes from the second on
    out.append(os.pwrite(fd, b"overwritten", 2))
    os.close(fd)
    out.append(digest(new))
    # many small writes to an upper file: C answers each on craw
    stats = _stats(mnt)
    fd = os.open(new, os.O_WRONLY)
    for i in range(FAST):
        os.pwrite(fd, b"%04d" % i, 100 + 4 * i)
    os.close(fd)
    after = _stats(mnt)
    out.append(after["req_write"] - stats["req_write"])  # one WRITE each, both paths
    out.append(digest(new))
    # O_APPEND, twice: the kernel sends the offsets
    fd = os.open(new, os.O_WRONLY | os.O_APPEND)
    out.append(os.write(fd, b"tail-1"))
    out.append(os.write(fd, b"tail-2" * 1000))
    os.close(fd)
    out.append(digest(new))
    # a lower file: a descriptor opened before the copy-up reads what the first write copied
    low = d / "low"
    before = os.open(low, os.O_RDONLY)
    fd = os.open(low, os.O_RDWR)
    out.append(os.pwrite(fd, b"FIRST", 5))  # copies up: pyfuse3 serves it on craw too
    out.append(os.pwrite(fd, b"SECOND", 50))  # on the upper now
    out.append(os.pread(before, 64, 0))
    out.append(os.pread(fd, 64, 0))
    os.close(fd)
    out.append(digest(low))
    # the kernel refuses a write through a read-only descriptor itself
    try:
        os.write(before, b"x")
    except OSError as e:
        out.append(errno.errorcode[e.errno or 0])
    os.close(before)
    # an open file unlinked: its pinned descriptor takes the writes (upper and lower file)
    for name in ("new", "gone"):
        fd = os.open(d / name, os.O_RDWR)
        os.unlink(d / name)
        out.append(os.pwrite(fd, b"nameless", 1))
        out.append(os.pwrite(fd, b"again", 20))
        out.append(digest(fd))
        os.close(fd)
    # setuid/setgid: cleared by a non-owner's write (setgid without group execute: only for
    # a writer outside the group), kept by root's; the first write copies up, then the mode
    # is set again for a write C answers
    for name, mode in (("suid", 0o4777), ("sgid", 0o2777), ("sgid-nx", 0o2767)):
        p = d / name
        for who in (WRITER, WRITER, 0):
            os.chmod(p, mode)
            out.append((name, who, _as(who, p, b"#!"), stat.S_IMODE(os.stat(p).st_mode)))
    out.append(_as(WRITER, d / "suid", b"#!", os.O_RDONLY))  # EBADF: the kernel's
    return out


@pytest.mark.parametrize("loop", ["craw"])
def test_writes_as_pyfuse3_serves_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """The same writes through the poll loop (pyfuse3's write handler) and craw: the same
    data, results, modes and request counts; on craw the writes to the upper counted as
    answered by C (``loop_raw``: without WRITE in C it grows by the statistics reads only)."""
    if fusehooks.craw_module() is None:
        pytest.skip("layerfs._craw is not built (scripts/setup.sh builds it: Cython and gcc)")
    seen: dict[str, list[object]] = {}
    raw_writes: dict[str, int] = {}
    for serving in ("poll", loop):
        monkeypatch.setenv("LAYERFS_LOOP", serving)
        layout = Layout.create(tmp_path / serving, 1)
        _tree(layout.lowers[0])
        with layout.mount(subject_named("layerfs")) as m:
            os.chmod(m.mnt, 0o755)
            fd = os.open(m.mnt / "d" / "low", os.O_RDONLY)  # warm the lookups
            os.close(fd)
            stats = _stats(m.mnt)
            f = os.open(m.mnt / "d" / "fast", os.O_CREAT | os.O_WRONLY, 0o644)
            for i in range(FAST):
                os.pwrite(f, b"x" * 512, 512 * i)
            os.close(f)
            after = _stats(m.mnt)
            raw_writes[serving] = after.get("loop_raw", 0) - stats.get("loop_raw", 0)
            seen[serving] = _seen(m.mnt)
    assert raw_writes[loop] >= FAST, raw_writes
    assert raw_writes["poll"] == 0, raw_writes
    assert seen[loop] == seen["poll"]
    assert seen[loop][len(SIZES) + 2] == FAST
    assert seen[loop][-1] == "EBADF"
    modes = [x for x in seen[loop] if isinstance(x, tuple) and len(x) == 4]
    assert modes == [
        (name, who, "ok", kept if who == 0 else cleared)
        for name, kept, cleared in (
            ("suid", 0o4777, 0o777),
            ("sgid", 0o2777, 0o777),
            ("sgid-nx", 0o2767, 0o767),
        )
        for who in (WRITER, WRITER, 0)
    ], modes
