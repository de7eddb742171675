"""Kernel idmapped mounts: the reference for a layerfs mount with ``uidmapping=``/``gidmapping=``.

A range ``S:K:N`` of layerfs (fuse-overlayfs' syntax) shows an object stored with id S+i as
owned by K+i and stores K+i as S+i. An idmapped mount (``mount_setattr(MOUNT_ATTR_IDMAP)``)
whose user namespace maps S+i (inside) to K+i (outside) does the same for the files under it:
``make_vfsuid`` shows on-disk S+i as K+i, ``from_vfsuid`` stores a creator's (or a chown's)
K+i as S+i. Kernel overlayfs accepts such mounts as its lower and upper layers (5.19+) and
creates, copies up and chowns through them, so its upper gets the ids layerfs writes. The
difference: an id outside every range is refused by the kernel (EOVERFLOW: a create by an
unmapped caller, a chown to an unmapped id, a copy-up of an unmapped owner), where layerfs and
fuse-overlayfs store the overflow id 65534 (docs/testing.md).

The layers are detached clones (``open_tree(OPEN_TREE_CLONE)``), never attached anywhere: the
overlay is given them as ``/proc/self/fd/N`` paths (overlayfs takes a private clone of each
layer, which the kernel allows of a detached mount since 6.15; probed by ``skip_reason``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

# (stored, shown, count): a layerfs uidmapping= range, a uid_map line "inside outside count"
Ranges = tuple[tuple[int, int, int], ...]

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPEN_TREE, _SYS_MOUNT_SETATTR = 428, 442  # x86_64 and the generic table alike
_OPEN_TREE_CLONE = 1
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_MOUNT_ATTR_IDMAP = 0x00100000


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(r: int, what: str) -> int:
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return r


def option(ranges: Ranges) -> str:
    """RANGES in layerfs' (fuse-overlayfs') ``uidmapping=`` syntax: ``S:K:N:S2:K2:N2...``."""
    return ":".join(f"{s}:{k}:{n}" for s, k, n in ranges)


_USERNS: dict[tuple[Ranges, Ranges], int] = {}


def userns_fd(uids: Ranges, gids: Ranges) -> int:
    """A descriptor of a user namespace whose uid_map/gid_map are UIDS/GIDS (inside = stored,
    outside = shown); one per mapping for the test process's life (the descriptor keeps the
    namespace after its first process has gone)."""
    key = (uids, gids)
    if key in _USERNS:
        return _USERNS[key]
    proc = subprocess.Popen(["unshare", "--user", "sh", "-c", "read _"], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        own = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 30
        while os.readlink(f"/proc/{proc.pid}/ns/user") == own:  # unshare(2) not done yet
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("unshare --user did not start")
            time.sleep(0.002)
        for name, ranges in (("uid_map", uids), ("gid_map", gids)):
            with open(f"/proc/{proc.pid}/{name}", "w") as fh:
                fh.write("".join(f"{s} {k} {n}\n" for s, k, n in ranges))
        fd = os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        proc.stdin.close()
        proc.wait()
    _USERNS[key] = fd
    return fd


def idmapped_clone(path: str | os.PathLike[str], nsfd: int) -> int:
    """A detached, idmapped clone of the mount at PATH (PATH its root), as a descriptor."""
    fd = _check(
        _libc.syscall(
            _SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(path), _OPEN_TREE_CLONE | os.O_CLOEXEC
        ),
        f"open_tree {path}",
    )
    attr = _MountAttr(_MOUNT_ATTR_IDMAP, 0, 0, nsfd)
    try:
        _check(
            _libc.syscall(
                _SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr)),
            ),
            f"mount_setattr(MOUNT_ATTR_IDMAP) {path}",
        )  # fmt: skip
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def idmapped_layers(
    lowers: Sequence[str], upper: str | None, work: str | None, uids: Ranges, gids: Ranges
) -> Iterator[tuple[list[str], str | None, str | None, list[int]]]:
    """The layers as overlayfs is to be given them: each lower an idmapped clone of its own,
    the upper and the workdir below one clone of their common parent (overlayfs wants them on
    one mount); as ``/proc/self/fd/N`` paths of a process that inherits the descriptors."""
    nsfd = userns_fd(uids, gids)
    fds: list[int] = []
    try:
        out_lowers = []
        for low in lowers:
            fds.append(idmapped_clone(low, nsfd))
            out_lowers.append(f"/proc/self/fd/{fds[-1]}")
        out_upper = out_work = None
        if upper is not None:
            assert work is not None
            parent = os.path.commonpath([upper, work])
            fds.append(idmapped_clone(parent, nsfd))
            base = f"/proc/self/fd/{fds[-1]}"
            out_upper = os.path.join(base, os.path.relpath(upper, parent))
            out_work = os.path.join(base, os.path.relpath(work, parent))
        yield out_lowers, out_upper, out_work, fds
    finally:
        for fd in fds:
            os.close(fd)


_SKIP: list[str | None] = []


def skip_reason(uids: Ranges, gids: Ranges) -> str | None:
    """None when kernel overlayfs mounts over idmapped layers given as detached clones here;
    else why not (once per process)."""
    if _SKIP:
        return _SKIP[0]
    why = None
    with tempfile.TemporaryDirectory(prefix="idmap-probe-") as tmp:
        for n in ("lower", "upper", "work", "merged"):
            os.mkdir(Path(tmp, n))
        try:
            with idmapped_layers([f"{tmp}/lower"], f"{tmp}/upper", f"{tmp}/work", uids, gids) as (
                lowers,
                up,
                wk,
                fds,
            ):
                opts = f"lowerdir={lowers[0]},upperdir={up},workdir={wk}"
                r = subprocess.run(
                    ["mount", "-t", "overlay", "overlay", "-o", opts, f"{tmp}/merged"],
                    pass_fds=fds,
                    capture_output=True,
                    text=True,
                    check=False,
                )
            if r.returncode != 0:
                why = f"kernel overlayfs refuses idmapped layers: {r.stderr.strip()}"
            else:
                subprocess.run(["umount", f"{tmp}/merged"], check=True)
        except OSError as e:
            why = f"no idmapped mounts here: {e}"
    _SKIP.append(why)
    return why
