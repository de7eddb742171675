"""Parse the command line of ``mount.layerfs`` and split its ``-o`` option strings.

Two argv shapes reach us:

* ``[-f] [-d] [-o OPTS]... MERGED``: containers/storage (podman, buildah, CRI-O) and Docker's
  fuse-overlayfs driver run ``PROGRAM -o lowerdir=...,upperdir=...,workdir=... MERGED``.
* ``SOURCE MERGED [-o OPTS] [-s] [-f] [-n] [-v] [-t TYPE] [-N NS]``: mount(8) runs
  ``/sbin/mount.fuse.layerfs`` this way (util-linux libmount ``exec_helper``), and mount.fuse3
  runs ``layerfs SOURCE MERGED -o OPTS``. In this shape, when called under a ``mount.fuse*``
  name, ``-f`` is mount(8)'s "fake" flag, not "foreground".

Option strings are split on commas as the kernel's overlayfs does (``ovl_next_opt`` in
fs/overlayfs/params.c): a backslash escapes the next character, so ``\\,`` and ``\\:`` keep a
comma or colon inside a path; as in libmount, a comma inside double quotes (``context="a,b"``)
does not split either. Values are unquoted and unescaped only when they are used
(``decode_value``, ``split_path_list``), so a lowerdir can still be split on its unescaped colons.

Must not import: pyfuse3, trio, layerfs.mount (this runs on every container start),
dataclasses, typing (a first mount's caller runs it: layerfs.records).
"""

from __future__ import annotations

from layerfs.errors import LayerfsError
from layerfs.records import Record
from mount_helper import PROG

TYPE_CHECKING = False  # not typing's: importing typing costs the caller ~5 ms
if TYPE_CHECKING:
    from collections.abc import Sequence

USAGE = f"""\
usage: {PROG} [-f] [-d] -o lowerdir=L1[:L2...][,upperdir=U,workdir=W][,OPT...] MERGED
       {PROG} SOURCE MERGED -o OPTS        (as mount(8) and mount.fuse3 run it)
       {PROG} --version | --help
       {PROG} --install-mount-helper[=DIR]  (link DIR/mount.fuse.layerfs, default /sbin)

Mounts a layerfs layer stack at MERGED and returns once the mount is live; the daemon
detaches and exits by itself when MERGED is unmounted (fusermount3 -u MERGED).

  -o OPTS    comma-separated options; may be repeated. Paths may escape ',' and ':' with '\\'.
  -f         stay in the foreground (under the name mount.fuse.layerfs: mount(8)'s fake mount)
  -d, --debug  log every request to stderr (implies -f)
  -V, --version  print the version
  -h, --help     print this help

Options: lowerdir, upperdir, workdir, volatile, fsync=auto|strict|volatile|0|1,
uidmapping=, gidmapping=, squash_to_uid=, squash_to_gid=, squash_to_root, ro, rw,
allow_other, fsname=, log=FILE, and the generic mount options (dev, suid, exec, noatime,
nofail, x-*, ...). Unknown options are ignored with a warning. See docs/containers.md.
"""


class UsageError(LayerfsError):
    """The command line itself is malformed (not an option value)."""


class Invocation(Record):
    """What the command line asks for, before any option is interpreted.

    ``option_strings`` are the raw ``-o`` arguments in command-line order; ``mountpoint`` is as
    given (relative to the caller's cwd). ``action`` is one of mount, version, help, install.
    """

    __slots__ = (  # noqa: RUF023 (the fields in order: repr, pickle)
        "action", "mountpoint", "source", "option_strings", "foreground", "debug", "fake",
        "fstype", "install_dir", "warnings",
    )  # fmt: skip
    action: str
    mountpoint: str | None
    source: str | None
    option_strings: tuple[str, ...]
    foreground: bool
    debug: bool
    fake: bool
    fstype: str | None
    install_dir: str | None
    warnings: tuple[str, ...]

    def __init__(
        self,
        action: str = "mount",
        mountpoint: str | None = None,
        source: str | None = None,
        option_strings: tuple[str, ...] = (),
        foreground: bool = False,
        debug: bool = False,
        fake: bool = False,
        fstype: str | None = None,
        install_dir: str | None = None,
        warnings: tuple[str, ...] = (),
    ) -> None:
        self._fill(locals())


def called_as_mount_helper(prog: str) -> bool:
    """True when argv[0] is the name mount(8) uses for our helper (``mount.fuse.layerfs``)."""
    base = prog.rsplit("/", 1)[-1]
    return base.startswith(("mount.fuse.", "mount.fuse3.", "mount.fuseblk."))


def parse_argv(argv: Sequence[str], prog: str = PROG) -> Invocation:
    """Parse ``argv`` (without argv[0]) into an Invocation; raise UsageError when malformed.

    Flags may come before, between or after the positional arguments (mount(8) puts them
    after, containers/storage before); ``--`` ends the flags.
    """
    helper_mode = called_as_mount_helper(prog)
    positionals: list[str] = []
    opts: list[str] = []
    foreground = debug = fake = False
    fstype: str | None = None
    warnings: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            positionals.extend(argv[i:])
            break
        if arg in ("-V", "--version"):
            return Invocation(action="version")
        if arg in ("-h", "--help"):
            return Invocation(action="help")
        if arg == "--install-mount-helper" or arg.startswith("--install-mount-helper="):
            _, _, where = arg.partition("=")
            return Invocation(action="install", install_dir=where or "/sbin")
        if arg in ("-d", "--debug"):
            debug = foreground = True
        elif arg == "-f":
            if helper_mode:
                fake = True
            else:
                foreground = True
        elif arg in ("-s", "-n", "-v"):
            pass  # single-threaded (libfuse) or sloppy / no-mtab / verbose (mount(8))
        elif arg in ("-r", "-w"):
            opts.append("ro" if arg == "-r" else "rw")
        elif arg in ("-o", "-t", "-N"):
            if i >= len(argv):
                raise UsageError(f"option {arg} needs an argument")
            value = argv[i]
            i += 1
            if arg == "-o":
                opts.append(value)
            elif arg == "-t":
                fstype = value
            else:
                raise UsageError("mounting into another mount namespace (-N) is not supported")
        elif arg.startswith("-o") and len(arg) > 2:
            opts.append(arg[2:])
        elif arg.startswith("-t") and len(arg) > 2:
            fstype = arg[2:]
        elif arg.startswith("-") and arg != "-":
            warnings.append(f"unknown flag {arg} ignored")
        else:
            positionals.append(arg)

    if not positionals:
        raise UsageError("no mount point given")
    if len(positionals) > 2:
        raise UsageError("too many arguments: " + " ".join(positionals[2:]))
    source = positionals[0] if len(positionals) == 2 else None
    mountpoint = positionals[-1]
    if not mountpoint:
        raise UsageError("empty mount point")
    return Invocation(
        mountpoint=mountpoint,
        source=source,
        option_strings=tuple(opts),
        foreground=foreground,
        debug=debug,
        fake=fake,
        fstype=fstype,
        warnings=tuple(warnings),
    )


def _split_unescaped(raw: str, sep: str) -> list[str]:
    """Split RAW on the SEP characters that are neither backslash-escaped nor inside double
    quotes; escapes and quotes stay in the pieces."""
    pieces: list[str] = []
    cur: list[str] = []
    quoted = False
    it = iter(raw)
    for ch in it:
        if ch == "\\":
            cur.append(ch)
            nxt = next(it, None)
            if nxt is not None:
                cur.append(nxt)
        elif ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch == sep and not quoted:
            pieces.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    pieces.append("".join(cur))
    return pieces


def split_options(optstr: str) -> list[str]:
    """Split one ``-o`` string on the commas that are neither escaped nor inside quotes.

    Escapes and quotes are kept in the pieces (``decode_value`` removes them later); empty
    pieces (``a,,b``, a trailing comma) are dropped.
    """
    return [p for p in _split_unescaped(optstr, ",") if p]


def decode_value(raw: str) -> str:
    """Remove quoting from one option value: ``\\x`` is a literal x, unescaped ``"`` vanish."""
    out: list[str] = []
    it = iter(raw)
    for ch in it:
        if ch == "\\":
            nxt = next(it, None)
            out.append("\\" if nxt is None else nxt)
        elif ch != '"':
            out.append(ch)
    return "".join(out)


def split_path_list(raw: str) -> list[str]:
    """Split a raw ``lowerdir`` value on unescaped, unquoted colons and decode each entry.

    Empty entries are kept (as ``""``) so the caller can tell ``a::b`` (overlayfs' data-only
    layer syntax) from ``a:b``.
    """
    return [decode_value(p) for p in _split_unescaped(raw, ":")]


def escape_path(path: str) -> str:
    """Escape a path for use in an option value (the inverse of ``decode_value``/splitting)."""
    out: list[str] = []
    for ch in path:
        if ch in '\\,:"':
            out.append("\\")
        out.append(ch)
    return "".join(out)
