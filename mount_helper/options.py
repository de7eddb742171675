"""The option table of ``mount.layerfs``: turn ``-o`` options into a MountConfig.

Every option lands in exactly one row of the table (docs/containers.md prints it):

* mapped onto MountConfig: lowerdir, lowerdir+, upperdir, workdir, volatile, fsync, userxattr,
  uidmapping, gidmapping, squash_to_uid, squash_to_gid, squash_to_root, allow_other, debug,
  fsname, log, ro/rw, ksm, share;
* passed to the kernel as FUSE mount flags (libfuse accepts exactly these): rw, ro, suid, nosuid,
  dev, nodev, exec, noexec, sync, async, dirsync, atime, noatime;
* accepted and ignored silently: the generic mount(8)/fstab options (defaults, nofail, _netdev,
  auto, user, x-*, ...), SELinux labels, fuse-overlayfs tuning knobs, and overlayfs features
  in their "off" setting;
* accepted and ignored with a one-line warning: everything else, including features layerfs
  does not have (``xattr_permissions=2``, ``index=on``, ...). Never fatal.

A malformed value of an option we do use (``uidmapping=1:2``, ``fsync=x``) is an error: running
with a different mapping than asked for would be worse than not mounting.

As fuse-overlayfs does, a root caller gets ``suid`` (setuid binaries work in containers) and
everyone gets ``noatime``, unless the options say otherwise. ``ro`` with an upperdir mounts the
upper read-only on top of the lowers (fuse-overlayfs keeps the upper and mounts read-only; the
same view, but no workdir is touched).

Must not import: pyfuse3, trio, layerfs.mount, dataclasses (a first mount's caller runs this).
"""

from __future__ import annotations

import os

from layerfs.config import FSYNC_MODES, IdMappingOptions, MountConfig
from layerfs.errors import LayerfsError
from mount_helper.argv import Invocation, decode_value, split_options, split_path_list

# FUSE mount flags libfuse (3.10+) passes to mount(2): name -> (pair key, state).
_FUSE_FLAGS: dict[str, tuple[str, bool]] = {
    "rw": ("ro", False),
    "ro": ("ro", True),
    "suid": ("suid", True),
    "nosuid": ("suid", False),
    "dev": ("dev", True),
    "nodev": ("dev", False),
    "exec": ("exec", True),
    "noexec": ("exec", False),
    "sync": ("sync", True),
    "async": ("sync", False),
    "dirsync": ("dirsync", True),
    "atime": ("atime", True),
    "noatime": ("atime", False),
    # atime variants libfuse does not know: they all mean "update atime" to FUSE.
    "relatime": ("atime", True),
    "strictatime": ("atime", True),
}
_FLAG_SPELLING: dict[tuple[str, bool], str] = {
    ("ro", True): "ro",
    ("ro", False): "rw",
    ("suid", True): "suid",
    ("suid", False): "nosuid",
    ("dev", True): "dev",
    ("dev", False): "nodev",
    ("exec", True): "exec",
    ("exec", False): "noexec",
    ("sync", True): "sync",
    ("sync", False): "async",
    ("dirsync", True): "dirsync",
    ("atime", True): "atime",
    ("atime", False): "noatime",
}

# Accepted and ignored without a word: generic mount(8)/fstab/mount.fuse3 options, libfuse
# session knobs the daemon sets itself, fuse-overlayfs tuning knobs, SELinux labels.
_IGNORED_FLAGS = frozenset(
    {
        "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail",
        "_netdev", "norelatime", "nostrictatime", "lazytime", "nolazytime", "diratime",
        "nodiratime", "symfollow", "nosymfollow", "silent", "loud", "mand", "nomand",
        "iversion", "noiversion", "default_permissions", "allow_root", "auto_unmount",
        "nonempty", "kernel_cache", "auto_cache", "noauto_cache", "clone_fd", "splice_read",
        "splice_write", "splice_move", "no_splice_read", "no_splice_write", "no_splice_move",
        "static_nlink", "noacl", "acl", "ino32_t", "drop_privileges",
        "remount", "bind", "rbind",
    }
)  # fmt: skip
_IGNORED_VALUED = frozenset(
    {
        "context", "fscontext", "defcontext", "rootcontext", "seclabel", "user", "helper",
        "comment", "subtype", "timeout", "threaded", "fast_ino", "writeback", "plugins",
        "xino", "uuid", "max_read", "max_write", "max_readahead", "max_background",
        "congestion_threshold", "max_idle_threads", "max_threads", "setuid", "blksize",
        "entry_timeout", "attr_timeout", "negative_timeout", "fd", "rootmode", "user_id",
        "group_id", "X-mount.mkdir", "X-mount.subdir",
    }
)  # fmt: skip
# Features layerfs lacks, harmless in these settings (anything else: a warning).
_HARMLESS_VALUES: dict[str, frozenset[str]] = {
    "xattr_permissions": frozenset({"0"}),
    "noxattrs": frozenset({"0"}),
    "index": frozenset({"off"}),
    "nfs_export": frozenset({"off"}),
    "verity": frozenset({"off"}),
}
_WHY_UNSUPPORTED: dict[str, str] = {
    "xattr_permissions": "modes and owners are served as stored in the layers",
    "noxattrs": "extended attributes stay enabled",
    "index": "no inode index is kept",
    "nfs_export": "the mount cannot be exported over NFS",
    "verity": "fs-verity digests are not checked",
}


class _State:
    """Options collected so far; last one wins, as in the kernel and libfuse."""

    __slots__ = (
        "allow_other",
        "debug",
        "flags",
        "fsname",
        "fsync_mode",
        "id_mappings",
        "log_file",
        "lowers",
        "merge_pages",
        "metacopy",
        "redirect_dir",
        "share",
        "squash_to_gid",
        "squash_to_root",
        "squash_to_uid",
        "upper",
        "userxattr",
        "warnings",
        "workdir",
    )  # fmt: skip

    def __init__(self, debug: bool, warnings: list[str]) -> None:
        self.lowers: list[str] | None = None
        self.upper: str | None = None
        self.workdir: str | None = None
        self.fsync_mode = "auto"
        self.redirect_dir: bool | None = None  # None: on, off with userxattr (.redirects)
        self.userxattr: bool | None = None  # None: chosen by the user namespace we run in
        self.metacopy = False
        self.merge_pages = False
        self.share = 1
        self.id_mappings = IdMappingOptions()
        self.squash_to_uid: int | None = None
        self.squash_to_gid: int | None = None
        self.squash_to_root = False
        self.allow_other: bool | None = None
        self.debug = debug
        self.fsname = "layerfs"
        self.log_file: str | None = None
        self.flags: dict[str, bool] = {}
        self.warnings = warnings


def build_config(inv: Invocation, cwd: str, euid: int | None = None) -> MountConfig:
    """Interpret ``inv``'s options relative to ``cwd``; return an unvalidated MountConfig.

    Raises LayerfsError for a missing lowerdir or a malformed value of an option we use.
    Directory checks (existence, overlaps) are left to ``MountConfig.validate()``.
    """
    if inv.mountpoint is None:
        raise LayerfsError("no mount point given")
    st = _State(debug=inv.debug, warnings=list(inv.warnings))
    for optstr in inv.option_strings:
        _apply_option_string(st, optstr, cwd)
    if st.lowers is None:
        raise LayerfsError("no lowerdir= option given")
    if not st.lowers:
        raise LayerfsError("lowerdir= is empty")

    lowers, upper, workdir = st.lowers, st.upper, st.workdir
    read_only = st.flags.get("ro", False)
    if read_only and upper is not None:
        lowers, upper, workdir = [upper, *lowers], None, None
    if upper is None and workdir is not None:
        st.warnings.append("workdir is ignored without an upperdir (read-only mount)")
        workdir = None
    if upper is None:
        st.flags["ro"] = True  # a stack without an upper cannot be mounted rw

    squash_uid, squash_gid = st.squash_to_uid, st.squash_to_gid
    if st.squash_to_root:
        squash_uid = 0 if squash_uid is None else squash_uid
        squash_gid = 0 if squash_gid is None else squash_gid

    return MountConfig(
        lowers=tuple(lowers),
        mountpoint=_absolute(inv.mountpoint, cwd),
        upper=upper,
        workdir=workdir,
        foreground=inv.foreground or st.debug,
        debug=st.debug,
        allow_other=st.allow_other,
        fsname=st.fsname,
        fsync_mode=st.fsync_mode,
        redirect_dir=st.redirect_dir,
        userxattr=st.userxattr,
        metacopy=st.metacopy,
        uid_mappings=tuple(st.id_mappings.uids),
        gid_mappings=tuple(st.id_mappings.gids),
        squash_to_uid=squash_uid,
        squash_to_gid=squash_gid,
        log_file=st.log_file,
        extra_fuse_options=_fuse_flags(st.flags, os.geteuid() if euid is None else euid),
        warnings=tuple(st.warnings),
        merge_pages=st.merge_pages,
        share=st.share,
    )


def _apply_option_string(st: _State, optstr: str, cwd: str) -> None:
    for piece in split_options(optstr):
        if not st.id_mappings.take(piece):
            name, eq, raw = piece.partition("=")
            _apply_one(st, name, bool(eq), raw, cwd)


def _apply_one(st: _State, name: str, has_value: bool, raw: str, cwd: str) -> None:
    value = decode_value(raw)
    if name == "lowerdir":
        st.lowers = _parse_lowerdir(_need(name, has_value, raw), cwd)
    elif name == "lowerdir+":
        st.lowers = [*(st.lowers or []), _absolute(_need_path(name, has_value, value), cwd)]
    elif name == "upperdir":
        st.upper = _absolute(_need_path(name, has_value, value), cwd)
    elif name == "workdir":
        st.workdir = _absolute(_need_path(name, has_value, value), cwd)
    elif name == "volatile":
        # overlayfs' volatile and fuse-overlayfs' (which means fsync=0): no syncs at all.
        st.fsync_mode = "volatile"
    elif name == "fsync":
        # the kernel's auto/strict/volatile (6.12+), and fuse-overlayfs' 0/1: fsync=0 stops
        # fsync requests, and fuse-overlayfs never syncs a copy-up: volatile
        mode = _need(name, has_value, value)
        if mode not in FSYNC_MODES:
            raise LayerfsError(f"fsync={mode}: expected auto, strict, volatile, 0 or 1")
        st.fsync_mode = FSYNC_MODES[mode]
    elif name == "redirect_dir":
        # on/follow: renamed lower directories get a redirect; off/nofollow: EXDEV, as the
        # kernel answers, and mv(1) copies instead
        mode = _need(name, has_value, value)
        if mode not in ("on", "follow", "off", "nofollow"):
            raise LayerfsError(f"redirect_dir={mode}: expected on, follow, off or nofollow")
        st.redirect_dir = mode in ("on", "follow")
    elif name == "ksm":  # podman passes data options (name=value) of mountopt: ksm=on
        if has_value and value not in ("on", "off"):
            raise LayerfsError(f"ksm={value}: expected on or off")
        st.merge_pages = not has_value or value == "on"
    elif name == "share":  # share=K: served by a process serving up to K mounts
        k = _need(name, has_value, value)
        if not k.isdigit():
            raise LayerfsError(f"share={k}: expected a number of mounts")
        st.share = int(k)
    elif name == "metacopy":
        mode = _need(name, has_value, value)
        if mode not in ("on", "off"):
            raise LayerfsError(f"metacopy={mode}: expected on or off")
        st.metacopy = mode == "on"
    elif name in ("squash_to_uid", "squash_to_gid"):
        setattr(st, name, _parse_id(name, _need(name, has_value, value)))
    elif name == "userxattr" and not has_value:
        st.userxattr = True
    elif name == "squash_to_root":
        st.squash_to_root = True
    elif name == "allow_other":
        st.allow_other = True
    elif name == "debug":
        st.debug = True
    elif name == "fsname":
        st.fsname = _need(name, has_value, value)
    elif name == "log":
        st.log_file = _absolute(_need_path(name, has_value, value), cwd)
    elif name in _FUSE_FLAGS and not has_value:
        key, state = _FUSE_FLAGS[name]
        st.flags[key] = state
    elif name in _HARMLESS_VALUES:
        if not has_value or value not in _HARMLESS_VALUES[name]:
            shown = f"{name}={value}" if has_value else name
            st.warnings.append(f"{shown} is not supported, ignored ({_WHY_UNSUPPORTED[name]})")
    elif (name in _IGNORED_FLAGS and not has_value) or (name in _IGNORED_VALUED and has_value):
        pass
    elif name.startswith(("x-", "X-")):
        pass  # userspace-only fstab options (x-systemd.*, x-gvfs-*, ...)
    else:
        shown = f"{name}={value}" if has_value else name
        st.warnings.append(f"unknown option {shown!r} ignored")


def _parse_lowerdir(raw: str, cwd: str) -> list[str]:
    entries = split_path_list(raw)
    if len(entries) == 1 and entries[0] == "":
        return []
    if "" in entries[1:-1]:
        raise LayerfsError(
            f"lowerdir={decode_value(raw)}: data-only lower layers ('::') are not supported"
        )
    if "" in entries:
        raise LayerfsError(f"lowerdir={decode_value(raw)}: empty entry")
    return [_absolute(e, cwd) for e in entries]


def _parse_id(name: str, value: str) -> int:
    if not value.isdigit() or int(value) >= 2**32 - 1:
        raise LayerfsError(f"invalid {name}={value}: expected a numeric id")
    return int(value)


def _need(name: str, has_value: bool, value: str) -> str:
    if not has_value:
        raise LayerfsError(f"option {name} needs a value ({name}=...)")
    return value


def _need_path(name: str, has_value: bool, value: str) -> str:
    if not has_value or not value:
        raise LayerfsError(f"option {name} needs a path ({name}=PATH)")
    return value


def _absolute(path: str, cwd: str) -> str:
    # Relative to the caller's cwd: containers/storage runs us from its storage home with
    # lowerdir=l/ABC... entries. Symlinks are resolved later, by MountConfig.validate().
    return path if os.path.isabs(path) else os.path.join(cwd, path)


def _fuse_flags(flags: dict[str, bool], euid: int) -> tuple[str, ...]:
    wanted = dict(flags)
    wanted.setdefault("atime", False)  # fuse-overlayfs mounts noatime by default
    if euid == 0:
        wanted.setdefault("suid", True)  # ... and suid when root, for setuid binaries
    return tuple(_FLAG_SPELLING[(key, state)] for key, state in wanted.items())
