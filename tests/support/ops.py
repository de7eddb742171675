"""Operation scripts: the same list of operations applied to two mounts, results compared.

An operation is a tuple ``(name, *args)`` with bytes paths relative to the mount root.
``apply(root, op)`` returns ``("ok", value)`` or ``("err", "ENOENT")``; values are chosen to be
comparable across two filesystems (never inode numbers, never "now" timestamps).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import pickle
import select
import stat
from collections.abc import Callable, Sequence

from . import acls
from .snapshot import MAX_FILE_BYTES, digest, kind, list_dir

Op = tuple[object, ...]
Result = tuple[str, object]

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100


def renameat2(src: bytes, dst: bytes, flags: int) -> None:
    if _libc.renameat2(_AT_FDCWD, src, _AT_FDCWD, dst, ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _stat_value(st: os.stat_result) -> tuple[object, ...]:
    k = kind(st.st_mode)
    return (
        k,
        oct(stat.S_IMODE(st.st_mode)),
        st.st_uid,
        st.st_gid,
        None if k == "dir" else st.st_size,
        # Directory link counts are compared by the snapshots (kernel: 1 for merged dirs).
        None if k == "dir" else st.st_nlink,
    )


# O_NONBLOCK everywhere a path is opened: a fifo in a layer must not hang the test (a fifo
# without reader fails with ENXIO instead); regular files ignore the flag.
_NB = os.O_NONBLOCK


def _read_all(p: bytes) -> bytes:
    fd = os.open(p, os.O_RDONLY | _NB)
    try:
        chunks = []
        total = 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_FILE_BYTES:
                raise AssertionError(f"read of {p!r} did not end after {total} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write(p: bytes, offset: int, data: bytes) -> object:
    fd = os.open(p, os.O_WRONLY | _NB)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


_STATX_MODE, _AT_SYMLINK_NOFOLLOW = 0x2, 0x100
_statx = ctypes.CDLL(None, use_errno=True).statx


def _mode(p: bytes) -> object:
    """The mode statx(2) gives when asked for STATX_MODE alone (coreutils' ``stat -c %a``,
    ``ls``): what the kernel has cached, where lstat's wider mask would make a FUSE mount
    whose cached times are stale ask the daemon again."""
    buf = ctypes.create_string_buffer(256)  # struct statx; stx_mode is the u16 at 28
    if _statx(-100, p, _AT_SYMLINK_NOFOLLOW, _STATX_MODE, buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return oct(stat.S_IMODE(int.from_bytes(buf.raw[28:30], "little")))


def _write_pattern(p: bytes, offset: int, size: int) -> object:
    """A write of SIZE bytes of a pattern (every byte value, then ``z``s) at OFFSET: a big
    one in a log is its size."""
    return _write(p, offset, bytes(range(256)) * (size // 256) + b"z" * (size % 256))


def _create(p: bytes, data: bytes, mode: int = 0o644) -> object:
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        return _stat_value(os.fstat(fd))
    finally:
        os.close(fd)


def _read(p: bytes) -> object:
    st = os.stat(p)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return ("device", st.st_rdev)  # the scripts' devices are /dev/full: endless zeros
    return digest(_read_all(p))


def _rmtree(p: bytes, *, top: bool = True) -> None:
    """rm -rf: a listed name that is gone by the time it is removed is not an error.

    Kernel overlayfs lists whiteouts of a directory that exists in one layer only ("ghosts",
    see snapshot.GHOST); rm -rf copes with them, and so does this.
    """
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        if top:
            raise
        return
    if stat.S_ISDIR(st.st_mode):
        for name in [e.name for e in list_dir(p)]:
            _rmtree(p + b"/" + name, top=False)
        os.rmdir(p)
    else:
        os.unlink(p)


def _unlink_open(p: bytes, data: bytes) -> object:
    """Open, unlink, then write and read through the handle; nlink of the open file."""
    fd = os.open(p, os.O_RDWR | _NB)
    try:
        os.unlink(p)
        gone = not os.path.lexists(p)
        os.pwrite(fd, data, 0)
        back = os.pread(fd, len(data), 0)
        return (gone, back == data, os.fstat(fd).st_nlink)
    finally:
        os.close(fd)


def _unlink_fstat(p: bytes, how: str) -> object:
    """Open (``r``, ``rw``, or ``rw+`` which writes a byte first), unlink, fstat: st_nlink of
    the open file right after the unlink, and after a write through it (None for ``r``)."""
    fd = os.open(p, (os.O_RDONLY if how == "r" else os.O_RDWR) | _NB)
    try:
        if how == "rw+":
            os.pwrite(fd, b"+", 0)
        os.unlink(p)
        first = os.fstat(fd).st_nlink
        if how == "r":
            return (first, None)
        os.pwrite(fd, b"x", 0)
        return (first, os.fstat(fd).st_nlink)
    finally:
        os.close(fd)


def _listdir(p: bytes) -> object:
    # Names lstat cannot find (kernel "ghosts", see snapshot.GHOST) are left out.
    return sorted(e.name for e in list_dir(p) if os.path.lexists(p + b"/" + e.name))


def _listnames(p: bytes) -> object:
    """A plain listing (``ls`` without ``-l``): getdents only, no entry looked up. Its names
    are not the result (a kernel "ghost" is listed); what it writes in the upper is compared
    (the machines' ``list_plain``)."""
    os.listdir(p)
    return None


def _mkdir(p: bytes, mode: int = 0o755) -> object:
    os.mkdir(p, mode)
    return _stat_value(os.lstat(p))


def _makedirs(p: bytes) -> object:
    """mkdir -p: the missing parents too, so that a new directory inside a new (pure upper,
    not opaque) one takes one step."""
    os.makedirs(p)
    return _stat_value(os.lstat(p))


def _mknod_fifo(p: bytes, mode: int = 0o644) -> object:
    os.mkfifo(p, mode)
    return _stat_value(os.lstat(p))


def _symlink(target: bytes, p: bytes) -> object:
    os.symlink(target, p)
    return os.readlink(p)


def _link(src: bytes, dst: bytes) -> object:
    os.link(src, dst, follow_symlinks=False)
    return (os.lstat(src).st_nlink, os.lstat(dst).st_nlink)


def _hardlink_probe(a: bytes, b: bytes, data: bytes) -> object:
    """Write through name ``a``, read through ``b``: what each name shows, and nlinks."""
    _write(a, 0, data)
    return (
        digest(_read_all(a)),
        digest(_read_all(b)),
        os.lstat(a).st_nlink,
        os.lstat(b).st_nlink,
        os.lstat(a).st_ino == os.lstat(b).st_ino,
    )


def _truncate(p: bytes, size: int) -> object:
    os.truncate(p, size)
    return os.lstat(p).st_size


def _utime(p: bytes, ns: int) -> object:
    os.utime(p, ns=(ns, ns), follow_symlinks=False)
    return os.lstat(p).st_mtime_ns


_UTIME_OMIT = (1 << 30) - 2


def _utime_one(p: bytes, which: str, ns: int) -> object:
    """utimensat(2) of one time (WHICH: "atime" or "mtime"), the other UTIME_OMIT, not
    following a symlink (tar's utimensat sets the mtime alone): whether the other stayed, and
    the one set."""
    before = os.lstat(p)
    sec, nsec = divmod(ns, 1_000_000_000)
    omit = 0, _UTIME_OMIT
    times = (ctypes.c_long * 4)(*((sec, nsec, *omit) if which == "atime" else (*omit, sec, nsec)))
    if _libc.utimensat(_AT_FDCWD, p, times, 0x100) != 0:  # AT_SYMLINK_NOFOLLOW
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    after = os.lstat(p)
    if which == "atime":
        return after.st_mtime_ns == before.st_mtime_ns, after.st_atime_ns
    return after.st_atime_ns == before.st_atime_ns, after.st_mtime_ns


def _setxattr(p: bytes, name: bytes, value: bytes) -> object:
    os.setxattr(p, name, value, follow_symlinks=False)
    return os.getxattr(p, name, follow_symlinks=False)


def _removexattr(p: bytes, name: bytes) -> object:
    os.removexattr(p, name, follow_symlinks=False)
    return sorted(os.listxattr(p, follow_symlinks=False))


def _acl_of(p: bytes, name: bytes) -> str:
    try:
        return acls.decode(os.getxattr(p, name, follow_symlinks=False))
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))


def _getfacl(p: bytes) -> object:
    """getfacl -n: the mode, and the access and default ACLs' entries (or the errno of each
    read), decoded: an id in an entry is what a mapping has to get right."""
    return (
        oct(stat.S_IMODE(os.lstat(p).st_mode)),
        _acl_of(p, acls.ACCESS),
        _acl_of(p, acls.DEFAULT),
    )


def _setfacl(p: bytes, which: str, text: str) -> object:
    """setfacl -m/-d: set P's access (WHICH ``access``) or default ACL to TEXT (acls.entries'
    spelling), as an xattr value; then getfacl."""
    name = acls.ACCESS if which == "access" else acls.DEFAULT
    os.setxattr(p, name, acls.acl(text), follow_symlinks=False)
    return _getfacl(p)


def _chmod(p: bytes, mode: int) -> object:
    os.chmod(p, mode)
    return oct(stat.S_IMODE(os.lstat(p).st_mode))


def _chmod_nofollow(p: bytes, mode: int) -> object:
    """fchmodat2(AT_FDCWD, P, MODE, AT_SYMLINK_NOFOLLOW) (Linux 6.6): a symlink's own mode,
    which the VFS refuses (EOPNOTSUPP); anything else as chmod."""
    if _libc.syscall(452, _AT_FDCWD, p, ctypes.c_uint(mode), 0x100) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return oct(stat.S_IMODE(os.lstat(p).st_mode))


def _chown(p: bytes, uid: int, gid: int) -> object:
    os.chown(p, uid, gid, follow_symlinks=False)
    return _stat_value(os.lstat(p))


def _rename(src: bytes, dst: bytes, flags: int = 0) -> object:
    if flags:
        renameat2(src, dst, flags)
    else:
        os.rename(src, dst)
    return _stat_value(os.lstat(dst))


def _append(p: bytes, data: bytes) -> object:
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | _NB)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return os.lstat(p).st_size


def _sparse(p: bytes) -> object:
    """Is the file stored with holes (allocated space well below its size)?"""
    st = os.lstat(p)
    return st.st_blocks * 512 < st.st_size // 2


def _copyup_ino(p: bytes) -> object:
    """Does st_ino survive the first write (a copy-up for a lower file)?"""
    before = os.lstat(p).st_ino
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | _NB)
    try:
        os.write(fd, b"+")
    finally:
        os.close(fd)
    return os.lstat(p).st_ino == before


def _open_trunc(p: bytes, data: bytes) -> object:
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC | _NB)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return os.lstat(p).st_size


# fallocate(2) modes (linux/falloc.h)
KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE = 0x01, 0x02, 0x08, 0x10, 0x20


def _fallocate(p: bytes, offset: int, length: int, mode: int = 0) -> object:
    fd = os.open(p, os.O_WRONLY | _NB)
    try:
        # fallocate(2) itself: glibc's posix_fallocate would hide EOPNOTSUPP behind an
        # emulation by writes (which then fails with EBADF on an O_WRONLY fd).
        if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        os.fsync(fd)
    finally:
        os.close(fd)
    # (not st_blocks: an upper's xattr block counts in it, and the two uppers' xattrs differ)
    return os.lstat(p).st_size


def _mknod(p: bytes, kind: str, mode: int = 0o640) -> object:
    bits = {"chr": stat.S_IFCHR, "blk": stat.S_IFBLK, "sock": stat.S_IFSOCK}[kind]
    os.mknod(p, bits | mode, os.makedev(1, 7) if kind in ("chr", "blk") else 0)
    st = os.lstat(p)
    return (*_stat_value(st), os.major(st.st_rdev), os.minor(st.st_rdev))


def _fsyncdir(p: bytes) -> object:
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return None


def _mmap_write(p: bytes, data: bytes) -> object:
    """Write ``data`` at offset 0 through a shared writable mapping, then msync."""
    fd = os.open(p, os.O_RDWR | _NB)
    try:
        with mmap.mmap(fd, len(data)) as m:
            m[: len(data)] = data
            m.flush()
    finally:
        os.close(fd)
    return digest(_read_all(p))


def _tmpfile(p: bytes, data: bytes) -> object:
    """O_TMPFILE in directory ``p``: write through the anonymous file, report its size."""
    fd = os.open(p, os.O_TMPFILE | os.O_WRONLY, 0o600)
    try:
        os.write(fd, data)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _read_or_err(p: bytes) -> object:
    try:
        return _read(p)  # a device is not read (an exchange may have put one at P)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))


def _held_write(p: bytes, q: bytes, how: str) -> object:
    """Write file P through a descriptor held open (P created when absent, as tar and cp do)
    while P's name changes under it, HOW: ``rename-over`` (Q renamed over P), ``move`` (P
    renamed to Q), ``exchange`` (P and Q exchanged), ``recreate`` (P unlinked and made again),
    ``chmod0``, ``chown``; then write through the descriptor and through the name P. What the
    descriptor reads (and its nlink), and what P and Q read. A daemon that keeps a descriptor
    per file must write through the file the descriptor is open on, never the one the name
    shows now."""
    fd = os.open(p, os.O_RDWR | os.O_CREAT | _NB, 0o644)
    try:
        os.pwrite(fd, b"held-1", 0)
        if how == "rename-over":
            os.rename(q, p)
        elif how == "move":
            os.rename(p, q)
        elif how == "exchange":
            renameat2(q, p, RENAME_EXCHANGE)
        elif how == "recreate":
            os.unlink(p)
            _create(p, b"new")
        elif how == "chmod0":
            os.chmod(p, 0)
        elif how == "chown":
            os.chown(p, 1000, 1000)
        os.pwrite(fd, b"held-2", 3)
        try:
            _write(p, 1, b"N")
        except OSError as e:
            named: object = errno.errorcode.get(e.errno or 0, str(e.errno))
        else:
            named = "ok"
        held = digest(os.pread(fd, 1 << 16, 0))
        return (held, os.fstat(fd).st_nlink, named, _read_or_err(p), _read_or_err(q))
    finally:
        os.close(fd)


# bytes each racing writer writes, at its own offset (1 MiB * its index): from 256 KiB on,
# the daemon writes on a worker thread (files.BIG_IO), and other requests run meanwhile
_RACE_WRITE = 300_000


def _race(p: bytes, mix: str) -> object:
    """Threads let go at once on file P, one per letter of MIX: an action of _ON_FILE (``w``
    write, ``a`` append, ``c`` chmod, ``o`` chown, ``x`` setxattr, ``r`` read, ``s`` stat),
    or ``h``, the write through a descriptor opened before the others start. The actions
    commute, so the end state is one whatever the order: on a lower file, a daemon must copy
    it up once while the others wait or act on the copy, and keep every one's effect. The
    errors (sorted), then the file's content digest, size, mode, owner and ``user.`` xattrs."""
    return _race_on([p], mix)


def _race2(p: bytes, q: bytes, mix: str) -> object:
    """As _race, the threads taking P and Q in turn: the kernel serialises most requests on
    one inode (its lock is held for a write, a setattr, a setxattr), so that the daemon's
    copy-ups overlap most on two files (siblings whose parent both copy up, a directory and
    a file inside it, two names of one lower hard link)."""
    return _race_on([p, q], mix)


def _race_on(targets: list[bytes], mix: str) -> object:
    import threading  # only here: no other operation runs threads

    def target(i: int) -> bytes:
        return targets[i % len(targets)]

    held: dict[int, int] = {}
    for i, c in enumerate(mix):
        if c == "h":
            with contextlib.suppress(OSError):
                held[i] = os.open(target(i), os.O_WRONLY | _NB)
    go = threading.Barrier(len(mix))
    errors: list[str] = []

    def act(i: int, c: str) -> None:
        p = target(i)
        go.wait()
        try:
            if c == "h":
                fd = held.pop(i, -1)
                if fd < 0:
                    raise OSError(errno.EBADF, "no held descriptor")
                _pwrite_own(fd, i)
            else:
                _ON_FILE[c](i, p)
        except OSError as e:
            errors.append(f"{i}{c}:{errno.errorcode.get(e.errno or 0, e.errno)}")

    threads = [threading.Thread(target=act, args=(i, c)) for i, c in enumerate(mix)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fd in held.values():
        os.close(fd)
    out: list[object] = [sorted(errors)]
    for p in targets:
        try:
            st = os.stat(p)
        except OSError as e:
            out.append(errno.errorcode.get(e.errno or 0, e.errno))
            continue
        reg = stat.S_ISREG(st.st_mode)
        xs = sorted(x for x in os.listxattr(p) if x.startswith("user."))
        mode = oct(stat.S_IMODE(st.st_mode))
        out.append((digest(_read_all(p)) if reg else None, st.st_size if reg else None, mode))
        out.append((st.st_uid, st.st_gid, xs))
    return tuple(out)


def _pwrite_own(fd: int, i: int) -> None:
    """Racer I's write, which closes FD: _RACE_WRITE + I bytes (odd sizes) at its own offset."""
    try:
        os.pwrite(fd, bytes([0x30 + i]) * (_RACE_WRITE + i), (1 << 20) * i)
    finally:
        os.close(fd)


_FIXED_NS = 1_600_000_000_000_000_000
# what racer I (a thread of _race, a process of race_users) does to file P, by letter
_ON_FILE: dict[str, Callable[[int, bytes], object]] = {
    "w": lambda i, p: _pwrite_own(os.open(p, os.O_WRONLY | _NB), i),
    "a": lambda i, p: _append(p, b"appended\n"),  # all appenders the same bytes
    "c": lambda i, p: os.chmod(p, 0o640),
    "o": lambda i, p: os.chown(p, 1000, 1000),
    "u": lambda i, p: os.utime(p, ns=(_FIXED_NS, _FIXED_NS)),
    "x": lambda i, p: os.setxattr(p, b"user.race%d" % i, b"v"),
    "r": lambda i, p: _read(p),
    "s": lambda i, p: os.stat(p),
}
# what process I of race_users does under its own name OWN (letter + I) in its directory
_IN_DIR: dict[str, Callable[[int, bytes], object]] = {
    "c": lambda i, own: _create(own, b"c%d" % i),
    "m": lambda i, own: os.mkdir(own, 0o755),
    "f": lambda i, own: os.mkfifo(own, 0o644),
    "k": lambda i, own: os.mknod(own, stat.S_IFCHR | 0o640, os.makedev(1, 7)),
    "l": lambda i, own: os.symlink(b"t%d" % i, own),
}


def race_users(
    root: str | os.PathLike[str], who: Sequence[int], p: bytes, d: bytes, mix: str
) -> Result:
    """Processes let go at once, process I as user WHO[I] (its own gid, no groups) doing
    MIX[I] on file P (_ON_FILE: ``w``, ``u`` utime, ``x``, ``r``, ``s``) or under its own name
    in directory D (_IN_DIR: ``c`` create, ``m``, ``f``, ``k``, ``l``), paths relative to
    ROOT. Two callers' requests in the daemon at once: a copy-up of P or D that one starts
    while another's request waits on it, each answered with its own caller's identity (owner,
    permission checks). The actions commute (no one changes what another may do), so the end
    state is one whatever the order, for mixes that meet no kernel race (a creation in a
    directory beside a copy-up of an entry there: test_write_diff._USER_RACE_MIXES).
    The errors (sorted), then P as _race describes it and
    D's entries (name, kind, owner)."""
    base = os.fsencode(root)
    if escapes(base, p, follow_last=True) or escapes(
        base, (d + b"/" if d else b"") + b"x", follow_last=False
    ):
        return ("skip", None)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pids = []
    for i, (uid, c) in enumerate(zip(who, mix, strict=True)):
        pid = os.fork()
        if pid == 0:  # child: never return into the test runner
            code = 1
            try:
                for fd in (ready_r, go_w, out_r):
                    os.close(fd)
                os.chdir(root)
                if uid:
                    os.setgroups([])
                    os.setgid(uid)
                    os.setuid(uid)
                os.write(ready_w, b"r")
                os.read(go_r, 1)
                try:
                    if c in _IN_DIR:
                        _IN_DIR[c](i, (d + b"/" if d else b"") + f"{c}{i}".encode())
                    else:
                        _ON_FILE[c](i, p)
                    msg = b""
                except OSError as e:
                    msg = f"{i}{c}:{errno.errorcode.get(e.errno or 0, e.errno)}\n".encode()
                os.write(out_w, msg or b"-\n")
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for fd in (ready_w, go_r, out_w):
        os.close(fd)
    for _ in pids:  # every child set up before any acts (one that died never is: go on)
        if not select.select([ready_r], [], [], 60)[0]:
            break
        os.read(ready_r, 1)
    os.write(go_w, b"g" * len(pids))
    with os.fdopen(out_r, "rb") as fh:
        lines = fh.read().split()
    statuses = [os.waitpid(pid, 0)[1] for pid in pids]
    for fd in (ready_r, go_w):
        os.close(fd)
    if any(statuses) or len(lines) != len(pids):  # a bug of the harness: never compared
        raise AssertionError(f"race_users: a process failed: {statuses} {lines}")
    errors = sorted(x.decode() for x in lines if x != b"-")
    full_p, full_d = base + b"/" + p, base + b"/" + d if d else base
    state: list[object] = [errors]
    try:
        st = os.stat(full_p)
        reg = stat.S_ISREG(st.st_mode)
        xs = sorted(x for x in os.listxattr(full_p) if x.startswith("user."))
        state.append((digest(_read_all(full_p)) if reg else None, st.st_size if reg else None))
        state.append((oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid, xs))
    except OSError as e:
        state.append(errno.errorcode.get(e.errno or 0, e.errno))
    try:
        names = sorted(
            n for n in os.listdir(full_d) if n[:1] in "".join(_IN_DIR).encode() and n[1:].isdigit()
        )
        for n in names:
            st = os.lstat(full_d + b"/" + n)
            state.append(
                (n, stat.S_IFMT(st.st_mode), oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid)
            )
    except OSError as e:
        state.append(errno.errorcode.get(e.errno or 0, e.errno))
    return ("ok", tuple(state))


# name -> (function, which positional args are paths)
OPS: dict[str, tuple[Callable[..., object], tuple[int, ...]]] = {
    "stat": (lambda p: _stat_value(os.lstat(p)), (0,)),
    "mode": (_mode, (0,)),
    "read": (_read, (0,)),
    "readlink": (os.readlink, (0,)),
    "listdir": (_listdir, (0,)),
    "listnames": (_listnames, (0,)),
    "listxattr": (lambda p: sorted(os.listxattr(p, follow_symlinks=False)), (0,)),
    "getxattr": (lambda p, n: os.getxattr(p, n, follow_symlinks=False), (0,)),
    "write": (_write, (0,)),
    "append": (_append, (0,)),
    "truncate": (_truncate, (0,)),
    "chmod": (_chmod, (0,)),
    "chown": (_chown, (0,)),
    "chmod_nofollow": (_chmod_nofollow, (0,)),
    "utime": (_utime, (0,)),
    "utime_one": (_utime_one, (0,)),
    "setxattr": (_setxattr, (0,)),
    "setfacl": (_setfacl, (0,)),
    "getfacl": (_getfacl, (0,)),
    "removexattr": (_removexattr, (0,)),
    "create": (_create, (0,)),
    "unlink": (lambda p: os.unlink(p), (0,)),
    "mkdir": (_mkdir, (0,)),
    "makedirs": (_makedirs, (0,)),
    "rmdir": (lambda p: os.rmdir(p), (0,)),
    "rmtree": (_rmtree, (0,)),
    "rename": (_rename, (0, 1)),
    "link": (_link, (0, 1)),
    "symlink": (_symlink, (1,)),
    "mkfifo": (_mknod_fifo, (0,)),
    "unlink_open": (_unlink_open, (0,)),
    "unlink_fstat": (_unlink_fstat, (0,)),
    "hardlink_probe": (_hardlink_probe, (0, 1)),
    "sparse": (_sparse, (0,)),
    "copyup_ino": (_copyup_ino, (0,)),
    "open_trunc": (_open_trunc, (0,)),
    "fallocate": (_fallocate, (0,)),
    "mknod": (_mknod, (0,)),
    "fsyncdir": (_fsyncdir, (0,)),
    "tmpfile": (_tmpfile, (0,)),
    "mmap_write": (_mmap_write, (0,)),
    "held_write": (_held_write, (0, 1)),
    "race": (_race, (0,)),
    "write_pattern": (_write_pattern, (0,)),
    "race2": (_race2, (0, 1)),
}


# Operations that follow a symlink in the last component of their path argument(s).
FOLLOWS_LAST = {
    "read",
    "write",
    "append",
    "truncate",
    "chmod",
    "listdir",
    "listnames",
    "unlink_open",
    "unlink_fstat",
    "hardlink_probe",
    "copyup_ino",
    "open_trunc",
    "fallocate",
    "fsyncdir",
    "tmpfile",
    "mmap_write",
    "held_write",
    "race",
    "race2",
}


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_SYS_OPENAT2 = 437  # one number on every architecture (the unified syscall table)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08


def escapes(root: bytes, path: bytes, *, follow_last: bool) -> bool:
    """Would the kernel's resolution of ``root/path`` leave ``root``?

    Layers hold symlinks such as ``/etc/passwd`` and ``../../..``: an operation that followed
    one would act on the host (a chmod or truncate of the real /etc/passwd, as root) or on
    another test's directories. Such operations are not run.

    Asked of the kernel (openat2 with RESOLVE_BENEATH), not worked out from the names with
    realpath: a mount in a user namespace is reached through ``/proc/PID/root/...``, where
    realpath reads the magic link as ``/`` and goes on in this namespace, beside the mount,
    and so let ``c/b`` through a layer's ``c -> ../../..`` make ``b`` outside both mounts
    (the kernel's first, then the subject's EEXIST: test_random_operations, session 10).
    """
    rel = path.rstrip(b"/") if follow_last else os.path.dirname(path.rstrip(b"/"))
    if not rel:
        return False
    dirfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
        for _ in range(10):  # EAGAIN: a rename raced a ".." (openat2(2)): ask again
            fd = _libc.syscall(
                ctypes.c_long(_SYS_OPENAT2),
                ctypes.c_int(dirfd),
                ctypes.c_char_p(rel),
                ctypes.byref(how),
                ctypes.c_size_t(ctypes.sizeof(how)),
            )
            if fd >= 0:
                os.close(fd)
                return False
            err = ctypes.get_errno()
            if err != errno.EAGAIN:
                # EXDEV: out of ROOT; any other error (ENOENT, ELOOP...) ends the walk inside
                # it, where the operation meets the same error
                return err == errno.EXDEV
        return True  # not settled: do not run it
    finally:
        os.close(dirfd)


def as_user(
    root: str | os.PathLike[str], uid: int, gid: int, op: Op, groups: tuple[int, ...] = ()
) -> Result:
    """Run ``op`` in a child process with these credentials (supplementary GROUPS: none by
    default), in ROOT as its working directory: the directories above ROOT need not be
    searchable by the user (pytest's /tmp/pytest-of-root is 0700; walked from there, every
    operation of the user failed with EACCES under both mounts alike)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the test runner
        code = 1
        try:
            os.close(r)
            os.chdir(root)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            os.write(w, pickle.dumps(apply(".", op)))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        return ("child-failed", status)
    result: Result = pickle.loads(data)
    return result


def apply(root: str | os.PathLike[str], op: Op) -> Result:
    """Run one operation below ``root``; never raises for an OSError.

    An operation whose path would resolve outside ``root`` is not run: ``("skip", None)``.
    ``("as_user", uid, gid, op)`` runs ``op`` with those credentials, ``("as_user", uid, gid,
    op, groups)`` with those supplementary groups too.
    """
    if op[0] == "as_user":
        groups = tuple(op[4]) if len(op) > 4 else ()  # type: ignore[arg-type]
        return as_user(root, int(op[1]), int(op[2]), op[3], groups)  # type: ignore[call-overload, arg-type]
    if op[0] == "race_users":
        return race_users(root, op[1], op[2], op[3], op[4])  # type: ignore[arg-type, misc]
    name, *args = op
    fn, path_args = OPS[str(name)]
    base = os.fsencode(root)
    for i in path_args:
        a = args[i]
        if isinstance(a, bytes) and escapes(base, a, follow_last=name in FOLLOWS_LAST):
            return ("skip", None)
    real = [
        base + b"/" + a if i in path_args and isinstance(a, bytes) else a
        for i, a in enumerate(args)
    ]
    try:
        return ("ok", fn(*real))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno or 0, str(e.errno)))


def apply_all(root: str | os.PathLike[str], script: Sequence[Op]) -> list[Result]:
    return [apply(root, op) for op in script]


def compare_results(
    script: Sequence[Op], expected: Sequence[Result], actual: Sequence[Result]
) -> list[str]:
    return [
        f"op {i} {op!r}: kernel={e!r} subject={a!r}"
        for i, (op, e, a) in enumerate(zip(script, expected, actual, strict=True))
        if e != a
    ]
