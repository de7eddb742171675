"""A bounded fsstress: random namespace and data operations from several processes at once.

xfstests' fsstress is not packaged by Debian (nor is LTP), so this is a port of its idea, not
of its code: each worker draws operations from its own seeded generator over a small set of
names (so that workers collide: renames over each other's files, rmdir of a directory another
one is filling), ignores their errors, as fsstress does, and counts them. The operations
cover what reaches the engine: create, write, truncate, fallocate, mkdir, rmdir, unlink,
rename (plain, NOREPLACE, EXCHANGE, WHITEOUT), link, symlink, mknod (fifo, socket, character
devices, 0/0 included: a name a user may create, that must never become a whiteout), chmod,
chown, xattrs, fsync, reads and listings, and recursive removal.

``run(root, workers, ops, seed)`` returns per-operation counts of successes and errnos.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import json
import os
import random
import shutil
import stat
import traceback
from collections.abc import Callable

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
_libc.renameat2.argtypes += [ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
NAMES = [b"a", b"b", b"c", b"d", b"e", b"f"]


def _check(ret: int) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Worker:
    def __init__(self, root: bytes, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.ops: list[tuple[Callable[[], object], int]] = [
            (self.write, 10),
            (self.truncate, 3),
            (self.fallocate, 3),
            (self.mkdir, 8),
            (self.rmdir, 4),
            (self.unlink, 6),
            (self.rename, 8),
            (self.rename2, 4),
            (self.link, 3),
            (self.symlink, 3),
            (self.mknod, 4),
            (self.chmod, 3),
            (self.chown, 2),
            (self.xattr, 3),
            (self.fsync, 1),
            (self.read, 4),
            (self.listdir, 4),
            (self.rmtree, 1),
        ]
        self.weights = [w for _, w in self.ops]

    def path(self) -> bytes:
        depth = self.rng.choice([1, 1, 2, 2, 3])
        return os.path.join(self.root, *(self.rng.choice(NAMES) for _ in range(depth)))

    def step(self) -> tuple[str, str]:
        (fn, _w) = self.rng.choices(self.ops, self.weights)[0]
        try:
            fn()
            return fn.__name__, "ok"
        except OSError as e:
            return fn.__name__, errno.errorcode.get(e.errno or 0, "?")

    def write(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | self.rng.choice([0, os.O_APPEND, os.O_TRUNC])
        fd = os.open(self.path(), flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        try:
            size = self.rng.choice([1, 100, 5000, 70_000])
            os.pwrite(
                fd, bytes([self.rng.randrange(256)]) * size, self.rng.choice([0, 4096, 1 << 20])
            )
        finally:
            os.close(fd)

    def truncate(self) -> None:
        os.truncate(self.path(), self.rng.choice([0, 10, 9000, 1 << 20]))

    def fallocate(self) -> None:
        fd = os.open(self.path(), os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            mode = self.rng.choice([0, 0x01, 0x03, 0x10, 0x11])
            _check(_libc.fallocate(fd, mode, self.rng.choice([0, 4096]), 8192))
        finally:
            os.close(fd)

    def mkdir(self) -> None:
        os.mkdir(self.path(), self.rng.choice([0o755, 0o700, 0o2775]))

    def rmdir(self) -> None:
        os.rmdir(self.path())

    def unlink(self) -> None:
        os.unlink(self.path())

    def rename(self) -> None:
        os.rename(self.path(), self.path())

    def rename2(self) -> None:
        flags = self.rng.choice([RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT])
        _check(_libc.renameat2(AT_FDCWD, self.path(), AT_FDCWD, self.path(), flags))

    def link(self) -> None:
        os.link(self.path(), self.path(), follow_symlinks=False)

    def symlink(self) -> None:
        # targets stay inside the tree: chmod, truncate and rename2 follow them
        os.symlink(self.rng.choice([b"a", b"b/c", b"/nonexistent-fsstress"]), self.path())

    def mknod(self) -> None:
        kind = self.rng.choice(["fifo", "sock", "chr00", "chr"])
        if kind == "fifo":
            os.mkfifo(self.path(), 0o644)
        elif kind == "sock":
            os.mknod(self.path(), stat.S_IFSOCK | 0o644)
        else:
            dev = os.makedev(0, 0) if kind == "chr00" else os.makedev(1, 3)
            os.mknod(self.path(), stat.S_IFCHR | 0o644, dev)

    def chmod(self) -> None:
        os.chmod(self.path(), self.rng.choice([0o644, 0o600, 0o4755, 0o777]))

    def chown(self) -> None:
        os.chown(
            self.path(),
            self.rng.choice([0, 1000]),
            self.rng.choice([0, 1000]),
            follow_symlinks=False,
        )

    def xattr(self) -> None:
        p = self.path()
        if self.rng.random() < 0.7:
            os.setxattr(p, b"user.s", b"v" * self.rng.choice([1, 300]), follow_symlinks=False)
        else:
            os.removexattr(p, b"user.s", follow_symlinks=False)

    def fsync(self) -> None:
        fd = os.open(self.path(), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> None:
        fd = os.open(self.path(), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            while os.read(fd, 1 << 16):
                pass
        finally:
            os.close(fd)

    def listdir(self) -> None:
        for name in os.listdir(self.path()):
            os.lstat(os.path.join(self.root, name))

    def rmtree(self) -> None:
        p = self.path()
        if not os.path.isdir(p) or os.path.islink(p):
            raise OSError(errno.ENOTDIR, "not a directory")
        shutil.rmtree(p)


def _work(root: bytes, seed: int, ops: int, wfd: int) -> None:
    w = Worker(root, seed)
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(ops):
        name, outcome = w.step()
        counts[f"{name}:{outcome}"] += 1
    os.write(wfd, json.dumps(counts).encode())


def run(root: bytes, workers: int, ops: int, seed: int) -> collections.Counter[str]:
    """Run WORKERS processes of OPS operations each under ROOT; the summed outcome counts."""
    children = []
    for i in range(workers):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(rfd)
                os.umask(0o022)
                _work(root, seed * 100 + i, ops, wfd)
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        os.close(wfd)
        children.append((pid, rfd))
    total: collections.Counter[str] = collections.Counter()
    for pid, rfd in children:
        data = b""
        while chunk := os.read(rfd, 1 << 16):
            data += chunk
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0 or not data:
            raise AssertionError(f"fsstress worker {pid} failed")
        total.update(json.loads(data))
    return total
