"""What the caller of a mount does before it returns: the checks that can fail, and the mount.

A live FUSE mount is a mounted /dev/fuse fd: from mount(2) on, the kernel queues requests
(INIT first) until a daemon reads them. So ``mount.layerfs`` opens /dev/fuse, mounts it and
returns in a few milliseconds, and the daemon it leaves behind imports trio and pyfuse3 (about
0.3 s) and then serves the fd it inherited, which libfuse takes as the mount point
``/dev/fd/N`` (fuse_session_mount). Everything that can refuse a mount is checked here, before
the mount is made: the layers can be opened, the workdir is not in use; the daemon then meets
no error a user could cause.

The mount is libfuse's (lib/mount.c): mount(2) of type ``fuse.layerfs`` with
``fd=N,rootmode=...,user_id=...,group_id=...`` when we may (root, or root in a user namespace:
rootless podman mounts inside its namespace); otherwise fusermount3 mounts it and hands the fd
back over a socket (``_FUSE_COMMFD``), as libfuse does for an unprivileged user.

This module runs on every container start, before anything heavy is imported: the mount(2)
call is made here rather than in layerfs._sys, which brings logging with it.
Must not import: pyfuse3, trio, logging.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from layerfs.config import MountConfig
from layerfs.errors import LayerfsError

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
SUBTYPE = "layerfs"
WORKDIR_LOCK_WAIT = 5.0  # seconds a mount waits for the workdir lock of an exiting daemon

# mount(2) flags named by mount options (include/uapi/linux/mount.h); libfuse's table
_FLAGS = {
    "ro": (1, True),
    "rw": (1, False),
    "nosuid": (2, True),
    "suid": (2, False),
    "nodev": (4, True),
    "dev": (4, False),
    "noexec": (8, True),
    "exec": (8, False),
    "sync": (16, True),
    "async": (16, False),
    "dirsync": (128, True),
    "noatime": (1024, True),
    "atime": (1024, False),
}
_KERNEL_OPTIONS = ("default_permissions", "allow_other")
_OPPOSITE = {
    "dev": "nodev",
    "nodev": "dev",
    "suid": "nosuid",
    "nosuid": "suid",
    "exec": "noexec",
    "noexec": "exec",
    "rw": "ro",
    "ro": "rw",
    "atime": "noatime",
    "noatime": "atime",
    "sync": "async",
    "async": "sync",
}


def options(config: MountConfig) -> set[str]:
    """The mount options: kernel permission checks, dev/suid for a container rootfs."""
    opts = {"default_permissions", "dev", "suid"}
    allow_other = config.allow_other if config.allow_other is not None else os.geteuid() == 0
    if allow_other:
        opts.add("allow_other")
    if config.upper is None:
        opts.add("ro")
    for opt in config.extra_fuse_options:  # a caller's nodev must replace our dev, not join it
        opts.discard(_OPPOSITE.get(opt, ""))
        opts.add(opt)
    unknown = sorted(o for o in opts if o not in _FLAGS and o not in _KERNEL_OPTIONS)
    if unknown:
        raise LayerfsError(f"unknown mount option {unknown[0]!r}")
    return opts


def check_layers(config: MountConfig) -> None:
    """Open every layer as the daemon will: a layer we cannot read fails the mount now."""
    for what, path in (
        *(("lower layer", p) for p in config.lowers),
        *((("upper directory", config.upper),) if config.upper else ()),
    ):
        try:
            os.close(os.open(path, O_DIR | os.O_NOFOLLOW))
        except OSError as e:
            raise LayerfsError(f"cannot open layers: {what} {path}: {e.strerror}") from None


def lock_workdir(workdir: str) -> int:
    """Take an exclusive flock on WORKDIR and return its fd, which the daemon inherits and
    holds (the lock belongs to the open file, and the kernel drops it when the daemon dies).

    A second daemon on the same upper (two mounts of one container's snapshot) would corrupt
    it, so its mount fails with EBUSY. A daemon whose mount was just unmounted holds the lock
    until it has exited (containerd's clients unmount a temporary mount of a rootfs and the
    shim mounts it again at once): the mount waits for it up to WORKDIR_LOCK_WAIT seconds.
    Kernel overlayfs refuses a workdir in use only with index=on (a warning otherwise);
    layerfs always refuses.
    """
    try:
        fd = os.open(workdir, O_DIR)
    except OSError as e:
        raise LayerfsError(f"cannot open layers: workdir {workdir}: {e.strerror}") from None
    deadline = time.monotonic() + WORKDIR_LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                why = f"workdir {workdir} is in use by another mount (EBUSY)"
                raise LayerfsError(why) from None
            time.sleep(0.02)


def mount(config: MountConfig, opts: set[str]) -> int:
    """Mount a new FUSE connection at the config's mount point; return its /dev/fuse fd
    (close-on-exec). Raise LayerfsError with the reason when the kernel refuses."""
    target = config.mountpoint
    try:
        rootmode = stat.S_IFMT(os.stat(target).st_mode)
    except OSError as e:
        raise LayerfsError(f"cannot mount {target}: {e.strerror}") from None
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise LayerfsError(f"cannot mount {target}: cannot open /dev/fuse: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(10, 229):
        os.close(fd)
        raise LayerfsError(f"cannot mount {target}: /dev/fuse is not the FUSE device")
    flags = 2 | 4  # libfuse's default: nosuid, nodev, unless asked for suid/dev
    for opt in opts:
        bit, on = _FLAGS.get(opt, (0, False))
        flags = flags | bit if on else flags & ~bit
    data = [f"fd={fd}", f"rootmode={rootmode:o}", f"user_id={os.getuid()}"]
    data.append(f"group_id={os.getgid()}")
    data.extend(o for o in _KERNEL_OPTIONS if o in opts)
    err = _mount(config.fsname, target, f"fuse.{SUBTYPE}", flags, ",".join(data))
    if err == 0:
        return fd
    os.close(fd)
    if err == errno.EPERM and os.geteuid() != 0:
        return _fusermount(config, opts)
    raise LayerfsError(f"cannot mount {target}: mount(2) of fuse.layerfs: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> int:
    """mount(2); return 0 or the errno."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    args = (os.fsencode(source), os.fsencode(target), fstype.encode(), flags, data.encode())
    fn = libc.mount
    fn.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    return 0 if fn(*args) == 0 else ctypes.get_errno()


def _fusermount(config: MountConfig, opts: set[str]) -> int:
    """Have the setuid fusermount3 mount it and pass the fd back (libfuse's
    fuse_mount_fusermount). It refuses suid and dev to a user, so they are not asked."""
    import socket
    import subprocess

    asked = sorted(o for o in opts if o not in ("suid", "dev"))
    asked += [f"fsname={_escape(config.fsname)}", f"subtype={SUBTYPE}"]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        try:
            r = subprocess.run(
                ["fusermount3", "-o", ",".join(asked), "--", config.mountpoint],
                env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())},
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )
        except OSError as e:
            raise LayerfsError(f"cannot mount {config.mountpoint}: fusermount3: {e}") from None
        theirs.close()
        fds: list[int] = []
        if r.returncode == 0:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        why = r.stderr.decode(errors="replace").strip().splitlines()
        raise LayerfsError(f"cannot mount {config.mountpoint}: {why[-1] if why else 'failed'}")
    os.set_inheritable(fds[0], False)
    return fds[0]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,")


def unmount_lazy(mountpoint: str) -> None:
    """Detach MOUNTPOINT if it is a mount: umount2(MNT_DETACH) where we may, else
    fusermount3 -u -z. Neither looks at the mount's root, so neither waits on its daemon."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), 2) == 0 or ctypes.get_errno() != errno.EPERM:
        return
    import subprocess

    subprocess.run(
        ["fusermount3", "-u", "-z", mountpoint],
        check=False,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
