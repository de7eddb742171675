"""The ``layerfs`` command: argument parsing only; the work is in layerfs.mount and the store.

layerfs mount LOWER1[:LOWER2...] [UPPER] MERGED [--workdir W] [-o OPTS] [-f] [--debug]
layerfs umount MERGED
"""

from __future__ import annotations

import argparse
import os
import sys

from layerfs import __version__
from layerfs.config import FSYNC_MODES, IdMappingOptions, MountConfig
from layerfs.errors import LayerfsError

# Options that take no value, and the values the others take (as the kernel's fs_parse:
# anything else is "bad value", not a silent default).
_FLAGS = frozenset({"allow_other", "noallow_other", "volatile", "userxattr", "rw", "ro"})
_VALUES: dict[str, tuple[str, ...]] = {
    "redirect_dir": ("on", "follow", "nofollow", "off"),
    "metacopy": ("on", "off"),
    "ksm": ("on", "off"),  # or bare: on
    "fsync": tuple(FSYNC_MODES),
}


def _share(value: str) -> int:
    """share=K: K, a number of mounts (layerfs.config.MountConfig.validate checks its range)."""
    if not value.isdigit():
        raise LayerfsError(f"option share: bad value {value!r} (expected a number of mounts)")
    return int(value)


def default_workdir(upper: str) -> str:
    """The workdir used when none is given: a hidden sibling of UPPER (same filesystem)."""
    upper = os.path.abspath(upper.rstrip("/"))
    return os.path.join(os.path.dirname(upper), f".{os.path.basename(upper)}.layerfs-work")


def split_lowers(spec: str) -> tuple[str, ...]:
    """Split LOWER1:LOWER2 (``\\:`` escapes a colon in a path, as in overlayfs)."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(spec):
        c = spec[i]
        if c == "\\" and i + 1 < len(spec):
            cur.append(spec[i + 1])
            i += 2
            continue
        if c == ":":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    if any(not p for p in parts):
        raise LayerfsError(f"empty entry in lower layer list {spec!r}")
    return tuple(parts)


def _mount_config(args: argparse.Namespace) -> tuple[MountConfig, bool]:
    """The validated configuration, and whether its (default) workdir was made for it."""
    paths: list[str] = args.paths
    if len(paths) == 2:
        lowers_spec, upper, merged = paths[0], None, paths[1]
    elif len(paths) == 3:
        lowers_spec, upper, merged = paths
    else:
        raise LayerfsError("usage: layerfs mount LOWER1[:LOWER2...] [UPPER] MERGED")
    lowers = split_lowers(lowers_spec)
    warnings: list[str] = []
    kw: dict[str, object] = {}
    extra: list[str] = []
    id_mappings = IdMappingOptions()  # as mount.layerfs: the same parser, the same meaning
    for opt in filter(None, ",".join(args.options or []).split(",")):
        if id_mappings.take(opt):
            continue
        key, eq, value = opt.partition("=")
        if key in _FLAGS and eq:
            raise LayerfsError(f"option {key}: bad value {value!r} (it takes none)")
        if key in _VALUES and value not in _VALUES[key] and not (key == "ksm" and not eq):
            expected = ", ".join(_VALUES[key])
            raise LayerfsError(f"option {key}: bad value {value!r} (expected {expected})")
        if key == "allow_other":
            kw["allow_other"] = True
        elif key == "noallow_other":
            kw["allow_other"] = False
        elif key == "volatile":
            kw["fsync_mode"] = "volatile"  # as mount.layerfs: no syncs at all
        elif key == "redirect_dir":
            kw["redirect_dir"] = value in ("on", "follow")
        elif key == "metacopy":
            kw["metacopy"] = value == "on"
        elif key == "userxattr":
            kw["userxattr"] = True
        elif key == "ksm":
            kw["merge_pages"] = value != "off"
        elif key == "fsync":
            kw["fsync_mode"] = FSYNC_MODES[value]
        elif key == "share":
            kw["share"] = _share(value)
        elif key in ("rw", "dev", "suid", "exec"):
            pass
        elif key in ("nodev", "nosuid", "noexec", "ro"):
            extra.append(key)
        else:
            warnings.append(f"unknown option {opt!r} ignored")
    workdir = args.workdir
    new_workdir = False
    if upper is not None and workdir is None:
        workdir = default_workdir(upper)
        new_workdir = not os.path.lexists(workdir)
    config = MountConfig(
        lowers=lowers,
        upper=upper,
        workdir=workdir,
        mountpoint=merged,
        foreground=args.foreground,
        debug=args.debug,
        log_file=args.log_file,
        extra_fuse_options=tuple(extra),
        uid_mappings=tuple(id_mappings.uids),
        gid_mappings=tuple(id_mappings.gids),
        **kw,  # type: ignore[arg-type]
    )
    # Everything is checked before anything is made: bad input leaves nothing behind (the
    # default workdir is created only once the whole configuration holds).
    config.validate(new_workdir=new_workdir)
    for w in warnings:
        print(f"layerfs: warning: {w}", file=sys.stderr)
    if new_workdir:
        assert workdir is not None
        os.mkdir(workdir, 0o700)
    return config, new_workdir


def _cmd_mount(args: argparse.Namespace) -> int:
    from layerfs.mount import serve

    if args.image:
        from layerfs.store.cli import lowers_for_image

        upper_merged = args.paths
        if len(upper_merged) != 2:
            raise LayerfsError("usage: layerfs mount --image REF UPPER MERGED")
        lowers = lowers_for_image(args.image, args.store)
        args.paths = [":".join(p.replace(":", "\\:") for p in lowers), *upper_merged]
    config, new_workdir = _mount_config(args)
    try:
        serve(config)
    except BaseException:
        if new_workdir and config.workdir is not None:  # a failed mount leaves nothing behind
            from layerfs import _sys  # not at the top: the daemon of -f may load it compiled

            parent, name = os.path.split(config.workdir)
            fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                _sys.remove_tree_at(fd, os.fsencode(name))
            finally:
                os.close(fd)
        raise
    if args.image:
        from layerfs.store.cli import record_upper

        record_upper(args.image, upper_merged[0], args.store, upper_merged[1])
    return 0


def _cmd_umount(args: argparse.Namespace) -> int:
    from layerfs.mount import umount

    umount(args.mountpoint)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="layerfs", description="Copy-on-write layered filesystem.")
    p.add_argument("--version", action="version", version=f"layerfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mount", help="mount a layer stack")
    m.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="LOWER1[:LOWER2...] [UPPER] MERGED (LOWER1 is the topmost lower)",
    )
    m.add_argument("--workdir", help="work directory on the upper's filesystem")
    m.add_argument(
        "-o",
        dest="options",
        action="append",
        metavar="OPTS",
        help="comma-separated options (allow_other, volatile, fsync=auto|strict|volatile, ksm, "
        "share=K, uidmapping=C:H:N[:...], gidmapping=...)",
    )
    m.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground")
    m.add_argument("--debug", action="store_true", help="trace requests (implies logging)")
    m.add_argument("--log-file", help="log here instead of syslog once detached")
    m.add_argument("--image", help="mount an image from the layer store (REF)")
    m.add_argument("--store", help="layer store directory")
    m.set_defaults(func=_cmd_mount)
    u = sub.add_parser("umount", help="unmount a layerfs mount")
    u.add_argument("mountpoint")
    u.set_defaults(func=_cmd_umount)
    try:
        from layerfs.store.cli import register
    except ImportError:
        pass
    else:
        register(sub)
    return p


def _mount_fuse3_shape(argv: list[str]) -> bool:
    """``layerfs SOURCE MERGED -o OPTS``: how mount.fuse3 runs a program named ``layerfs``
    (``mount -t fuse3.layerfs``, an fstab line) when no mount.fuse.layerfs helper exists."""
    return (
        bool(argv)
        and argv[0] not in ("mount", "umount", "image", "diff", "commit")
        and ("-o" in argv or any(a.startswith("-o") for a in argv))
        and not argv[0].startswith("-")
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if _mount_fuse3_shape(argv):
        # the mount helper speaks this argv; exec it from beside us (mount.fuse3 clears PATH)
        here = os.path.dirname(os.path.abspath(sys.argv[0]))
        helper = os.path.join(here, "mount.layerfs")
        if not os.path.exists(helper):
            helper = "mount.layerfs"
        os.execvp(helper, [helper, *argv])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LayerfsError as e:
        # paths are bytes to us: give back the very bytes the user typed, not escapes
        sys.stderr.flush()
        sys.stderr.buffer.write(os.fsencode(f"layerfs: {e}\n"))
        sys.stderr.buffer.flush()
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
