"""The fork server ("zygote"): one pre-imported process that forks a daemon per mount.

A daemon that starts cold imports trio, pyfuse3 and the engine (~0.3 s of CPU) before it
answers the first request, and 20 of them hold ~19 MiB of PSS each. The server imports them
once, freezes the collector (``gc.freeze``: a child's collections then never write the shared
objects' GC headers) and forks one child per mount, which serves it. The first request is
answered a few milliseconds after the mount, the children share the server's pages, and a
mount is still one process: a child's crash or kill -9 touches neither the server nor the
other mounts, and a kill -9 of the server leaves its children serving.

There is one server per (euid, user namespace, mount namespace, code identity), reached at
the abstract unix socket ``address()`` (nothing on disk; abstract names are per network
namespace). Rootless podman runs the mount program inside its user and mount namespace: the
server started from there lives there too, one per podman namespace.

The protocol (SOCK_SEQPACKET, one message each):

- caller -> server: the request (config, environment, umask; marshalled), with the mounted
  /dev/fuse fd and the workdir lock fd (SCM_RIGHTS);
- the server checks the peer (``_peer``), forks a child, which takes the connection;
- child -> caller: ``ready PID``; caller -> child: ``go``. From ``go`` on the child serves and
  the caller returns. A child that reads EOF instead never touches the fds.

So an EOF, refusal or timeout before ``ready`` means nobody serves the fd: the caller still
holds its own copies and tries again or starts a daemon of its own (layerfs.mount). A dying
server never loses a mount, and two daemons never serve one fd.

``mount.layerfs`` tries a thinner request first (layerfs.forkclient.ask): its command line,
environment and umask, with its working directory (SCM_RIGHTS). The child takes them on and
does what the caller would (mount_helper.served: parse, check, lock, mount), answers ``ok``
and serves, or answers ``decline`` having done nothing, and the caller does it all itself.
The caller then never imports the option parser and the engine's config: a mount costs it
little more than Python's start.

Lifetime: a caller that finds no server binds the name itself (one of two racing callers
wins the bind; the other connects to it) and forks the server, which inherits that mount's fds
and serves it through its first child. The server exits as soon as its last child has exited;
it closes the socket first, and a caller that connected meanwhile reads EOF and tries again.

Must not import: pyfuse3, trio, logging (the caller's side runs in mount.layerfs on every
mount; the server imports them through the ``preload`` callable it is given).
"""

from __future__ import annotations

import _socket  # not socket: its enums cost the caller ~5 ms of imports
import gc
import marshal  # built in; pickle costs the caller ~4 ms of imports
import os
import select
import sys

from layerfs.config import IdMapping, MountConfig
from layerfs.forkclient import ARGV_TAG, address, parse

TYPE_CHECKING = False  # not typing's: importing typing costs the caller ~5 ms
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Sequence
    from typing import Any

    Preload = Callable[[], None]
    # (config, fuse fd, workdir lock fd or -1) -> exit status, in the child
    Serve = Callable[[MountConfig, int, int], int]
    MountArgv = Callable[[list[str], "Reply"], int]  # (argv, reply) -> exit status, in the child

READY_TIMEOUT = 10.0  # seconds a caller waits for a child's "ready" (a new server imports first)
TRIES = 3  # connections a caller tries (a server that is exiting answers EOF) before its own daemon
SERVER_TITLE = b"layerfs-forkserver"  # benchmarks find the server by this prefix of its cmdline
CHILD_TITLE = b"layerfs"  # a child's cmdline: this, then its mount point
_SO_PEERPIDFD = 77  # Linux 6.5+; not in Python 3.11's socket module
_MAX_REQUEST = 1 << 20
_CMSG_SPACE_2 = 24
_MSG_CMSG_CLOEXEC = 0x40000000  # CMSG_SPACE(2 * sizeof(int)): room for the two fds of a request

# A request: (config, environment, umask), or for a thin caller (layerfs.forkclient.ask) its
# command line in place of the config.
_Request = tuple[MountConfig | list[str], dict[bytes, bytes], int]
_Socket = _socket.socket


# --- the caller's side --------------------------------------------------------------------------


def hand_off(
    config: MountConfig,
    fuse_fd: int,
    lock_fd: int,
    *,
    preload: Preload,
    serve: Serve,
    mount_argv: MountArgv | None = None,
) -> bool:
    """Have a server's child serve the mounted FUSE_FD (and hold LOCK_FD, -1 for none); start
    a server, which serves it through its first child, when none is listening. True: a daemon
    owns the fds (the caller closes its copies and returns); False: nobody took them. Raise
    OSError only when a server cannot be forked. A server started here answers thin
    requests with MOUNT_ARGV (None: it leaves them to their callers)."""
    name = address()
    umask = os.umask(0o022)
    os.umask(umask)
    payload = _encode(config, dict(os.environb), umask)
    fds = [fuse_fd] + ([lock_fd] if lock_fd >= 0 else [])
    for _ in range(TRIES):
        answer = _ask(name, payload, fds)
        if answer is not None:  # served, or a server that does not answer: no retry
            return answer
        listener = _bind(name)
        if listener is not None:
            try:
                request: _Request = (config, dict(os.environb), umask)
                server = (listener, request, fuse_fd, lock_fd, preload, serve, mount_argv)
                detach(lambda: _server(*server))  # noqa: B023 (run before the loop goes on)
            finally:
                listener.close()
            return True
    return False


def _encode(config: MountConfig, env: dict[bytes, bytes], umask: int) -> bytes:
    """The request in marshal's format (built in, and MountConfig holds only plain values)."""
    fields = config.fields()
    for name in ("uid_mappings", "gid_mappings"):
        fields[name] = tuple((m.inner, m.outer, m.count) for m in fields[name])
    return marshal.dumps((fields, env, umask))


def _decode(data: bytes) -> _Request:
    """The request _encode made; raise (ValueError, TypeError, EOFError) on anything else."""
    fields, env, umask = marshal.loads(data)
    for name in ("uid_mappings", "gid_mappings"):
        fields[name] = tuple(IdMapping(*m) for m in fields[name])
    if not isinstance(env, dict) or not isinstance(umask, int):
        raise TypeError("not a request")
    return MountConfig(**fields), env, umask


def _ask(name: bytes, payload: bytes, fds: list[int]) -> bool | None:
    """One request: True once a child said ready and was told to go; False when the server
    did not answer in time; None when nothing took the fds (no server, refused, EOF)."""
    s = _Socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        s.settimeout(READY_TIMEOUT)
        try:
            s.connect(name)
            data = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)  # int[]; not array's
            rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, data)]
            s.sendmsg([payload], rights)
            reply = s.recv(64)
            if not reply.startswith(b"ready "):
                return None  # EOF: refused, or the server is exiting
            s.send(b"go")  # EPIPE here: the child died, it will not serve
        except TimeoutError:
            return False
        except OSError:
            return None
        return True
    finally:
        s.close()


def _bind(name: bytes) -> _Socket | None:
    """A listening socket at NAME, or None when another process holds the name."""
    s = _Socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        s.bind(name)
        s.listen(128)  # callers queue here while the new server imports
    except OSError:
        s.close()
        return None
    return s


def detach(run: Callable[[], int]) -> None:
    """Run RUN in a grandchild in a new session, stdio on /dev/null, and return once the
    intermediate child has exited (the grandchild is then nobody's child but init's)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setsid()
            # The caller's stdio is let go before the caller can exit (it waits for this
            # child): a caller reading our stderr to EOF (podman) returns with us.
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
            code = run() if os.fork() == 0 else 0
        finally:
            os._exit(code)
    os.waitpid(pid, 0)


# --- the server ---------------------------------------------------------------------------------


def _server(
    raw: _Socket,
    first: _Request,
    fuse_fd: int,
    lock_fd: int,
    preload: Preload,
    serve: Serve,
    mount_argv: MountArgv | None,
) -> int:
    """The server's life: import, serve FIRST (whose fds it inherited) through a child, then
    fork a child per accepted request; return once no child is left."""
    import signal
    import socket

    os.chdir("/")
    _close_fds_but(0, 1, 2, raw.fileno(), fuse_fd, lock_fd)
    own = dict(os.environb)
    os.environ.clear()  # unsetenv, then setenv: the C environment is off the environment area
    os.environb.update(own)  # (see _take_environment)
    listener = socket.socket(fileno=raw.detach())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _set_title([SERVER_TITLE], comm=b"layerfs-forkser")
    gc.disable()  # no collection while importing: fewer freed holes in the shared pages
    preload()
    if os.environ.get("LAYERFS_IMMORTAL", "1") != "0":
        immortalize()
    listener.setblocking(False)
    children: dict[int, int] = {}  # pidfd -> pid
    poller = select.poll()
    poller.register(listener, select.POLLIN)

    def spawn(conn: socket.socket | None, request: _Request, fds: list[int]) -> None:
        # Everything the server holds is shared with the children as it is. No collection
        # first: the holes it would free are where a child's first objects go, each one a
        # shared page copied (20 mounts: 7.6 MiB a mount with gc.collect() here, 7.1 without).
        gc.freeze()
        try:
            pid = fork()
        except OSError:
            pid = -1  # the caller reads EOF and starts a daemon of its own
        if pid == 0:
            code = 1
            try:
                listener.close()
                for pidfd in children:
                    os.close(pidfd)
                gc.enable()
                code = _child(conn, request, fds, serve, mount_argv)
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        if conn is not None:
            conn.close()
        if pid > 0:
            pidfd = os.pidfd_open(pid)
            children[pidfd] = pid
            poller.register(pidfd, select.POLLIN)

    fork = _forker() if os.environ.get("LAYERFS_LEAN_FORK") != "0" else os.fork
    spawn(None, first, [fuse_fd] + ([lock_fd] if lock_fd >= 0 else []))
    while children:
        events = poller.poll()
        for fd, _ in events:  # requests first: a child forked now keeps the server alive
            if fd == listener.fileno():
                _accept(listener, spawn, thin=mount_argv is not None)
        for fd, _ in events:
            if fd in children:
                poller.unregister(fd)
                os.close(fd)
                os.waitpid(children.pop(fd), 0)
    listener.close()  # callers still queued read EOF (ECONNRESET) and try again
    return 0


def immortalize() -> int:
    """Make every object this process holds now immortal (PEP 683, CPython 3.12+): the
    interpreter then never writes its reference count, so a child that uses it leaves its page
    shared. Return how many objects were marked; 0 where the interpreter has no immortal
    objects (3.11: every count moves, so nothing is done) or keeps counts elsewhere (a
    free-threaded or a Py_TRACE_REFS build).

    The objects: those the collector tracks (modules, classes, functions, dicts, lists...) and
    every object they reach (strings, bytes, numbers, untracked tuples, code objects and their
    constants). Objects whose count is not where a PyObject's is (free-threaded) are left.
    The price: none of them is ever freed, in this process or a child. Called once, after the
    preload and before the first fork, it keeps what the server holds then (what a child
    shares anyway); what the server makes later (a request, its config) stays mortal."""
    import ctypes

    mark = sys.getrefcount(None)
    probe = [None] * 16  # 16 references more: the count moves unless None is immortal
    if sys.getrefcount(None) != mark or hasattr(sys, "getobjects") or _gil_disabled():
        return 0
    del probe
    if sys.byteorder != "little" or sys.maxsize < 1 << 32 or mark >= 1 << 32:
        return 0  # a layout not measured: the count's low 32 bits are where they are here
    # ob_refcnt: a PyObject's first word, of which the interpreter checks the low 32 bits
    # (the high ones are flags from 3.14 on: left as they are)
    word = ctypes.c_uint32.from_address
    count, referents, code = sys.getrefcount, gc.get_referents, type(_immortal_code.__code__)
    objects = gc.get_objects()  # not itself in the list
    marked = 0
    while objects:
        o = objects.pop()
        if count(o) == mark:  # marked already (or immortal from the start)
            continue
        word(id(o)).value = mark
        marked += 1
        objects.extend(referents(o))
        if type(o) is code:  # no tp_traverse: its parts by name
            objects.extend(_immortal_code(o))
    return marked


def _immortal_code(c: Any) -> list[object]:
    """What a code object holds (code objects have no tp_traverse)."""
    names = ("co_consts", "co_names", "co_varnames", "co_freevars", "co_cellvars", "co_filename")
    more = ("co_name", "co_qualname", "co_linetable", "co_exceptiontable")  # not co_code: a copy
    return [getattr(c, n) for n in names + more if hasattr(c, n)]


def _gil_disabled() -> bool:
    import sysconfig

    return bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def _forker() -> Callable[[], int]:
    """The server's fork: fork(2) itself while this process has one thread, else os.fork.

    os.fork also runs the interpreter's after-fork work in the child, which only matters when
    other threads were left behind: it re-creates the GIL, the import lock and the runtime's
    locks, drops the other threads' states, clears pending signal flags, and calls the hooks
    given to os.register_at_fork (threading's forgets the other threads, logging's re-creates
    its handlers' locks, trio's forgets its cached worker threads, random's reseeds the module's
    generator). With one thread there is nothing to redo, and that work writes ~0.7 MiB of the
    shared pages into each child's own (0.1-0.15 MiB of it still its own once it serves:
    docs/benchmarks.md, session 15 pss4). What a child then keeps from us: `random`'s module
    generator in our state (layerfs draws nothing from it; trio and tempfile keep their own),
    and a signal flag set in the instant before the fork (a SIGINT: the child exits before it
    says ready, and its caller serves the mount another way)."""
    import ctypes

    raw = ctypes.PyDLL(None, use_errno=True).fork  # PyDLL: the GIL held through the call
    raw.restype, raw.argtypes = ctypes.c_int, ()

    def fork() -> int:
        try:
            alone = len(os.listdir("/proc/self/task")) == 1
        except OSError:
            alone = False
        if not alone:
            return os.fork()
        pid: int = raw()
        if pid < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return pid

    return fork


def _close_fds_but(*keep: int) -> None:
    """Close every fd but KEEP: the server outlives the caller that started it, and neither
    it nor its children may hold that caller's other files (a pipe it was given, say)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the directory's own fd, closed by now


def _accept(
    listener: socket.socket,
    spawn: Callable[[socket.socket | None, _Request, list[int]], None],
    *,
    thin: bool,
) -> None:
    """Take one request off the queue and fork its child; drop it on anything unexpected, and
    a thin request when THIN is false (the caller then does the mount itself)."""
    from array import array  # the server's side only: array imports collections.abc

    try:
        conn, _ = listener.accept()
    except OSError:
        return
    fds: list[int] = []
    try:
        conn.settimeout(2.0)  # the caller sends at once; a stuck peer must not stall the rest
        if _peer(conn) is None:
            conn.close()
            return
        msg, cmsgs, flags, _ = conn.recvmsg(_MAX_REQUEST, _CMSG_SPACE_2, _MSG_CMSG_CLOEXEC)
        for level, kind, data in cmsgs:
            if (level, kind) == (_socket.SOL_SOCKET, _socket.SCM_RIGHTS):
                got = array("i")
                got.frombytes(data[: len(data) - len(data) % got.itemsize])
                fds.extend(got)
        if flags & (_socket.MSG_TRUNC | _socket.MSG_CTRUNC) or not fds:
            raise ValueError("truncated request")
        request: _Request
        if not msg.startswith(ARGV_TAG):
            request = _decode(msg)
        elif thin and len(fds) == 1:
            request = parse(msg)
        else:
            raise ValueError("a thin request this server leaves to its caller")
        conn.settimeout(None)
    except Exception:
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    spawn(conn, request, fds)


def _peercred(conn: socket.socket) -> tuple[int, int, int]:
    """SO_PEERCRED: the peer's (pid, uid, gid) at connect time."""
    from array import array

    got = array("i")
    got.frombytes(conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12))
    return got[0], got[1], got[2]


def _peer(conn: socket.socket) -> int | None:
    """The peer's pid when it may use this server, else None.

    The abstract name is reachable from every process of the network namespace, whatever its
    user, user namespace or mount namespace: so a peer must have our euid (SO_PEERCRED, which
    the kernel fills from the connecting process's credentials, mapped into our user namespace)
    and be in our user and mount namespaces. For a server running as root that means a root
    peer that could have served the mount itself (it just mounted it): the child it gets runs
    with the same credentials and reads the paths it names in the same namespace. A non-root
    peer is refused; so is a root of another user namespace (rootless podman, ``unshare -U
    -r``: its uid 0 is not ours, and if it maps onto 0 the namespace check still refuses it)
    and a root of another mount namespace (a rootful container: its paths are other files).
    A thin request has the child check and mount on the peer's behalf, with our credentials:
    so the peer must also see our root directory (not a chroot) and hold every capability we
    hold (a root that dropped CAP_SYS_ADMIN must not get a mount it could not make)."""
    pid: int
    uid: int
    pid, uid, _ = _peercred(conn)
    if uid != os.geteuid() or pid <= 0:
        return None
    try:
        pidfd = conn.getsockopt(_socket.SOL_SOCKET, _SO_PEERPIDFD)
    except OSError:  # before Linux 6.5: the pid alone (the peer waits for us, so it lives)
        pidfd = -1
    try:
        for ns in ("user", "mnt"):
            if os.stat(f"/proc/{pid}/ns/{ns}").st_ino != os.stat(f"/proc/self/ns/{ns}").st_ino:
                return None
        theirs, ours = os.stat(f"/proc/{pid}/root"), os.stat("/proc/self/root")
        if (theirs.st_dev, theirs.st_ino) != (ours.st_dev, ours.st_ino):
            return None
        if _effective_caps(pid) & (caps := _effective_caps("self")) != caps:
            return None
        if pidfd >= 0:  # the pid read above was still the peer's: it has not been reused
            import signal

            signal.pidfd_send_signal(pidfd, 0)
    except OSError:
        return None
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return pid


def _effective_caps(pid: int | str) -> int:
    """The CapEff mask of process PID (``self``)."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _child(
    conn: socket.socket | None,
    request: _Request,
    fds: list[int],
    serve: Serve,
    mount_argv: MountArgv | None,
) -> int:
    """A mount's daemon, just forked: take on the caller's environment, umask and cgroup,
    say ready, and serve once the caller said go (an EOF instead: the caller serves it some
    other way, and this child must not touch the fds). For a thin request, also its working
    directory, then MOUNT_ARGV mounts and serves the command line."""
    config, env, umask = request
    cgroup = _cgroup(conn)
    _take_environment(env)
    os.umask(umask)
    if isinstance(config, list):
        assert conn is not None and mount_argv is not None
        os.fchdir(fds[0])
        os.close(fds[0])
        if cgroup is not None:
            _join_cgroups(cgroup)
        return mount_argv(config, Reply(conn))
    _set_title([CHILD_TITLE, os.fsencode(config.mountpoint)], comm=CHILD_TITLE, use_env=True)
    if cgroup is not None:
        _join_cgroups(cgroup)
    if conn is not None:
        with conn:
            try:
                conn.send(b"ready %d" % os.getpid())
                if conn.recv(16) != b"go":
                    return 0
            except OSError:
                return 0
    return serve(config, fds[0], fds[1] if len(fds) > 1 else -1)


def _take_environment(env: dict[bytes, bytes]) -> None:
    """Make ENV this process's environment, changing only the variables that differ: those
    the server holds are shared pages, and a caller's environment is most often the server's
    (20 mounts: 0.06-0.15 MiB less a mount than clearing and setting them all). The server
    moved its own variables off the environment area at start, which _set_title may then
    overwrite: no variable left as it was points there."""
    ours = os.environb
    for name in [name for name in ours if name not in env]:
        del ours[name]
    for name, value in env.items():
        if ours.get(name) != value:
            ours[name] = value


class Reply:
    """The one answer to a thin caller (layerfs.forkclient.ask)."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn

    def ready(self, mountpoint: str, warnings: Sequence[str]) -> None:
        """The mount is live at MOUNTPOINT and this child serves it: the caller prints
        WARNINGS and exits 0."""
        _set_title([CHILD_TITLE, os.fsencode(mountpoint)], comm=CHILD_TITLE, use_env=True)
        self._send(b"\0".join([b"ok", *map(os.fsencode, warnings)]))

    def decline(self) -> None:
        """Nothing was done: the caller does it all itself (and reports any error)."""
        self._send(b"decline")

    def _send(self, msg: bytes) -> None:
        try:
            self._conn.send(msg)
        except OSError:
            pass  # the caller is gone; a mount made is served all the same
        self._conn.close()


def _cgroup(conn: socket.socket | None) -> list[tuple[bytes, bytes]] | None:
    """The caller's cgroups, (controllers, path) a hierarchy, read while the caller waits for
    us (None: those of the server, which forked this child itself)."""
    if conn is None:
        return None
    try:
        return _cgroups(f"/proc/{_peercred(conn)[0]}/cgroup")
    except OSError:
        return None


def _cgroups(path: str) -> list[tuple[bytes, bytes]]:
    """(controllers, path) of each hierarchy in a /proc/PID/cgroup file (b"" for v2)."""
    with open(path, "rb") as f:
        lines = [line.rstrip(b"\n").split(b":", 2) for line in f]
    return [(fields[1], fields[2]) for fields in lines if len(fields) == 3]


def _join_cgroups(theirs: list[tuple[bytes, bytes]]) -> None:
    """Move into the caller's cgroups (v2, and each v1 hierarchy), so that the mount stays
    accounted to, and stopped with, whoever mounted it, as a daemon forked by the caller is.
    Best effort: silent where a cgroup is not ours to write (EPERM, EACCES) or not mounted."""
    try:
        ours = dict(_cgroups("/proc/self/cgroup"))
        moves = [(c, path) for c, path in theirs if ours.get(c) != path]
        if not moves:  # the server's: no mount table to read (0.4 ms before a mount's answer)
            return
        from layerfs import mountinfo

        table = [m for m in mountinfo.mounts() if m.fstype in (b"cgroup", b"cgroup2")]
    except OSError:
        return
    for controllers, path in moves:
        want = set(controllers.split(b","))
        for m in table:
            if (
                (m.fstype == b"cgroup2")
                if not controllers
                else (m.fstype == b"cgroup" and want <= set(m.super_options.split(b",")))
            ):
                _write(m.point + path.rstrip(b"/") + b"/cgroup.procs", b"0")
                break


def _write(path: bytes, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, data)
    except OSError:
        pass
    finally:
        os.close(fd)


def _set_title(args: list[bytes], *, comm: bytes, use_env: bool = False) -> None:
    """Show ARGS as this process's command line (/proc/PID/cmdline, ps), NUL-separated as real
    argv is, by rewriting the argv area we inherited (the interpreter copied it at start and
    reads it no more). Tests and benchmarks find a mount's daemon by its mount point there.

    When they do not fit there and USE_ENV (the environment area is no longer referenced:
    the child replaced its environment), one space-separated string runs on into it, as
    setproctitle(3) does; the kernel then shows it up to its first NUL."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, comm[:15], 0, 0, 0)  # PR_SET_NAME: /proc/PID/comm, top, ps -e
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        arg_start, arg_end, env_start, env_end = (int(x) for x in fields[45:49])
    except (OSError, ValueError):
        return
    title = b"\0".join(args)
    size = arg_end - arg_start
    if len(title) < size:
        buf = title.ljust(size, b"\0")
    elif use_env and env_start == arg_end and env_end > env_start:
        room = env_end - arg_start
        buf = b" ".join(args)[: room - 1].ljust(room, b"\0")
    else:
        buf = b" ".join(args)[: size - 1] + b"\0"
    try:
        fd = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.pwrite(fd, buf, arg_start)
    except OSError:
        pass
    finally:
        os.close(fd)
