"""CPU per request of layerfs' own handlers, without FUSE: ``python -m benchmarks.handlercost``.

Drives ``ops.Operations`` handlers directly (awaited inside one ``trio.run``, no kernel, no
pyfuse3 loop) on an Overlay over fresh directories shaped as ``benchmarks.requests``' tree:
the adapter (``_errors``, the reply's ``EntryAttributes``) and the engine, with the syscalls
they make. What pyfuse3's loop and the kernel add per request is
``benchmarks.loopcost``'s part (docs/benchmarks.md, session 9 loop). CPU time
(``process_time``), best of the rounds; under callgrind (``--rounds 1 --n 500``) the
instruction counts do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pyfuse3
import trio

from layerfs import ops
from layerfs.config import MountConfig
from layerfs.files import NODE_FH
from layerfs.inodes import ROOT_ID
from layerfs.overlay import Overlay


class _Ctx:
    """What handlers read of a pyfuse3.RequestContext."""

    uid, gid, pid, umask = 0, 0, os.getpid(), 0o022


CTX: Any = _Ctx()


class _Fields:
    """A pyfuse3.SetattrFields (whose attributes only pyfuse3 can set)."""

    update_atime = update_mtime = update_mode = False
    update_uid = update_gid = update_size = False


BLOCK = b"\xa5" * 4096


def _tree(root: Path) -> tuple[Path, Path, Path, Path]:
    low, up, work, mnt = (root / n for n in ("lower", "upper", "work", "mnt"))
    for d in (up, work, mnt, *(low / "usr" / "share" / f"d{i}" for i in range(10))):
        d.mkdir(parents=True)
    (low / "tmp").mkdir()
    return low, up, work, mnt


async def _lookup_id(o: ops.Operations, parent: int, name: bytes) -> int:
    return int((await o.lookup(pyfuse3.InodeT(parent), name, CTX)).st_ino)


async def _run(
    root: Path, n: int, rounds: int, only: set[str]
) -> dict[str, list[float]]:  # name -> seconds per request, one per round
    low, up, work, mnt = _tree(root)
    cfg = MountConfig(lowers=(str(low),), upper=str(up), workdir=str(work), mountpoint=str(mnt))
    o = ops.Operations(Overlay(cfg.validate()))
    o.fs.files.no_open = True  # as with the hooks: node handles, no OPEN
    usr = await _lookup_id(o, ROOT_ID, b"usr")
    share = await _lookup_id(o, usr, b"share")
    d0 = pyfuse3.InodeT(await _lookup_id(o, share, b"d0"))
    tmp = pyfuse3.InodeT(await _lookup_id(o, ROOT_ID, b"tmp"))
    # d0 copied up first, as in an untar after its first file: every round alike
    await o.mknod(d0, b"warm", pyfuse3.ModeT(stat.S_IFREG | 0o644), 0, CTX)
    await o.unlink(d0, b"warm", CTX)
    if only - {"lookup-miss", "find-miss", "getattr-dir", "mknod+write", "untar-file"}:
        only = only | {"mknod"}  # their files
    out: dict[str, list[float]] = {}
    for r in range(rounds):
        await _round(o, d0, tmp, [f"f{r}-{i:06d}".encode() for i in range(n)], only, out)
    return out


async def _round(
    o: ops.Operations,
    d0: pyfuse3.InodeT,
    tmp: pyfuse3.InodeT,
    names: list[bytes],
    only: set[str],
    out: dict[str, list[float]],
) -> None:
    """Each handler in turn over NAMES in D0 (a lower directory, copied up by the first
    create), as a tar's files: made, written, stat'ed, times and mode set, unlinked."""
    n = len(names)
    reg = pyfuse3.ModeT(stat.S_IFREG | 0o644)
    ids: list[pyfuse3.InodeT] = []
    created: list[pyfuse3.InodeT] = []  # mknod+write's files
    untarred: list[pyfuse3.InodeT] = []  # untar-file's
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = reg
    attr.st_atime_ns = attr.st_mtime_ns = 1_000_000_000
    times, mode = _Fields(), _Fields()  # what a tar sets after writing a file
    times.update_atime = times.update_mtime = True
    mode.update_mode = True
    mtime, owner = _Fields(), _Fields()  # tar's utimensat (atime UTIME_OMIT) and fchown
    mtime.update_mtime = True
    owner.update_uid = owner.update_gid = True

    async def miss(i: int) -> object:
        return await o.lookup(d0, names[i], CTX)

    async def find_miss(i: int) -> object:  # the engine's part of lookup-miss
        return o.fs.find(d0, names[i])

    async def mknod(i: int) -> object:
        e = await o.mknod(d0, names[i], reg, 0, CTX)
        ids.append(e.st_ino)
        return e

    async def write(i: int) -> object:
        return await o.write(pyfuse3.FileHandleT(NODE_FH | ids[i]), 0, BLOCK)

    async def mknod_write(i: int) -> object:  # a create as the kernel sends it: the pair
        e = await o.mknod(d0, b"c" + names[i], reg, 0, CTX)
        created.append(e.st_ino)
        return await o.write(pyfuse3.FileHandleT(NODE_FH | e.st_ino), 0, BLOCK)

    async def getattr_(i: int) -> object:
        return await o.getattr(ids[i], CTX)

    async def getattr_dir(i: int) -> object:
        return await o.getattr(tmp, CTX)

    async def hit(i: int) -> object:
        return await o.lookup(d0, names[i], CTX)

    async def getxattr(i: int) -> object:  # the kernel's S_NOSEC check at a first write
        try:
            return await o.getxattr(ids[i], b"security.capability", CTX)
        except pyfuse3.FUSEError:
            return None

    async def setattr_times(i: int) -> object:
        return await o.setattr(ids[i], attr, cast(Any, times), None, CTX)

    async def setattr_mode(i: int) -> object:
        return await o.setattr(ids[i], attr, cast(Any, mode), None, CTX)

    async def setattr_mtime(i: int) -> object:
        return await o.setattr(ids[i], attr, cast(Any, mtime), None, CTX)

    async def setattr_owner(i: int) -> object:
        return await o.setattr(ids[i], attr, cast(Any, owner), None, CTX)

    async def untar_file(i: int) -> object:
        """The requests an untar sends for one 4 KiB member, in the kernel's order
        (docs/benchmarks.md, session 9: requests per file): the parent's GETATTR, the
        negative LOOKUP, MKNOD, GETXATTR at the first write, the member's two WRITEs (it
        straddles two of tar's records a third of the time), SETATTR of the mtime, GETXATTR
        of the chown's kill-priv check, SETATTR of the owner, SETATTR of the mode."""
        name = b"t" + names[i]
        await o.getattr(d0, CTX)
        await o.lookup(d0, name, CTX)
        node = (await o.mknod(d0, name, reg, 0, CTX)).st_ino
        untarred.append(node)
        await getxattr_of(node)
        await o.write(pyfuse3.FileHandleT(NODE_FH | node), 0, BLOCK[:3072])
        await o.write(pyfuse3.FileHandleT(NODE_FH | node), 3072, BLOCK[3072:])
        await o.setattr(node, attr, cast(Any, mtime), None, CTX)
        await getxattr_of(node)
        await o.setattr(node, attr, cast(Any, owner), None, CTX)
        return await o.setattr(node, attr, cast(Any, mode), None, CTX)

    async def getxattr_of(node: pyfuse3.InodeT) -> object:
        try:
            return await o.getxattr(node, b"security.capability", CTX)
        except pyfuse3.FUSEError:
            return None

    async def unlink(i: int) -> object:
        return await o.unlink(d0, names[i], CTX)

    steps: list[tuple[str, Callable[[int], Awaitable[object]]]] = [
        ("lookup-miss", miss),
        ("find-miss", find_miss),
        ("mknod", mknod),
        ("write", write),
        ("mknod+write", mknod_write),
        ("getattr", getattr_),
        ("getattr-dir", getattr_dir),
        ("lookup-hit", hit),
        ("getxattr", getxattr),
        ("setattr-times", setattr_times),
        ("setattr-mode", setattr_mode),
        ("setattr-mtime", setattr_mtime),
        ("setattr-owner", setattr_owner),
        ("untar-file", untar_file),
        ("unlink", unlink),
    ]
    for name, body in steps:
        if name not in only:
            continue
        t = time.process_time()
        for i in range(n):
            await body(i)
        out.setdefault(name, []).append((time.process_time() - t) / n)
        if name == "lookup-hit":  # the kernel's FORGET of those lookups
            await o.forget([(i, 1) for i in ids])
    if "unlink" not in only:
        for name in names[: len(ids)]:
            await o.unlink(d0, name, CTX)
    for name in names[: len(created)]:
        await o.unlink(d0, b"c" + name, CTX)
    for name in names[: len(untarred)]:
        await o.unlink(d0, b"t" + name, CTX)
    await o.forget([(i, 1) for i in ids + created + untarred])  # the FORGET after the unlink


ALL = (
    "lookup-miss,find-miss,mknod,write,mknod+write,getattr,getattr-dir,lookup-hit,getxattr,"
    "setattr-times,setattr-mode,setattr-mtime,setattr-owner,untar-file,unlink"
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="requests per handler and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default=ALL)
    p.add_argument("--dir", default="/var/tmp")
    args = p.parse_args()
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="layerfs-handlercost-", dir=args.dir) as d:
        res = trio.run(_run, Path(d), args.n, args.rounds, only)
    load = os.getloadavg()[0]
    print(f"handler CPU per request, best of {args.rounds} x {args.n} (load {load:.1f})")
    for name in ALL.split(","):
        if name in res:
            runs = " ".join(f"{s * 1e6:.1f}" for s in res[name])
            print(f"  {name:14s} {min(res[name]) * 1e6:7.1f} us   ({runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
