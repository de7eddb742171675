"""MountConfig: everything needed to serve one layer stack, validated before anything is mounted.

Both front ends (``layerfs mount`` and ``mount.layerfs``) build a MountConfig and hand it to
``layerfs.mount.serve``. Validation happens here so that a bad configuration is refused with a
clear message before any directory is written or any mount is made.

The first mount's caller builds one before it mounts, so these are layerfs.records, not
dataclasses (which cost that caller more than Python's start), and nothing here imports
functools (with collections behind it).

Must not import: pyfuse3, trio, dataclasses, functools.
"""

from __future__ import annotations

import os

from layerfs.errors import LayerfsError
from layerfs.records import Record


class IdMapping(Record):
    """One ``uidmapping``/``gidmapping`` range: container id -> host id, ``count`` ids long."""

    __slots__ = ("inner", "outer", "count")  # noqa: RUF023 (positional order)
    inner: int
    outer: int
    count: int

    def __init__(self, inner: int, outer: int, count: int) -> None:
        self._fill(locals())


class IdMappingOptions:
    """``uidmapping=``/``gidmapping=`` as fuse-overlayfs spells them, for both front ends
    (``layerfs mount -o`` and ``mount.layerfs``): fed the options one comma-separated piece
    at a time, it keeps the ranges of the last of each (as the kernel and libfuse, the last
    one wins).

    A range ``C:H:N`` (container id, host id, count) shows an object stored with id C+i as
    owned by H+i and stores H+i as C+i (layerfs.idmap). Ranges follow each other with colons;
    fuse-overlayfs' man page also writes them comma-separated (``0:1000:1,1:100000:65536``): a
    bare triple list right after a mapping continues it. containers/storage writes one leading
    colon (``uidmapping=:0:500000:65536``, podman ``--uidmap``), which fuse-overlayfs' sscanf
    loop skips: so does this. A malformed value is an error: a mount with another mapping than
    asked for would be worse than none.
    """

    __slots__ = ("_last", "gids", "uids")

    def __init__(self) -> None:
        self.uids: list[IdMapping] = []
        self.gids: list[IdMapping] = []
        self._last: tuple[str, list[IdMapping]] | None = None

    def take(self, piece: str) -> bool:
        """Consume PIECE if it is a mapping or continues one; False (and nothing done) if not."""
        name, eq, raw = piece.partition("=")
        if not eq and self._last is not None and _is_id_mapping(piece):
            self._last[1].extend(_parse_id_mapping(piece, self._last[0]))
            _check_id_ranges(self._last[1], self._last[0])
            return True
        self._last = None
        if name not in ("uidmapping", "gidmapping"):
            return False
        if not eq:
            raise LayerfsError(f"option {name} needs a value ({name}=...)")
        ranges = self.uids if name == "uidmapping" else self.gids
        ranges[:] = _parse_id_mapping(raw, name)
        self._last = (name, ranges)
        return True


def _is_id_mapping(text: str) -> bool:
    parts = text.split(":")
    return len(parts) % 3 == 0 and all(p.isdigit() for p in parts)


def _parse_id_mapping(text: str, name: str) -> list[IdMapping]:
    parts = text.removeprefix(":").split(":")
    if len(parts) % 3 != 0 or not all(p.isdigit() for p in parts):
        raise LayerfsError(
            f"invalid {name}={text}: expected CONTAINER_ID:HOST_ID:COUNT[:...] triples"
        )
    nums = [int(p) for p in parts]
    maps = [IdMapping(nums[i], nums[i + 1], nums[i + 2]) for i in range(0, len(nums), 3)]
    if any(m.count == 0 for m in maps):
        raise LayerfsError(f"invalid {name}={text}: a range has a count of 0")
    _check_id_ranges(maps, name)
    return maps


_MAX_ID = 0xFFFF_FFFE  # (uid_t)-1 is no id: chown(-1) changes nothing


def _check_id_ranges(maps: list[IdMapping], name: str) -> None:
    """Refuse what the kernel's uid_map refuses: ids past 32 bits (or -1), and two ranges
    that overlap on either side. Overlapping, an id would be stored as one id and shown as
    another (``0:1000:10:5:2000:10``: a file user 2000 creates is stored as 5, shown as
    owned by 1005)."""
    for m in maps:
        if m.inner + m.count - 1 > _MAX_ID or m.outer + m.count - 1 > _MAX_ID:
            raise LayerfsError(f"invalid {name}: {m.inner}:{m.outer}:{m.count} passes id {_MAX_ID}")
    for side in ("inner", "outer"):
        spans = sorted((getattr(m, side), getattr(m, side) + m.count) for m in maps)
        for i in range(1, len(spans)):  # each against the one before (no itertools import)
            start, end = spans[i][0], spans[i - 1][1]
            if start < end:
                raise LayerfsError(f"invalid {name}: two ranges overlap (id {start})")


MAX_SHARE = 64  # share=K: the most mounts one process may serve

# fsync= values: the kernel's (6.12+), and fuse-overlayfs' 0/1. Its fsync=0 stops fsync
# requests, and it never syncs a copy-up: that is volatile.
FSYNC_MODES = {
    "auto": "auto",
    "strict": "strict",
    "volatile": "volatile",
    "1": "auto",
    "0": "volatile",
}


class MountConfig(Record):
    """A validated description of one mount.

    ``lowers`` is ordered topmost first, as in overlayfs' ``lowerdir=A:B:C``. With no ``upper``
    the stack is read-only. All paths are absolute and normalised by ``validate()``.
    """

    __slots__ = (  # noqa: RUF023 (the fields in order: repr, pickle)
        "lowers", "mountpoint", "upper", "workdir", "foreground", "debug", "allow_other",
        "fsname", "fsync_mode", "redirect_dir", "metacopy", "userxattr", "uid_mappings",
        "gid_mappings", "squash_to_uid", "squash_to_gid", "log_file", "extra_fuse_options",
        "warnings", "merge_pages", "share",
    )  # fmt: skip
    lowers: tuple[str, ...]
    mountpoint: str
    upper: str | None
    workdir: str | None
    foreground: bool
    debug: bool
    allow_other: bool | None  # None: on when running as root
    fsname: str
    # Durability, as kernel overlayfs' fsync= (6.12+): "auto" fsyncs a copy-up of data before
    # it is put in place, "strict" also metadata-only and directory copy-ups, "volatile"
    # nothing, and fsync requests are then ignored (overlayfs "volatile", fuse-overlayfs
    # "fsync=0").
    fsync_mode: str
    # rename lower dirs with a redirect; False: EXDEV (redirect_dir=off); None: on, but off with
    # userxattr, as the kernel (whose userxattr mounts refuse redirect_dir=on)
    redirect_dir: bool | None
    metacopy: bool  # metadata-only copy-up (kernel metacopy=on); off: readable by all
    # write user.overlay.* xattrs (kernel "-o userxattr"); None: when in a user namespace
    userxattr: bool | None
    uid_mappings: tuple[IdMapping, ...]
    gid_mappings: tuple[IdMapping, ...]
    squash_to_uid: int | None
    squash_to_gid: int | None
    log_file: str | None
    extra_fuse_options: tuple[str, ...]
    warnings: tuple[str, ...]
    # "ksm": the daemon's memory offered to the kernel's same-page merging (PR_SET_MEMORY_MERGE);
    # merged only where the host runs ksmd. Off by default: see docs/usage.md for the trade.
    merge_pages: bool
    # "share=K": served by a process that serves up to K mounts (layerfs.share); 1: a daemon of
    # its own. Off by default: see docs/usage.md and docs/reliability.md for the trade.
    share: int

    def __init__(
        self,
        lowers: tuple[str, ...],
        mountpoint: str,
        upper: str | None = None,
        workdir: str | None = None,
        foreground: bool = False,
        debug: bool = False,
        allow_other: bool | None = None,
        fsname: str = "layerfs",
        fsync_mode: str = "auto",
        redirect_dir: bool | None = None,
        metacopy: bool = False,
        userxattr: bool | None = None,
        uid_mappings: tuple[IdMapping, ...] = (),
        gid_mappings: tuple[IdMapping, ...] = (),
        squash_to_uid: int | None = None,
        squash_to_gid: int | None = None,
        log_file: str | None = None,
        extra_fuse_options: tuple[str, ...] = (),
        warnings: tuple[str, ...] = (),
        merge_pages: bool = False,
        share: int = 1,
    ) -> None:
        self._fill(locals())

    @property
    def user_xattrs(self) -> bool:
        """Write ``user.overlay.*``: asked for, or chosen where ``trusted.*`` cannot be set:
        outside the initial user namespace, or by a daemon that is not root."""
        if self.userxattr is not None:
            return self.userxattr
        return in_user_namespace() or os.geteuid() != 0

    @property
    def redirects(self) -> bool:
        """Rename lower directories with a redirect xattr (else EXDEV, and mv copies)."""
        return not self.user_xattrs if self.redirect_dir is None else self.redirect_dir

    @property
    def volatile(self) -> bool:
        """No syncs at all: neither of copy-ups nor of fsync requests."""
        return self.fsync_mode == "volatile"

    def validate(self, *, new_workdir: bool = False) -> MountConfig:
        """Check every directory and their relations; return a normalised copy or raise.

        NEW_WORKDIR: the workdir does not exist yet (the caller makes it once this passes):
        its parent is checked in its place."""
        if not self.lowers:
            raise LayerfsError("no lower layer given (lowerdir is empty)")
        if not 1 <= self.share <= MAX_SHARE:
            raise LayerfsError(f"share={self.share}: expected 1 to {MAX_SHARE} mounts a process")
        lowers = tuple(_existing_dir(p, "lower layer") for p in self.lowers)
        upper = _existing_dir(self.upper, "upper directory") if self.upper else None
        workdir = self.workdir
        if self.metacopy and not self.redirects:
            # a renamed metacopy file finds its data through a redirect (as the kernel says)
            raise LayerfsError("metacopy=on requires redirect_dir=on")
        if upper is None and workdir:
            raise LayerfsError("a workdir needs an upper directory")
        if upper is not None:
            if workdir is None:
                raise LayerfsError("an upper directory needs a workdir (--workdir / workdir=)")
            if new_workdir:
                parent = _existing_dir(os.path.dirname(os.path.abspath(workdir)), "workdir parent")
                workdir = os.path.join(parent, os.path.basename(workdir.rstrip("/")))
            else:
                workdir = _existing_dir(workdir, "workdir")
            if (
                os.stat(os.path.dirname(workdir) if new_workdir else workdir).st_dev
                != os.stat(upper).st_dev
            ):
                raise LayerfsError(
                    f"workdir {workdir} is not on the same filesystem as upper {upper}"
                )
            if _overlaps(upper, workdir):
                raise LayerfsError(f"upper {upper} and workdir {workdir} overlap")
            for low in lowers:
                if _overlaps(upper, low):
                    raise LayerfsError(f"upper {upper} and lower {low} overlap")
                if _overlaps(workdir, low):
                    raise LayerfsError(f"workdir {workdir} and lower {low} overlap")
        mnt = _existing_dir(self.mountpoint, "mount point")
        if os.path.ismount(mnt) and not _is_stale(mnt):
            raise LayerfsError(f"mount point {mnt} is already a mount")
        for layer in (*lowers, *([upper] if upper else [])):
            if _overlaps(layer, mnt):
                raise LayerfsError(f"mount point {mnt} overlaps layer {layer}")
        return self.replace(lowers=lowers, upper=upper, workdir=workdir, mountpoint=mnt)


_IN_USER_NAMESPACE: list[bool] = []  # the answer, once known (not functools: see above)


def in_user_namespace() -> bool:
    """True when this process is not in the initial user namespace (podman rootless, unshare).

    The initial namespace maps every id onto itself: ``/proc/self/uid_map`` is ``0 0 4294967295``
    there and nowhere else (the test podman makes, in rootless.IsRootless).
    """
    if not _IN_USER_NAMESPACE:
        try:
            with open("/proc/self/uid_map", "rb") as fh:
                fields = fh.read().split()
        except OSError:
            fields = [b"0", b"0", b"4294967295"]
        _IN_USER_NAMESPACE.append(fields != [b"0", b"0", b"4294967295"])
    return _IN_USER_NAMESPACE[0]


def _existing_dir(path: str, what: str) -> str:
    if not path:
        raise LayerfsError(f"empty path given for {what}")
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise LayerfsError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise LayerfsError(f"{what} {path}: {e.strerror}") from None
    import stat as _stat

    if not _stat.S_ISDIR(st.st_mode):
        raise LayerfsError(f"{what} {path} is not a directory")
    return real


def _overlaps(a: str, b: str) -> bool:
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def _is_stale(path: str) -> bool:
    try:
        os.stat(path)
    except OSError:
        return True
    return False
