"""How a caller finds the fork server of its namespace (layerfs.forkserver), and the thin
request ``mount.layerfs`` tries first.

The thin request is the command line itself, with the caller's environment, umask and
working directory: the server's child parses, checks, mounts and serves it, then answers. So a
mount with a server running costs the caller Python's start and one round trip, and none of
the option parser, ``dataclasses`` (``inspect`` behind it) or ``typing``, which cost more CPU
than the start itself. Whatever the child does not take (another action, the foreground, an
error to report) the caller does all over again the ordinary way, so messages and exit codes
are the ordinary ones.

mount_helper/front.c, the C front end, makes the same request and computes ``address()`` the
same way: a change to either must be made there too (tests/compat/test_front.py fails when
the two addresses differ).

Must not import: anything of layerfs or mount_helper, ``socket`` (``_socket`` is enough),
``typing``, ``dataclasses``, ``os`` (``posix`` is enough: ``os`` with ``posixpath`` and
``_collections_abc`` is a fifth of a thin request's instructions): it runs before everything
else in ``mount.layerfs``.
"""

from __future__ import annotations

import posix
import sys
import zlib

TYPE_CHECKING = False  # not typing's
if TYPE_CHECKING:
    from collections.abc import Mapping

ARGV_TAG = b"argv\0"  # starts a thin request (a pickled one starts with b"\x80")


def enabled() -> bool:
    """``LAYERFS_FORKSERVER=0`` in the caller's environment: start a daemon of its own."""
    return _environ().get(b"LAYERFS_FORKSERVER", b"1") != b"0"


def _environ() -> Mapping[bytes, bytes]:
    """The environment: ``os.environb`` once ``os`` is imported (it may have been changed
    through it), else the one the process started with."""
    if "os" in sys.modules:
        import os  # imported already: no cost

        return os.environb
    return posix.environ


def fsencode(name: str) -> bytes:
    """``os.fsencode`` of a str, without ``os``."""
    return name.encode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def fsdecode(name: bytes) -> str:
    """``os.fsdecode`` of bytes, without ``os``."""
    return name.decode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())


def address() -> bytes:
    """The abstract socket name of this caller's server: its euid, user and mount namespaces,
    and the code it would run (another install or an upgraded one never gets an old server)."""
    user = posix.stat("/proc/self/ns/user").st_ino
    mnt = posix.stat("/proc/self/ns/mnt").st_ino
    key = f"layerfs-forkserver-{posix.geteuid()}-{user}-{mnt}-{_code_identity():08x}"
    return b"\0" + key.encode()


def _code_identity() -> int:
    """A checksum of the interpreter (its path and version: a venv remade with another Python
    keeps its path), the paths of layerfs and of mount_helper beside it (the thin request runs
    its option parser in the server), their modules' and extensions' mtimes and sizes, and
    which engine the server preloads: LAYERFS_COMPILED and the compiled build's time
    (layerfs.compiled)."""
    here = __file__
    if not here.startswith("/") or any(p in here for p in ("//", "/./", "/../")):
        import os  # rare: a relative or unnormalised entry of sys.path

        here = os.path.abspath(here)
    pkg = here.rpartition("/")[0]  # os.path.dirname, for a normalised absolute path
    parts = [sys.executable, sys.version, pkg]
    parts.append("compiled=" + fsdecode(_environ().get(b"LAYERFS_COMPILED", b"")))
    try:  # layerfs.compiled.DIR's MANIFEST
        parts.append(str(posix.stat(pkg.rpartition("/")[0] + "/build/mypyc/MANIFEST").st_mtime_ns))
    except OSError:
        pass
    for where in (pkg, pkg.rpartition("/")[0] + "/mount_helper"):
        try:
            entries = posix.scandir(where)
        except OSError:
            continue
        with entries:
            for entry in entries:
                if entry.name.endswith((".py", ".so")):  # .so: the compiled raw path
                    st = entry.stat()
                    parts.append(f"{where}/{entry.name}:{st.st_mtime_ns}:{st.st_size}")
    # their file-system bytes, sorted as bytes (front.c's strcmp): a name or a variable that
    # is not UTF-8 is its bytes, as in C (str.encode() raised on its surrogate escapes)
    return zlib.crc32(b"\0".join(sorted(map(fsencode, parts))))


def ask(argv: list[str]) -> list[str] | None:
    """Have this caller's server mount and serve ARGV (``argv[0]`` first): the warnings to
    print once its child says the mount is live, or None when nobody took it (no server, one
    that is exiting or was started without the option parser, or a command line the child
    leaves to the caller), and the caller does it all itself."""
    import _socket

    try:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    except OSError:
        return None
    cwd = -1
    try:
        s.connect(address())
        cwd = posix.open(".", posix.O_PATH | posix.O_CLOEXEC)
        umask = posix.umask(0o022)
        posix.umask(umask)
        fields = [b"%d" % umask, b"%d" % len(argv), *map(fsencode, argv)]
        fields += [k + b"=" + v for k, v in _environ().items()]
        fd = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, cwd.to_bytes(4, sys.byteorder))]
        s.sendmsg([ARGV_TAG + b"\0".join(fields)], fd)
        reply = s.recv(1 << 16)  # no timeout: the child answers once it has mounted, or fails
    except OSError:
        return None
    finally:
        s.close()
        if cwd >= 0:
            posix.close(cwd)
    if reply != b"ok" and not reply.startswith(b"ok\0"):
        return None
    return [fsdecode(w) for w in reply.split(b"\0")[1:]]


def parse(msg: bytes) -> tuple[list[str], dict[bytes, bytes], int]:
    """A thin request's command line, environment and umask (the server's side of ``ask``);
    ValueError when MSG is not one."""
    if not msg.startswith(ARGV_TAG):
        raise ValueError("not a command line")
    fields = msg[len(ARGV_TAG) :].split(b"\0")
    umask, count = int(fields[0]), int(fields[1])
    if not 0 < count <= len(fields) - 2 or not 0 <= umask <= 0o777:
        raise ValueError("malformed command line")
    argv = [fsdecode(a) for a in fields[2 : 2 + count]]
    env: dict[bytes, bytes] = {}
    for entry in fields[2 + count :]:
        key, sep, value = entry.partition(b"=")
        if key and sep:
            env[key] = value
    return argv, env, umask
