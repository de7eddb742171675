"""A container start's requests run once in the fork server, on a throwaway stack, before it
forks the daemons (experiment: LAYERFS_WARM=1): what a child then finds already run (CPython's
quickened code, caches built at first use) it need not do again.

No mount: the handlers are called as coroutines; the stack lives in a temporary directory
removed before the server forks. Any failure leaves the server as it was without it."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from typing import Any

ROUNDS = 10  # CPython 3.11 quickens a code object after 8 calls


class _Ctx:
    """What the handlers read of a pyfuse3.RequestContext."""

    uid, gid, pid, umask = 0, 0, 0, 0o022


def warm() -> None:
    import trio

    root = tempfile.mkdtemp(prefix="layerfs-warm.")
    try:
        trio.run(_requests, root)
    except Exception:  # an optimisation: the server serves as well without it
        pass
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _requests(root: str) -> None:
    import pyfuse3

    from layerfs import ops
    from layerfs.attrs import Caller
    from layerfs.config import MountConfig
    from layerfs.files import BIG_IO, NODE_FH
    from layerfs.inodes import ROOT_ID
    from layerfs.overlay import Overlay

    low, up, work, mnt = (os.path.join(root, n) for n in ("lower", "upper", "work", "mnt"))
    dirs = [os.path.join(low, f"d{i}") for i in range(ROUNDS)]  # one copied up a round
    for d in (
        *dirs,
        work,
        mnt,
        os.path.join(up, "run"),
        os.path.join(low, "etc"),
        os.path.join(low, "bin"),
    ):
        os.makedirs(d)
    _write(os.path.join(low, "etc", "passwd"), b"root:x:0:0::/root:/bin/sh\n")
    _write(os.path.join(low, "bin", "busybox"), b"\x7fELF" + bytes(BIG_IO))
    os.symlink("busybox", os.path.join(low, "bin", "sh"))
    ctx: Any = _Ctx()
    cfg = MountConfig(lowers=(low,), upper=up, workdir=work, mountpoint=mnt).validate()
    fs = Overlay(cfg)
    o = ops.Operations(fs)
    fs.files.no_open = True  # node handles, as with the hooks
    reg = pyfuse3.ModeT(stat.S_IFREG | 0o644)
    try:
        for i in range(ROUNDS):
            etc = (await o.lookup(pyfuse3.InodeT(ROOT_ID), b"etc", ctx)).st_ino
            run = (await o.lookup(pyfuse3.InodeT(ROOT_ID), b"run", ctx)).st_ino
            bin_ = (await o.lookup(pyfuse3.InodeT(ROOT_ID), b"bin", ctx)).st_ino
            await o.getattr(pyfuse3.InodeT(ROOT_ID), ctx)
            await o.getattr(etc, ctx)
            for name in (b"hosts", b"resolv.conf", b"hostname"):
                try:
                    await o.lookup(etc, name, ctx)
                except pyfuse3.FUSEError:
                    pass
            passwd = (await o.lookup(etc, b"passwd", ctx)).st_ino
            await o.read(pyfuse3.FileHandleT(NODE_FH | passwd), 0, 4096)
            sh = (await o.lookup(bin_, b"sh", ctx)).st_ino
            await o.readlink(sh, ctx)
            bb = (await o.lookup(bin_, b"busybox", ctx)).st_ino
            await o.read(pyfuse3.FileHandleT(NODE_FH | bb), 0, 128 << 10)
            await o.read(pyfuse3.FileHandleT(NODE_FH | bb), 0, BIG_IO)  # cached: inline
            fh = fs.opendir(ROOT_ID)
            for _ in fs.readdir(fh, 0):
                pass
            fs.releasedir(fh)
            # a create in a lower directory, which copies it up: the engine's call, since the
            # handler would then drop listings from a worker thread (no session to drop from)
            lower_dir = fs.lookup(ROOT_ID, b"d" + str(i).encode()).id
            await fs.mknod(lower_dir, b"new", reg, 0, Caller())
            fs.copyup.changed.clear()
            fs.copyup.listing_changed.clear()
            new = (await o.mknod(run, b"new%d" % i, reg, 0, ctx)).st_ino
            await o.write(pyfuse3.FileHandleT(NODE_FH | new), 0, b"x\n")
            await o.getattr(new, ctx)
            await o.statfs(ctx)
    finally:
        fs.close()
    ops.REQUESTS.clear()  # the scratch stack's requests are no mount's


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
