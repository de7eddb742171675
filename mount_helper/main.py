"""Entry point of ``mount.layerfs``: parse argv, build a MountConfig, hand it to layerfs.mount.

The process contract (what podman and mount(8) rely on): exit 0 only once the mount is live at
MERGED; on any error print ``mount.layerfs: <message>`` to stderr, exit 1 and leave nothing
mounted. ``layerfs.mount.serve`` detaches the daemon from stdin/stdout/stderr, so a caller that
reads our stderr to EOF returns as soon as we exit.

This runs on every container start, diff and commit. ``run`` first hands the command line to
the fork server of this namespace (layerfs.forkclient), whose child mounts and serves it:
then nothing else is imported. Otherwise ``main`` does it here, and ``layerfs.mount`` (and
with it pyfuse3 and trio) is imported only when a mount is really made, never for --version,
--help or a bad command line.

Must not import at module level: anything but layerfs.forkclient (``dataclasses``, which the
option parser's classes needed, cost more CPU than Python's start), nor ``os`` (``posix`` is
enough on the thin request's path; see layerfs.forkclient).
"""

from __future__ import annotations

import posix
import sys

from layerfs import forkclient
from mount_helper import PROG

TYPE_CHECKING = False  # not typing's: collections.abc costs every mount ~2 ms
if TYPE_CHECKING:
    from collections.abc import Sequence

# mount(8) looks for /sbin/mount.<type> (util-linux FS_SEARCH_PATH is /sbin:/sbin/fs.d:/sbin/fs)
# and runs it as "mount.<type> SOURCE MERGED -o OPTS"; both FUSE type prefixes are covered.
HELPER_NAMES = ("mount.fuse.layerfs", "mount.fuse3.layerfs")
FRONT_ARGV0 = b"LAYERFS_FRONT_ARGV0"  # set by the C front end (_from_the_c_front)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run ``mount.layerfs`` with ``argv`` (default: sys.argv[1:]); return the exit status."""
    import os

    from layerfs.errors import LayerfsError
    from mount_helper.argv import USAGE, UsageError, parse_argv

    if argv is None:
        argv = sys.argv[1:]
    if prog is None:
        prog = sys.argv[0] if sys.argv and sys.argv[0] else PROG
    try:
        inv = parse_argv(argv, prog)
    except UsageError as e:
        _err(f"{e}\nTry '{PROG} --help'.")
        return 1

    if inv.action == "version":
        from layerfs import __version__

        print(f"{PROG}: version {__version__}")
        return 0
    if inv.action == "help":
        print(USAGE, end="")
        return 0
    if inv.action == "install":
        return install_mount_helper(inv.install_dir or "/sbin")

    from mount_helper.options import build_config

    try:
        config = build_config(inv, os.getcwd())
        for warning in config.warnings:
            _err(f"warning: {warning}")
        # Validate before importing the engine: bad input fails fast, without pyfuse3/trio.
        config = config.validate()
        if inv.fake:
            return 0  # mount(8) -f: check everything, mount nothing
        from layerfs.mount import serve
        from mount_helper.served import served

        serve(config, mount_argv=served)
    except LayerfsError as e:
        _err(str(e))
        return 1
    except KeyboardInterrupt:  # foreground mode, stopped from the terminal
        return 130
    return 0


def run() -> None:
    """The ``mount.layerfs`` program: main(), then exit without tearing the interpreter down
    (there is nothing to clean up, and the teardown costs a few ms on every container start;
    the daemon, if any, is a process of its own by then)."""
    code = None if _from_the_c_front() else _served_elsewhere()
    if code is None:
        code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed by the caller: nothing more to say
            pass
    posix._exit(code)


def _from_the_c_front() -> bool:
    """Whether the C front end (mount_helper/front.c) ran us, having tried the thin request
    itself: it says so with ``LAYERFS_FRONT_ARGV0``, its argv[0] (the "#!" exec replaced it
    with this file's path: mount(8)'s helper names must still be seen), which is taken out of
    the environment before anything can pass it on."""
    argv0 = posix.environ.pop(FRONT_ARGV0, None)
    if argv0 is None:
        return False
    posix.unsetenv(FRONT_ARGV0)
    if "os" in sys.modules:  # its copy of the environment, made at import
        sys.modules["os"].environb.pop(FRONT_ARGV0, None)
    if sys.argv:
        sys.argv[0] = forkclient.fsdecode(argv0)
    return True


def _served_elsewhere() -> int | None:
    """0 once the fork server's child has mounted our command line and serves it; None when
    it did not (no server, or it declined), and main() is to do it."""
    if len(sys.argv) < 3 or not forkclient.enabled():  # a mount names a source and a target
        return None
    warnings = forkclient.ask(sys.argv)
    if warnings is None:
        return None
    for warning in warnings:
        _err(f"warning: {warning}")
    return 0


def install_mount_helper(directory: str) -> int:
    """Link ``DIRECTORY/mount.fuse.layerfs`` (and the fuse3 name) to this program.

    That is the one step that makes ``mount -t fuse.layerfs overlay MERGED -o ...`` and fstab
    lines of type ``fuse.layerfs`` work. The links are replaced atomically when they exist.
    """
    import os

    target = _program_path()
    if target is None:
        _err("cannot find the mount.layerfs program to link to (is it on PATH?)")
        return 1
    for name in HELPER_NAMES:
        link = os.path.join(directory, name)
        tmp = f"{link}.tmp{os.getpid()}"
        try:
            os.symlink(target, tmp)
            os.replace(tmp, link)
        except OSError as e:
            _err(f"cannot create {link}: {e.strerror}")
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return 1
        print(f"{link} -> {target}")
    return 0


def _program_path() -> str | None:
    """The absolute path of the ``mount.layerfs`` executable that is running (or on PATH)."""
    import os

    me = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(me) == f"{PROG}-py":  # the Python front end run directly: the C one
        me = me.removesuffix("-py")  # beside it is the program (scripts/setup.sh)
    if os.path.basename(me) == PROG and os.access(me, os.X_OK):
        return me
    import shutil

    found = shutil.which(PROG)
    if found is None:
        # Beside the interpreter: the console script of the venv we run in.
        candidate = os.path.join(os.path.dirname(sys.executable), PROG)
        found = candidate if os.access(candidate, os.X_OK) else None
    return os.path.abspath(found) if found else None


def _err(message: str) -> None:
    sys.stderr.flush()  # paths are bytes: write back the user's bytes, not escapes
    sys.stderr.buffer.write(forkclient.fsencode(f"{PROG}: {message}\n"))
    sys.stderr.buffer.flush()


if __name__ == "__main__":
    run()
