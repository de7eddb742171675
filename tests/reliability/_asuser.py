"""Run a list of file operations, each as a given user, and print their outcomes as JSON.

``python _asuser.py ROOT [--chroot] < ops.json``: every op is ``[uid, gid, name, *args]`` with
paths relative to ROOT (with ``--chroot`` the child chroots into ROOT first, so that symlinks in
the tree resolve inside it, as in a container). Each runs in a fresh child that drops to that
uid/gid with no supplementary groups and no capabilities (what ``setpriv --reuid --regid
--clear-groups`` does) and umask 022; uid 0 keeps root. The outcome is ``["ok", value]`` or
``["err", "EACCES"]``; ``exec`` reports the program's exit status.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable


def _stat(p: str) -> list[object]:
    st = os.lstat(p)
    return [f"{st.st_mode:o}", st.st_uid, st.st_gid, st.st_size if stat.S_ISREG(st.st_mode) else 0]


def _open(p: str, flags: int, data: bytes = b"") -> object:
    fd = os.open(p, flags, 0o666)
    try:
        if data:
            os.write(fd, data)
        if flags & os.O_ACCMODE == os.O_RDONLY:
            return len(os.read(fd, 1 << 16))
    finally:
        os.close(fd)
    return None


def _head(p: str) -> str:
    """The first 64 bytes of file P, as hex (a non-blocking open: a FIFO answers at once)."""
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return os.read(fd, 64).hex()
    finally:
        os.close(fd)


def _renameat2(a: str, b: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, a.encode(), -100, b.encode(), flags) != 0:  # AT_FDCWD
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _then_stat(fn: Callable[..., None]) -> Callable[..., object]:
    """FN(*args), then the lstat of the path it made (its last argument)."""

    def run(*args: str) -> object:
        fn(*args)
        return _stat(args[-1])

    return run


def _chdir_list(p: str) -> list[str]:
    os.chdir(p)
    return sorted(os.listdir("."))


# struct vfs_cap_data, revision 2, effective, cap_net_raw permitted
CAP = bytes.fromhex("01000002" + "00200000" + "00" * 12)


def _has_cap(p: str) -> bool:
    return os.getxattr(p, "security.capability") == CAP


def _create(p: str) -> object:
    _open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, b"new")
    return _stat(p)


def _acl_tool(*argv: str) -> object:
    """Run setfacl/getfacl (the acl package): its output, or the errno text it printed."""
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return ["exit", r.returncode, r.stderr.strip().rsplit(": ", 1)[-1]]
    return r.stdout


OPS: dict[str, Callable[..., object]] = {
    "stat": _stat,
    "read": lambda p: _open(p, os.O_RDONLY),
    "head": _head,
    "append_nb": lambda p: _open(p, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK, b"w"),
    "listxattr": lambda p: sorted(os.listxattr(p, follow_symlinks=False)),
    "mknod_chr": lambda p, major, minor: os.mknod(
        p, 0o644 | stat.S_IFCHR, os.makedev(major, minor)
    ),
    "rename_whiteout": lambda a, b: _renameat2(a, b, 4),
    "write": lambda p: _open(p, os.O_WRONLY | os.O_APPEND, b"w"),
    "open_rdwr": lambda p: _open(p, os.O_RDWR),
    "open_trunc": lambda p: _open(p, os.O_WRONLY | os.O_TRUNC),
    "open_creat": lambda p: _open(p, os.O_WRONLY | os.O_CREAT),
    "create": _create,
    "listdir": lambda p: sorted(os.listdir(p)),
    "mkdir": _then_stat(lambda p: os.mkdir(p, 0o777)),
    "rmdir": os.rmdir,
    "unlink": os.unlink,
    "rename": os.rename,
    "link": lambda a, b: os.link(a, b, follow_symlinks=False),
    "symlink": _then_stat(os.symlink),
    "mknod_fifo": _then_stat(lambda p: os.mkfifo(p, 0o666)),
    "chmod": os.chmod,
    "chown": lambda p, u, g: os.chown(p, u, g, follow_symlinks=False),
    "utime_now": lambda p: os.utime(p, None),
    "utime_set": lambda p: os.utime(p, (1_000_000, 2_000_000)),
    "truncate": os.truncate,
    "setxattr": lambda p, n, v: os.setxattr(p, n, v.encode()),
    "getxattr": lambda p, n: os.getxattr(p, n).decode(),
    "lstat": _stat,
    "readlink": os.readlink,
    "lchown": lambda p, u, g: os.chown(p, u, g, follow_symlinks=False),
    "lutime": lambda p: os.utime(p, (1_000_000, 2_000_000), follow_symlinks=False),
    "lsetxattr": lambda p, n, v: os.setxattr(p, n, v.encode(), follow_symlinks=False),
    "chdir_list": _chdir_list,
    "setcap": lambda p: os.setxattr(p, "security.capability", CAP),
    "hascap": _has_cap,
    "setfacl": lambda *a: _acl_tool("setfacl", *a),
    "getfacl": lambda p: _acl_tool("getfacl", "--omit-header", "--numeric", p),
}


def run_one(root: str, op: list[object], *, chroot: bool = False) -> list[object]:
    uid, gid, name, *args = op
    assert isinstance(uid, int) and isinstance(gid, int) and isinstance(name, str)
    # Paths are the string args that do not start with "=" (a literal, e.g. a symlink target).
    base = "/" if chroot else root
    real = [
        os.path.join(base, a) if isinstance(a, str) and not a.startswith("=") else a for a in args
    ]
    real = [a[1:] if isinstance(a, str) and a.startswith("=") else a for a in real]
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(rfd)
            os.umask(0o022)
            if chroot:
                os.chroot(root)
                os.chdir("/")
            if uid != 0:
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
            if name == "exec":
                prog = str(real[0])
                os.execv(prog, [prog])
            value = OPS[name](*real)
            out: list[object] = ["ok", value]
        except OSError as e:
            out = ["err", errno.errorcode.get(e.errno or 0, str(e.errno))]
        except BaseException as e:
            out = ["crash", repr(e)]
            code = 3
        os.write(wfd, json.dumps(out).encode())
        os._exit(code)
    os.close(wfd)
    data = b""
    while chunk := os.read(rfd, 65536):
        data += chunk
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    if not data:  # exec succeeded: the program's exit status is the outcome
        return ["ok", f"exit {os.waitstatus_to_exitcode(status)}"]
    result: list[object] = json.loads(data)
    return result


def main() -> int:
    root = sys.argv[1]
    chroot = "--chroot" in sys.argv[2:]
    ops = json.load(sys.stdin)
    json.dump([run_one(root, op, chroot=chroot) for op in ops], sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
