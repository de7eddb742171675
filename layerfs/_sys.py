"""The sharp syscalls: dirfd-relative access that never follows symlinks, and bulk data moves.

Every access to a layer goes through here, relative to an open directory fd and one name at a
time, so nothing in a layer (a symlink, a `..`) can make the daemon touch a file outside it.
Every mutation of the upper is traced at DEBUG (the kernel's ``ovl_do_*`` wrappers).

Kernel analogue: fs/overlayfs/overlayfs.h (ovl_do_*), copy_up.c (ovl_copy_up_file).
Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import signal
import stat
import struct
import sys
import threading
from _ctypes import Structure  # ctypes.Structure's home, which mypyc names (layerfs.compiled)

log = logging.getLogger(__name__)


def _trace(msg: str, *args: bytes | int) -> None:
    """Log a change at DEBUG, decoding names only when someone listens (a hot path)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug(msg, *(os.fsdecode(a) if isinstance(a, bytes) else a for a in args))


O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
FICLONE = 0x40049409
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
CHUNK = 64 << 20  # bytes per copy_file_range call (the kernel splits it further itself)

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
# no argtypes: its arguments are ints, bytes and c_void_p objects made once (file_handle_at),
# which ctypes passes as they are; converting each through argtypes cost a third of the call
_name_to_handle_at = ctypes.CDLL(None, use_errno=True).name_to_handle_at
MAX_HANDLE_SZ = 128
AT_EMPTY_PATH = 0x1000
FS_IOC_GETFSUUID = 0x80111500  # _IOR(0x15, 0, struct fsuuid2 {u8 len; u8 uuid[16]})


_SLASH = ord("/")


def check_name(name: bytes) -> None:
    """Refuse a name that is not a single path component (defence in depth)."""
    # bytes' "in" with an int operand is a memchr; with a bytes one it first tries it as an
    # int, raising and clearing a TypeError: 10x the time (docs/benchmarks.md, session 11)
    if not name or _SLASH in name or name == b"." or name == b".." or 0 in name:
        raise OSError(errno.EINVAL, "invalid name")
    if len(name) > 255:
        raise OSError(errno.ENAMETOOLONG, "name too long")


def check_new_name(name: bytes) -> None:
    """Refuse a name to be created: also no ``.wh.*``, which would be a whiteout marker."""
    check_name(name)
    if name.startswith(b".wh."):
        raise OSError(errno.EPERM, "names starting with .wh. are reserved for whiteouts")


def proc_path(dirfd: int, name: bytes = b"") -> bytes:
    """Return a path naming NAME inside the directory DIRFD, for calls that take no dir_fd.

    The kernel resolves ``/proc/self/fd/N`` to the directory itself, so the only component
    walked is NAME, and callers pass ``follow_symlinks=False``; without NAME they must follow
    (the link itself is procfs': an xattr call on it answers EOPNOTSUPP), and only reach
    DIRFD's directory by it.
    """
    if name:
        return b"/proc/self/fd/%d/%s" % (dirfd, name)
    return b"/proc/self/fd/%d" % dirfd


def lstat_at(dirfd: int, name: bytes) -> os.stat_result:
    return os.stat(name, dir_fd=dirfd, follow_symlinks=False)


def lstat_at_or_none(dirfd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def umask() -> int:
    """The process' umask, read from /proc/self/status (Linux 4.7+) without changing it: in a
    process serving several mounts (layerfs.share) another mount's thread may be creating
    files meanwhile. Elsewhere: read by setting it and back at once."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def exists_at(dirfd: int, name: bytes) -> bool:
    """Whether NAME is in DIRFD (not followed): faccessat2(F_OK), which raises nothing and
    builds no stat on a miss, a third of a failing lstat_at_or_none's instructions (a hit
    costs the same again: for where misses are the rule). An error reads as a miss."""
    return os.access(name, os.F_OK, dir_fd=dirfd, follow_symlinks=False)


def open_dir_at(dirfd: int, name: bytes) -> int:
    check_name(name)  # one plain component: never "..", never a path
    return os.open(name, O_DIR, dir_fd=dirfd)


def open_at(dirfd: int, name: bytes, flags: int, mode: int = 0o600) -> int:
    """Open NAME in DIRFD without following a symlink."""
    check_name(name)
    if flags & (os.O_CREAT | os.O_TRUNC):
        sys.audit("layerfs.open", name, dirfd)  # a crash point (crash_at)
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)


def open_data(dirfd: int, name: bytes, flags: int) -> int:
    """Open regular file NAME in DIRFD for its data, with FLAGS; EIO for anything else.

    The one way layer files are opened for reading or writing data. What a layer holds under
    a name (a planted metacopy or redirect may point anywhere) is checked on an ``O_PATH``
    descriptor before the real open, which then reopens that very inode: a device is never
    opened (its driver would run, a disk would be read) and a FIFO never blocks the serving
    loop waiting for a writer; a symlink is not followed.
    """
    path_fd = open_at(dirfd, name, os.O_PATH)
    try:
        return reopen_data(path_fd, os.fstat(path_fd), flags)
    finally:
        os.close(path_fd)


def reopen_data(path_fd: int, st: os.stat_result, flags: int) -> int:
    """open_data's second half: open for its data, with FLAGS, the file an ``O_PATH``
    descriptor holds, given that descriptor's fstat ST (a caller that needs the stat anyway
    makes one call, not two); EIO for anything but a regular file."""
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EIO, "not a regular file where data was expected")
    return os.open(proc_path(path_fd), (flags & ~os.O_CREAT) | os.O_CLOEXEC)


def open_tmpfile(dirfd: int) -> int:
    """An unnamed regular file (O_TMPFILE, mode 0600) in directory DIRFD, for writing."""
    sys.audit("layerfs.open", b".", dirfd)  # a crash point (crash_at)
    return os.open(b".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dirfd)


def link_tmpfile(fd: int, newdirfd: int, new: bytes) -> None:
    """Give the O_TMPFILE FD the name NEW in NEWDIRFD (EEXIST if taken, as RENAME_NOREPLACE)."""
    _trace("link tmpfile -> %s", new)
    check_name(new)
    os.link(proc_path(fd), new, dst_dir_fd=newdirfd, follow_symlinks=True)


def is_empty_dir_at(dirfd: int, name: bytes) -> bool:
    """True if directory NAME in DIRFD has no entries (whiteouts count as entries)."""
    fd = open_dir_at(dirfd, name)
    try:
        with os.scandir(fd) as it:
            return next(it, None) is None
    finally:
        os.close(fd)


_getdents64 = _libc.getdents64
_getdents64.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
_getdents64.restype = ctypes.c_ssize_t
_DIRENT_NAME = 19  # struct linux_dirent64: d_ino 8, d_off 8, d_reclen 2, d_type 1, d_name


def dir_order(fd: int) -> list[bytes]:
    """Every name of directory FD in the filesystem's readdir order, ``.`` and ``..``
    included: os.scandir leaves them out, and ext4 puts them where their hash falls in a
    one-block directory. Read through a new open file (FD's offset stays as it is)."""
    own = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    buf = ctypes.create_string_buffer(32768)
    names: list[bytes] = []
    try:
        while True:
            n = _getdents64(own, buf, len(buf))
            if n < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            if n == 0:
                return names
            raw = buf.raw[:n]
            pos = 0
            while pos < n:
                start = pos + _DIRENT_NAME
                names.append(raw[start : raw.index(b"\0", start)])
                pos += int.from_bytes(raw[pos + 16 : pos + 18], sys.byteorder)
    finally:
        os.close(own)


def readlink_at(dirfd: int, name: bytes) -> bytes:
    return os.readlink(name, dir_fd=dirfd)


# getxattrat(2) and listxattrat(2) (Linux 6.13; one number on every architecture): an xattr
# of NAME in a directory fd without the /proc/self/fd/N/NAME walk, which costs a
# request 4-8 us more (measured: a missing xattr 8.3 us through /proc and an exception, 0.9 us
# here; a listing 4.6 against 2.0 us). Where the kernel or a seccomp filter refuses them, the
# /proc path as before.
_SYS_GETXATTRAT, _SYS_LISTXATTRAT = 464, 465
_AT_SYMLINK_NOFOLLOW = 0x100
_XATTR_SIZE_MAX = 65536


class _XattrArgs(Structure):
    _fields_ = [("value", ctypes.c_uint64), ("size", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


# syscall(2) with each call's argument types: a variadic function takes integer and pointer
# arguments as a fixed one does on Linux' ABIs, and the types make every integer whole.
_c = ctypes
_getxattrat = _c.CFUNCTYPE(
    _c.c_long,
    _c.c_long,
    _c.c_int,
    _c.c_char_p,
    _c.c_uint,
    _c.c_char_p,
    _c.c_void_p,
    _c.c_size_t,
    use_errno=True,
)(("syscall", _libc))
_listxattrat = _c.CFUNCTYPE(
    _c.c_long,
    _c.c_long,
    _c.c_int,
    _c.c_char_p,
    _c.c_uint,
    _c.c_void_p,
    _c.c_size_t,
    use_errno=True,
)(("syscall", _libc))
_ARGS_SIZE = ctypes.sizeof(_XattrArgs)


class _XattrBuffer(threading.local):
    """A thread's buffer for the calls (worker threads use them too), allocated once."""

    def __init__(self) -> None:
        self.buf = ctypes.create_string_buffer(256)
        self.args = _XattrArgs(ctypes.addressof(self.buf), 256, 0)


_xbuf = _XattrBuffer()


def _xattr_at(nr: int, dirfd: int, name: bytes, attr: bytes | None) -> bytes | None:
    """getxattrat (ATTR's value) or listxattrat (ATTR None: the names, NUL-separated) of NAME
    in DIRFD, not followed (DIRFD itself for b""); None for ENODATA (a common answer: no
    exception for it), OSError as the call's."""
    flags = _AT_SYMLINK_NOFOLLOW if name else AT_EMPTY_PATH
    x = _xbuf
    args = x.args
    while True:
        if attr is None:
            n = _listxattrat(nr, dirfd, name, flags, args.value, args.size)
        else:
            n = _getxattrat(nr, dirfd, name, flags, attr, ctypes.addressof(args), _ARGS_SIZE)
        if n >= 0:
            return ctypes.string_at(args.value, n)
        err = ctypes.get_errno()
        if err == errno.ENODATA:
            return None
        if err != errno.ERANGE or args.size >= _XATTR_SIZE_MAX:
            raise OSError(err, os.strerror(err))
        # grown since asked: the largest an xattr or a listing can be, for this thread
        x.buf = ctypes.create_string_buffer(_XATTR_SIZE_MAX)
        args = x.args = _XattrArgs(ctypes.addressof(x.buf), _XATTR_SIZE_MAX, 0)


def _probe_xattr_at() -> bool:
    """Whether getxattrat and listxattrat answer here (not ENOSYS, nor a filter's EPERM)."""
    try:
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        _xattr_at(_SYS_LISTXATTRAT, fd, b"", None)
        _xattr_at(_SYS_GETXATTRAT, fd, b"", b"user.layerfs.probe")
    except OSError as e:
        return e.errno == errno.ENOTSUP
    finally:
        os.close(fd)
    return True


XATTR_AT = _probe_xattr_at()


def getxattr_or_none_at(dirfd: int, name: bytes, attr: bytes) -> bytes | None:
    """The value of ATTR on NAME in DIRFD (not followed; DIRFD itself for b""), None when it
    has none (ENODATA); any other error raised, as getxattr's."""
    if XATTR_AT:
        return _xattr_at(_SYS_GETXATTRAT, dirfd, name, attr)
    try:
        return os.getxattr(proc_path(dirfd, name), attr, follow_symlinks=not name)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        raise


def getxattr_at(dirfd: int, name: bytes, attr: bytes) -> bytes | None:
    """Return the value of ATTR on NAME (not followed), or None when it is absent/unsupported."""
    try:
        return getxattr_or_none_at(dirfd, name, attr)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return None
        raise


def listxattr_at(dirfd: int, name: bytes) -> list[bytes]:
    try:
        if XATTR_AT:
            listed = _xattr_at(_SYS_LISTXATTRAT, dirfd, name, None)  # never ENODATA
            return listed.split(b"\0")[:-1] if listed else []
        names = os.listxattr(proc_path(dirfd, name), follow_symlinks=not name)
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            return []
        raise
    return [os.fsencode(n) for n in names]


def flistxattr(fd: int) -> list[bytes]:
    """listxattr_at of the file open as FD (not an O_PATH fd): one call, no path to resolve."""
    try:
        names = os.listxattr(fd)
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            return []
        raise
    return [os.fsencode(n) for n in names]


def fgetxattr(fd: int, attr: bytes) -> bytes | None:
    """getxattr_at of the file open as FD (not an O_PATH fd)."""
    try:
        return os.getxattr(fd, attr)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return None
        raise


def setxattr_at(dirfd: int, name: bytes, attr: bytes, value: bytes, flags: int = 0) -> None:
    _trace("setxattr %s %s", name, attr)
    os.setxattr(proc_path(dirfd, name), attr, value, flags, follow_symlinks=not name)


def removexattr_at(dirfd: int, name: bytes, attr: bytes) -> None:
    _trace("removexattr %s %s", name, attr)
    os.removexattr(proc_path(dirfd, name), attr, follow_symlinks=not name)


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int = 0) -> None:
    _trace("rename %s -> %s flags=%d", old, new, flags)
    if flags == 0:
        os.rename(old, new, src_dir_fd=olddirfd, dst_dir_fd=newdirfd)
        return
    sys.audit("layerfs.renameat2", old, olddirfd, new, newdirfd)  # a crash point (crash_at)
    if _renameat2(olddirfd, old, newdirfd, new, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def mkdir_at(dirfd: int, name: bytes, mode: int) -> None:
    _trace("mkdir %s", name)
    os.mkdir(name, mode, dir_fd=dirfd)


def mknod_at(dirfd: int, name: bytes, mode: int, rdev: int = 0) -> None:
    _trace("mknod %s %o", name, mode)
    sys.audit("layerfs.mknod", name, dirfd)  # os.mknod raises no audit event of its own
    os.mknod(name, mode, rdev, dir_fd=dirfd)


def symlink_at(target: bytes, dirfd: int, name: bytes) -> None:
    _trace("symlink %s", name)
    os.symlink(target, name, dir_fd=dirfd)


def link_at(olddirfd: int, old: bytes, newdirfd: int, new: bytes) -> None:
    _trace("link %s -> %s", old, new)
    os.link(old, new, src_dir_fd=olddirfd, dst_dir_fd=newdirfd, follow_symlinks=False)


def unlink_at(dirfd: int, name: bytes) -> None:
    _trace("unlink %s", name)
    os.unlink(name, dir_fd=dirfd)


def rmdir_at(dirfd: int, name: bytes) -> None:
    _trace("rmdir %s", name)
    os.rmdir(name, dir_fd=dirfd)


def chown_at(dirfd: int, name: bytes, uid: int, gid: int) -> None:
    os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)


# cachestat(2) (Linux 6.5; one number on every architecture but alpha): how much of a range of
# a file is in the page cache, without reading it. Where the kernel or a filter refuses it, every
# range counts as not cached (a big READ then goes to a worker thread, as before).
_SYS_CACHESTAT = 451
_PAGE = os.sysconf("SC_PAGE_SIZE")


class _CacheRange(Structure):  # struct cachestat_range
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(Structure):  # struct cachestat
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


_cachestat = _c.CFUNCTYPE(
    _c.c_long, _c.c_long, _c.c_uint, _c.c_void_p, _c.c_void_p, _c.c_uint, use_errno=True
)(("syscall", _libc))


def cached(fd: int, off: int, size: int) -> bool:
    """Whether the SIZE bytes at OFF of the regular file FD (up to its end) are all in the
    page cache, so that a read of them does not wait for the disk."""
    end = min(off + size, os.fstat(fd).st_size)
    if end <= off:
        return True  # at or past the end: the read returns at once
    span, got = _CacheRange(off, end - off), _CacheStat()
    if _cachestat(_SYS_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(got), 0) != 0:
        return False  # ENOSYS before 6.5, EPERM under a filter: as if not cached
    return int(got.cache) >= (end - 1) // _PAGE - off // _PAGE + 1


# fchmodat2(2) (Linux 6.6; one number on every architecture but alpha): a chmod that does not
# follow a symlink in one call, where chmod_at otherwise lstats first (a SETATTR of a mode 3 ->
# 2 syscalls). Where the kernel or a seccomp filter refuses it, the lstat and chmod as before.
_SYS_FCHMODAT2 = 452
_fchmodat2 = _c.CFUNCTYPE(
    _c.c_long, _c.c_long, _c.c_int, _c.c_char_p, _c.c_uint, _c.c_uint, use_errno=True
)(("syscall", _libc))


def _probe_fchmodat2() -> bool:
    """Whether fchmodat2 answers here: asked with a flag it refuses (EINVAL, checked before
    anything is looked up or changed); ENOSYS, or a filter's EPERM, say no."""
    if _fchmodat2(_SYS_FCHMODAT2, -1, b"", 0, 1) == 0:  # never: flag 1 is none of its flags
        return True
    return ctypes.get_errno() == errno.EINVAL


FCHMODAT2 = _probe_fchmodat2()


def chmod_at(dirfd: int, name: bytes, mode: int) -> None:
    """chmod NAME; symlinks have no mode of their own on Linux, so they are left alone."""
    if FCHMODAT2:
        sys.audit("layerfs.chmod", name, dirfd)  # a crash point (crash_at), as os.chmod's
        if _fchmodat2(_SYS_FCHMODAT2, dirfd, name, mode, _AT_SYMLINK_NOFOLLOW) == 0:
            return
        err = ctypes.get_errno()
        # the VFS refuses a symlink's mode (EOPNOTSUPP, as notify_change since 6.6)
        if err != errno.EOPNOTSUPP or not stat.S_ISLNK(lstat_at(dirfd, name).st_mode):
            raise OSError(err, os.strerror(err), name)
        return
    st = lstat_at(dirfd, name)
    if stat.S_ISLNK(st.st_mode):
        return
    os.chmod(name, mode, dir_fd=dirfd)  # not a symlink: the kernel will not follow anything


def utime_at(dirfd: int, name: bytes, atime_ns: int, mtime_ns: int) -> None:
    os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=dirfd, follow_symlinks=False)


# utimensat(2) and futimens(3) with UTIME_OMIT for a time left as it is: os.utime takes both
# times, so a SETATTR of one (tar sets the mtime alone) lstat'ed first for the other.
_UTIME_OMIT = (1 << 30) - 2
_Timespecs = ctypes.c_long * 4  # struct timespec[2]: atime sec, nsec, mtime sec, nsec
_utimensat = _libc.utimensat
_utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
_futimens = _libc.futimens
_futimens.argtypes = [ctypes.c_int, ctypes.c_void_p]


def _timespecs(atime_ns: int | None, mtime_ns: int | None) -> ctypes.Array[ctypes.c_long]:
    a_sec, a_ns = (0, _UTIME_OMIT) if atime_ns is None else divmod(atime_ns, 1_000_000_000)
    m_sec, m_ns = (0, _UTIME_OMIT) if mtime_ns is None else divmod(mtime_ns, 1_000_000_000)
    return _Timespecs(a_sec, a_ns, m_sec, m_ns)


def utimens_at(dirfd: int, name: bytes, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set the times of NAME (not followed; DIRFD itself for b""), None: left as it is."""
    if atime_ns is not None and mtime_ns is not None:
        os.utime(name or b".", ns=(atime_ns, mtime_ns), dir_fd=dirfd, follow_symlinks=False)
        return
    sys.audit("os.utime", name, None, (atime_ns, mtime_ns), dirfd)  # a crash point, as os.utime
    if _utimensat(dirfd, name or b".", _timespecs(atime_ns, mtime_ns), _AT_SYMLINK_NOFOLLOW):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)


def futimens(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set the times of the file open as FD, None: left as it is."""
    if atime_ns is not None and mtime_ns is not None:
        os.utime(fd, ns=(atime_ns, mtime_ns))
        return
    sys.audit("os.utime", fd, None, (atime_ns, mtime_ns), None)  # a crash point, as os.utime
    if _futimens(fd, _timespecs(atime_ns, mtime_ns)):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def remove_tree_at(dirfd: int, name: bytes) -> None:
    """Remove NAME and everything below it, never following symlinks (workdir cleanup).

    A loop, not recursion, holding one directory fd: a leftover thousands of levels deep (a
    crash in a deep copy-up, or planted) must neither exhaust the stack nor the fds and stop
    the mount. Going back up opens ``..``, checked to be the directory we came from.
    """
    st = lstat_at_or_none(dirfd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        unlink_at(dirfd, name)
        return
    fd = open_dir_at(dirfd, name)
    below: list[tuple[bytes, int, int]] = []  # each level entered: (name, its parent's dev, ino)
    try:
        while True:
            subdir = None
            with os.scandir(fd) as it:
                for entry in it:
                    child = os.fsencode(entry.name)
                    if entry.is_dir(follow_symlinks=False):
                        subdir = child
                        break
                    unlink_at(fd, child)
            if subdir is not None:
                pst = os.fstat(fd)
                down = open_dir_at(fd, subdir)
                os.close(fd)
                fd = down
                below.append((subdir, pst.st_dev, pst.st_ino))
                continue
            if not below:
                break
            sub, dev, ino = below.pop()
            up = os.open(b"..", O_DIR, dir_fd=fd)
            os.close(fd)
            fd = up
            ust = os.fstat(fd)
            if (ust.st_dev, ust.st_ino) != (dev, ino):
                raise OSError(errno.ESTALE, "directory moved during removal", sub)
            rmdir_at(fd, sub)
    finally:
        os.close(fd)
    rmdir_at(dirfd, name)


# FICLONE refusals that are the filesystems', never the file's: the destination's cannot
# share extents at all (ext4, tmpfs), or the two files are on different mounts
CLONE_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS})
CLONE_REFUSED = CLONE_UNSUPPORTED | {errno.EXDEV, errno.EINVAL, errno.EBADF, errno.EPERM}


def clone_file(src: int, dst: int) -> int:
    """FICLONE: DST shares all of SRC's extents. 0 when done, else the errno of a refusal
    (CLONE_REFUSED); other errors raise."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
    except OSError as e:
        if e.errno not in CLONE_REFUSED:
            raise
        return e.errno
    return 0


def copy_data(
    src: int, dst: int, length: int, size: int | None = None, *, clone: bool = True
) -> str:
    """Copy LENGTH bytes from SRC to DST keeping holes; return the method used. SIZE: the
    size of SRC, given only where DST is a new empty file. CLONE: try FICLONE first.

    Ladder (ovl_copy_up_file): FICLONE shares extents where the filesystem can reflink; else
    copy_file_range moves data inside the kernel, region by region between SEEK_DATA and
    SEEK_HOLE so that holes stay holes; else sendfile for filesystems without either. Into a
    new file, a source with no hole before LENGTH (most small files) is copied in one region
    and needs no truncate; a DST with data (a metacopy being filled) is cut to LENGTH first,
    so that no byte past it survives a crash before the truncate that asked for it.
    """
    if length == 0:
        return "empty"
    whole = clone and length == (os.fstat(src).st_size if size is None else size)
    if whole and clone_file(src, dst) == 0:
        return "reflink"
    try:
        dense = size is not None and os.lseek(src, 0, os.SEEK_HOLE) >= length
    except OSError:
        dense = False
    if dense:  # the copy's writes give it its size
        return _copy_range(src, dst, 0, length, "copy_file_range")
    os.ftruncate(dst, length)  # the holes of the copy, and its final size
    method = "copy_file_range"
    pos = 0
    while pos < length:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            if e.errno != errno.EINVAL:
                raise
            data = pos  # no SEEK_DATA support: treat everything as data
        if data >= length:
            break
        try:
            hole = min(os.lseek(src, data, os.SEEK_HOLE), length)
        except OSError:
            hole = length
        method = _copy_range(src, dst, data, hole, method)
        pos = hole
    return method


def _copy_range(src: int, dst: int, off: int, end: int, method: str) -> str:
    """Copy bytes [OFF, END) of SRC to the same place in DST; return the method (METHOD, or
    "sendfile" once copy_file_range was refused)."""
    while off < end:
        n = min(CHUNK, end - off)
        done = 0
        if method != "sendfile":
            try:
                done = os.copy_file_range(src, dst, n, off, off)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                method = "sendfile"
        if method == "sendfile":
            os.lseek(dst, off, os.SEEK_SET)
            done = os.sendfile(dst, src, off, n)
        if done == 0:  # the source shrank under us: lowers are immutable, so say so
            raise OSError(errno.EIO, "short read during copy-up")
        off += done
    return method


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with MODE (os.posix_fallocate has none, and emulates by writing)."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


CAP_SYS_ADMIN = 21


def malloc_trim() -> None:
    """Give the free memory of every malloc arena back to the kernel (glibc's malloc_trim(0):
    the free top of each heap, and the free pages inside it)."""
    _libc.malloc_trim(0)


def sup_groups(pid: int) -> frozenset[int]:
    """The supplementary groups of process PID (/proc/PID/status); none when it cannot be read
    (the process is gone): a group check then errs on clearing setgid."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"Groups:"):
                    return frozenset(map(int, line.split()[1:]))
    except (OSError, ValueError):
        pass
    return frozenset()


def has_cap_sys_admin(pid: int) -> bool | None:
    """Whether process PID holds CAP_SYS_ADMIN in our user namespace (the kernel asks for it in
    the initial one, where the daemon normally runs); None when PID cannot be read (gone)."""
    try:
        if os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user"):
            return False
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except OSError:
        return None
    return None


# Python audit events (sys.addaudithook) that announce a change to a filesystem, and where each
# keeps its target(s) as (path, dir_fd) argument positions; ours above cover the calls Python
# does not audit (mknod, renameat2 through ctypes) and creating opens (``open`` carries no
# dir_fd).
_MUTATING_EVENTS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.link": ((0, 2), (1, 3)),
    "os.mkdir": ((0, 2),),
    "os.remove": ((0, 1),),
    "os.removexattr": ((0, None),),
    "os.rename": ((0, 2), (1, 3)),
    "os.rmdir": ((0, 1),),
    "os.setxattr": ((0, None),),
    "os.symlink": ((1, 2),),
    "os.truncate": ((0, None),),
    "os.utime": ((0, 3),),
    "layerfs.mknod": ((0, 1),),
    "layerfs.open": ((0, 1),),
    "layerfs.renameat2": ((0, 1), (2, 3)),
    "layerfs.chmod": ((0, 1),),
}


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _target(path: object, dir_fd: object) -> str:
    """The absolute path an audited call changes (the fds it names resolved)."""
    if isinstance(path, int):
        return _fd_path(path)
    p = os.fsdecode(path)  # type: ignore[arg-type]
    if p.startswith("/proc/self/fd/"):
        num, _, rest = p[len("/proc/self/fd/") :].partition("/")
        return _fd_path(int(num)) + "/" + rest
    if os.path.isabs(p) or not isinstance(dir_fd, int):
        return p
    return _fd_path(dir_fd) + "/" + p


def crash_at(n: int, work_fd: int = -1) -> None:
    """Fault injection: SIGKILL this process just before its Nth change to a filesystem.

    Counted are the calls that change a namespace or metadata (renames, links, unlinks,
    mkdir/mknod/symlink, chmod/chown/utime/truncate, xattrs, opens that create or truncate);
    writes of data are not (an interrupted write is torn under the kernel's overlay too). With
    WORK_FD, changes made only inside that workdir are not counted either: a crash before the
    next change outside it leaves the same layers, and a remount empties the workdir. The audit
    hook runs before the call, so call N never happens: the disk holds exactly what a kill -9
    between calls N-1 and N leaves (nothing is buffered in userspace). Set by the daemon's
    ``LAYERFS_CRASH_AT`` environment variable; tests only.
    """
    count = 0
    work = _fd_path(work_fd) + "/" if work_fd >= 0 else None

    def hook(event: str, args: tuple[object, ...]) -> None:
        nonlocal count
        where = _MUTATING_EVENTS.get(event)
        if where is None:
            return
        if work is not None and all(
            _target(args[p], None if d is None else args[d]).startswith(work) for p, d in where
        ):
            return
        count += 1
        if count >= n:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


class _HandleBuffer(threading.local):
    """A thread's struct file_handle (size, type, MAX_HANDLE_SZ bytes) and the int for its
    mount id, allocated once: a buffer, an int and a pointer made per call were a third of
    a copy-up's origin (callgrind, session 16)."""

    def __init__(self) -> None:
        self.buf = bytearray(8 + MAX_HANDLE_SZ + 4)
        self.view = (ctypes.c_char * len(self.buf)).from_buffer(self.buf)  # the buffer pinned
        address = ctypes.addressof(self.view)
        self.handle = ctypes.c_void_p(address)
        self.mount_id = ctypes.c_void_p(address + 8 + MAX_HANDLE_SZ)


_hbuf = _HandleBuffer()
_HANDLE_HEAD = struct.Struct("=Ii")  # struct file_handle's handle_bytes, handle_type


def file_handle_at(dirfd: int, name: bytes) -> tuple[int, bytes] | None:
    """(type, bytes) of the file handle of NAME (not followed; b"": DIRFD itself), as exportfs
    encodes it for the kernel's overlay.origin; None where the filesystem has no handles."""
    h = _hbuf
    buf = h.buf
    _HANDLE_HEAD.pack_into(buf, 0, MAX_HANDLE_SZ, 0)
    flags = 0 if name else AT_EMPTY_PATH
    if _name_to_handle_at(dirfd, name, h.handle, h.mount_id, flags) != 0:
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
            return None
        raise OSError(err, os.strerror(err), name)
    size, kind = _HANDLE_HEAD.unpack_from(buf)
    return kind, bytes(buf[8 : 8 + size])


def fs_uuid(fd: int) -> bytes:
    """The s_uuid of the filesystem holding FD (FS_IOC_GETFSUUID); 16 zero bytes without one."""
    buf = bytearray(17)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFSUUID, buf)
    except OSError:
        return bytes(16)
    return bytes(buf[1 : 1 + min(buf[0], 16)]).ljust(16, b"\0")


_PR_SET_MEMORY_MERGE = 67  # Linux 6.4; kept over fork and exec


def merge_pages() -> bool:
    """Offer all of this process's anonymous memory, now and later, to the kernel's same-page
    merging (KSM). Daemons forked from one server hold thousands of identical pages (the
    interpreter's reference counts and code caches written back to the same bytes); ksmd, where
    the host runs it, keeps one copy. False (and nothing changed) where the kernel refuses."""
    if _libc.prctl(_PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0:
        return True
    log.warning("ksm: PR_SET_MEMORY_MERGE refused: %s", os.strerror(ctypes.get_errno()))
    return False
