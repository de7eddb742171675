"""The fork server (layerfs.forkserver): one pre-imported process per user and mount
namespace forks the daemon of every mount, and exits with its last one.

What these hold: mounts share one server, whose cmdline starts with ``layerfs-forkserver``,
and each mount is its own child process showing its mount point; the server goes when the
last mount goes; a kill -9 of a daemon or of the server leaves the other mounts serving; the
caller's environment reaches the child, and the child joins the caller's cgroup; a peer of
another uid or mount namespace is refused; ``LAYERFS_FORKSERVER=0`` starts a daemon of the
caller's own; a user namespace gets a server of its own, and so does another Python at the
same path (a venv remade).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from subprocess import CompletedProcess

import pytest
from compat.helpers import (
    MOUNTNS,
    USERNS,
    daemon_pids,
    helper_command,
    helper_env,
    is_mounted,
    reap,
    run_helper_script,
    wait_no_daemon,
)

from layerfs import forkclient, forkserver
from layerfs.config import MountConfig

pytestmark = [pytest.mark.fuse, pytest.mark.usefixtures("front")]  # both front ends
TIMEOUT = 60


def _helper(
    d: dict[str, Path], opts: str, cwd: Path | None = None, **env: str
) -> CompletedProcess[str]:
    return subprocess.run(
        [*helper_command(), "overlay", str(d["merged"]), "-o", opts],
        capture_output=True,
        text=True,
        env={**helper_env(), **env},
        cwd=cwd,
        timeout=TIMEOUT,
        check=False,
    )


def _mount(d: dict[str, Path], **env: str) -> None:
    r = _helper(d, f"lowerdir={d['lower']},upperdir={d['upper']},workdir={d['work']}", **env)
    assert r.returncode == 0, r.stderr
    assert (d["merged"] / "f").read_text() == "x"


def _unmount(d: dict[str, Path]) -> None:
    subprocess.run(["fusermount3", "-u", str(d["merged"])], check=True)


def _daemon(d: dict[str, Path]) -> int:
    pids = daemon_pids(d["merged"])
    assert len(pids) == 1, pids
    return pids[0]


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rpartition(b")")[2].split()[1])


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _server_of(d: dict[str, Path]) -> int:
    server = _ppid(_daemon(d))
    assert _cmdline(server).startswith(b"layerfs-forkserver"), _cmdline(server)
    return server


def _dead(d: dict[str, Path]) -> bool:
    """Whether D's mount has lost its daemon: a lookup of a new name fails ENOTCONN (or
    ECONNABORTED, when it was in flight as the connection ended)."""
    for i in range(200):
        try:
            os.stat(d["merged"] / f"probe{i}")
        except FileNotFoundError:
            time.sleep(0.05)
        except OSError as e:
            return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rpartition(b")")[2].split()[0] == b"Z":
                    return True
        except (FileNotFoundError, ProcessLookupError):  # reaped before or during the read
            return True
        time.sleep(0.05)
    return False


def test_mounts_share_a_server_that_exits_with_the_last(stacks: list[dict[str, Path]]) -> None:
    a, b = stacks[:2]
    _mount(a)
    _mount(b)
    server = _server_of(a)
    assert _server_of(b) == server
    assert _daemon(a) != _daemon(b)  # one process per mount
    # each child shows its own mount point as an argument of its own, the server none
    assert os.fsencode(str(a["merged"])) in _cmdline(_daemon(a)).split(b"\0")
    assert b"merged" not in _cmdline(server)
    _unmount(a)
    assert wait_no_daemon(a["merged"]) == []
    assert not _gone(server, timeout=0.5), "the server left while a mount was still served"
    _unmount(b)
    assert wait_no_daemon(b["merged"]) == []
    assert _gone(server), "the server outlived its last mount"


def test_kill_of_a_daemon_spares_the_others(stacks: list[dict[str, Path]]) -> None:
    a, b, c = stacks
    _mount(a)
    _mount(b)
    server = _server_of(a)
    victim = _daemon(a)
    os.kill(victim, signal.SIGKILL)
    assert _dead(a)
    assert (b["merged"] / "f").read_text() == "x"
    assert not _gone(server, timeout=0.2)
    _mount(c)  # the server still forks
    assert _server_of(c) == server


def test_kill_of_the_server_spares_the_mounts(stacks: list[dict[str, Path]]) -> None:
    a, b, c = stacks
    _mount(a)
    _mount(b)
    server = _server_of(a)
    os.kill(server, signal.SIGKILL)
    assert _gone(server)
    for d in (a, b):
        (d["merged"] / "new").write_text("y")
        assert (d["merged"] / "new").read_text() == "y"
    _mount(c)  # a new server
    assert _server_of(c) != server


def test_the_caller_environment_reaches_the_daemon(stacks: list[dict[str, Path]]) -> None:
    """A mount made while a server runs gets the caller's environment, not the server's:
    LAYERFS_CRASH_AT (the crash-point tests' fault injection) kills the daemon at the first
    syscall of the point it names."""
    a, b = stacks[:2]
    _mount(a)  # the server is started without the variable
    _mount(b, LAYERFS_CRASH_AT="1")
    assert _server_of(b) == _server_of(a)
    daemon = _daemon(b)
    with pytest.raises(OSError):
        (b["merged"] / "g").write_text("z")  # a create: its first step crashes
    assert _gone(daemon)
    assert _dead(b)
    assert (a["merged"] / "f").read_text() == "x"


def test_a_variable_the_caller_lacks_is_not_in_the_daemon(stacks: list[dict[str, Path]]) -> None:
    """A child changes only the variables where the caller's environment differs from the
    server's (forkserver._take_environment): one the server has and the caller has not is
    gone. The server starts with LAYERFS_CRASH_AT, a mount made without it creates a file."""
    a, b = stacks[:2]
    _mount(a, LAYERFS_CRASH_AT="1")  # the server starts with the variable
    _mount(b)
    assert _server_of(b) == _server_of(a)
    (b["merged"] / "g").write_text("z")  # a create: no crash point in this daemon
    assert (b["merged"] / "g").read_text() == "z"
    assert (b["upper"] / "g").read_text() == "z"


PEER = """
import os, socket, sys
payload = bytes.fromhex(sys.stdin.read())
if len(sys.argv) > 2:  # become nobody here, imports done: the venv's interpreter may live where
    os.setgroups([])  # nobody cannot read it (a pyenv under /root)
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(20)
s.connect(bytes.fromhex(sys.argv[1]))
fd = os.open("/dev/null", os.O_RDONLY)
try:
    socket.send_fds(s, [payload], [fd])
    print(s.recv(64).decode() or "EOF")
except (BrokenPipeError, ConnectionResetError):  # closed before or after reading our request
    print("EOF")
"""


@pytest.mark.parametrize("who", ["other-uid", "other-mount-ns"])
def test_a_foreign_peer_is_refused(stacks: list[dict[str, Path]], who: str) -> None:
    """A well-formed request from another uid (nobody) or another mount namespace (a root
    that ran unshare -m) reads EOF: no child is forked for it."""
    a, b = stacks[:2]
    _mount(a)
    server = _server_of(a)
    name = forkclient.address()
    config = MountConfig(lowers=(str(b["lower"]),), mountpoint=str(b["merged"]))
    payload = forkserver._encode(config, {b"PATH": b"/bin"}, 0o22).hex()
    cmd = [sys.executable, "-c", PEER, name.hex()]
    kw: dict[str, object] = {}
    if who == "other-uid":
        cmd.append("nobody")  # as setpriv --reuid --regid --clear-groups, in the peer
        kw["cwd"] = "/"
    else:
        cmd = ["unshare", "-m", *cmd]
    r = subprocess.run(
        cmd, input=payload, capture_output=True, text=True, timeout=TIMEOUT, check=False, **kw
    )  # type: ignore[call-overload]
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "EOF"
    assert [p for p in os.listdir("/proc") if p.isdigit() and _child_of(int(p), server)] == [
        str(_daemon(a))
    ]


def _child_of(pid: int, parent: int) -> bool:
    try:
        return _ppid(pid) == parent
    except OSError:
        return False


def test_forkserver_off_starts_a_daemon_of_its_own(stacks: list[dict[str, Path]]) -> None:
    a = stacks[0]
    _mount(a, LAYERFS_FORKSERVER="0")
    daemon = _daemon(a)
    assert b"lowerdir=" in _cmdline(daemon)  # the helper's own argv: a forked helper
    assert not _cmdline(_ppid(daemon)).startswith(b"layerfs-forkserver")
    (a["merged"] / "new").write_text("y")
    _unmount(a)
    assert wait_no_daemon(a["merged"]) == []


USERNS_SCRIPT = """
set -e
"$@" overlay "$MNT" -o "lowerdir=$LOWER,upperdir=$UPPER,workdir=$WORK"
cat "$MNT/f" >/dev/null
for p in /proc/[0-9]*; do
    if tr '\\0' ' ' < $p/cmdline 2>/dev/null | grep -q "^layerfs $MNT"; then
        server=$(cut -d' ' -f4 $p/stat)
        echo "$server $(readlink /proc/$server/ns/user) $(tr '\\0' ' ' < /proc/$server/cmdline)"
    fi
done
fusermount3 -u "$MNT"
"""


def test_a_user_namespace_gets_a_server_of_its_own(stacks: list[dict[str, Path]]) -> None:
    """As rootless podman: a mount made by root of a new user and mount namespace is served
    by a server in that namespace, not by the one this namespace has."""
    a, b = stacks[:2]
    _mount(a)
    host_server = _server_of(a)
    r = run_helper_script(USERNS, USERNS_SCRIPT, b, TIMEOUT)
    assert r.returncode == 0, r.stderr
    server, userns, title = r.stdout.strip().split(" ", 2)
    assert title.startswith("layerfs-forkserver")
    assert userns != os.readlink("/proc/self/ns/user")
    assert int(server) != host_server
    assert _gone(int(server)), "the namespace's server outlived its mount"


FIRST_MOUNT_SCRIPT = """
set -e
PYTHONPROFILEIMPORTTIME=1 "$@" overlay "$MNT" -o "lowerdir=$LOWER,upperdir=$UPPER,workdir=$WORK" \
    2>"$IMPORTS"
cat "$MNT/f" >/dev/null
fusermount3 -u "$MNT"
"""


def test_a_first_mount_imports_only_what_it_needs(
    stacks: list[dict[str, Path]], tmp_path: Path
) -> None:
    """The first mount of a namespace (no server yet: its caller parses, checks, mounts and
    starts the server) imports neither dataclasses nor what the launcher leaves out; its
    caller is the one that mounted (premount, ctypes)."""
    b = stacks[1]
    imports = tmp_path / "imports"
    # in a mount namespace of its own no server can be up
    r = run_helper_script(MOUNTNS, FIRST_MOUNT_SCRIPT, b, TIMEOUT, IMPORTS=str(imports))
    assert r.returncode == 0, r.stderr
    lines = imports.read_text().splitlines()
    imported = {x.rpartition("|")[2].strip() for x in lines if x.startswith("import time:")}
    assert {"layerfs.premount", "ctypes", "mount_helper.options"} <= imported
    unwanted = {"dataclasses", "inspect", "typing", "functools", "collections", "enum"}
    assert not imported & (unwanted | {"site", "re"})


def _cgroup_hierarchy() -> tuple[bytes, bytes, bytes] | None:
    """(controllers key as /proc/PID/cgroup shows it, mount point, our path in it) of a
    hierarchy where a child cgroup can be made: cgroup v1's pids, else cgroup v2."""
    with open("/proc/self/cgroup", "rb") as f:
        ours = dict(line.rstrip(b"\n").split(b":", 2)[1:] for line in f)
    with open("/proc/self/mountinfo", "rb") as f:
        table = [line.partition(b" - ") for line in f]
    for key, fstype in ((b"pids", b"cgroup"), (b"", b"cgroup2")):
        for head, _, tail in table:
            fields, rest = head.split(), tail.split()
            if rest[0] != fstype or key not in ours or fields[3] != b"/":
                continue
            if key and key not in rest[2].split(b","):
                continue
            return key, fields[4], ours[key]
    return None


def _cgroup_of(pid: int, key: bytes) -> bytes:
    with open(f"/proc/{pid}/cgroup", "rb") as f:
        return dict(line.rstrip(b"\n").split(b":", 2)[1:] for line in f)[key]


def test_a_daemon_joins_its_callers_cgroup(stacks: list[dict[str, Path]]) -> None:
    """A mount made from another cgroup than the server's is served by a child that moved
    into that cgroup (accounted to, and stopped with, whoever mounted it)."""
    found = _cgroup_hierarchy()
    if found is None:
        pytest.skip("no cgroup hierarchy to make a child cgroup in")
    key, point, ours = found
    path = ours.rstrip(b"/") + f"/layerfs-forkserver-test-{os.getpid()}".encode()
    cgdir = point + path
    try:
        os.mkdir(cgdir)
    except OSError as e:
        pytest.skip(f"cannot make a cgroup here: {e}")
    a, b = stacks[:2]
    try:
        _mount(a)  # the server, in our cgroup
        opts = f"lowerdir={b['lower']},upperdir={b['upper']},workdir={b['work']}"
        script = 'echo $$ > "$CG/cgroup.procs" && exec "$@"'
        r = subprocess.run(
            ["sh", "-c", script, "sh", *helper_command(), "overlay", str(b["merged"]), "-o", opts],
            capture_output=True,
            text=True,
            env={**helper_env(), "CG": os.fsdecode(cgdir)},
            timeout=TIMEOUT,
            check=False,
        )
        if r.returncode != 0 and "cgroup.procs" in r.stderr:
            pytest.skip(f"cannot move a process into {os.fsdecode(cgdir)}: {r.stderr}")
        assert r.returncode == 0, r.stderr
        assert _server_of(b) == _server_of(a)
        assert _cgroup_of(_daemon(b), key) == path
        assert _cgroup_of(_daemon(a), key) == ours
        assert _cgroup_of(_server_of(a), key) == ours
    finally:
        reap(b["merged"])
        for _ in range(100):
            try:
                os.rmdir(cgdir)
                break
            except FileNotFoundError:
                break
            except OSError:  # EBUSY until the daemon has gone
                time.sleep(0.1)


def test_the_server_mounts_a_command_line(
    stacks: list[dict[str, Path]], tmp_path: Path, front: str
) -> None:
    """With a server up, mount.layerfs imports neither the option parser nor dataclasses (the
    C front end runs no Python at all): the server's child mounts its command line, relative
    paths taken from the caller's working directory, and the caller prints the child's
    warnings as its own."""
    a, b, c = stacks
    _mount(a)
    server = _server_of(a)
    opts = "lowerdir=lower,upperdir=upper1,workdir=work1,index=on"  # index: a warning
    r = _helper(b, opts, cwd=tmp_path, PYTHONPROFILEIMPORTTIME="1")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    imported = {x.rpartition("|")[2].strip() for x in lines if x.startswith("import time:")}
    if front == "c":
        assert imported == set()
    else:
        assert "mount_helper.main" in imported
        assert not imported & {"dataclasses", "mount_helper.argv", "layerfs.config", "typing"}
        assert not imported & {"site", "re", "collections"}  # the launcher setup.sh writes
        assert "os" not in imported  # posix is enough (layerfs.forkclient)
    assert _server_of(b) == server
    assert (b["merged"] / "f").read_text() == "x"
    (b["merged"] / "new").write_text("y")
    assert (b["upper"] / "new").read_text() == "y"
    # the same command line the ordinary way prints the same warnings
    r2 = _helper(c, opts.replace("1", "2"), cwd=tmp_path, LAYERFS_FORKSERVER="0")
    assert r2.returncode == 0, r2.stderr
    warnings = [x for x in lines if not x.startswith("import time:")]
    assert warnings == r2.stderr.splitlines() != []


@pytest.mark.parametrize("bad", ["redirect_dir=yes", "lowerdir=/nonexistent/layer"])
def test_a_refused_mount_reads_the_same_with_a_server(
    stacks: list[dict[str, Path]], bad: str
) -> None:
    """The server's child declines what it cannot mount, having done nothing: the caller
    reports it as without a server, and nothing is mounted."""
    a, b = stacks[:2]
    _mount(a)
    opts = f"lowerdir={b['lower']},upperdir={b['upper']},workdir={b['work']},{bad}"
    served, own = _helper(b, opts), _helper(b, opts, LAYERFS_FORKSERVER="0")
    assert served.returncode == own.returncode == 1
    assert served.stderr == own.stderr
    assert served.stderr.startswith("mount.layerfs: ")
    assert not is_mounted(b["merged"])
    assert daemon_pids(b["merged"]) == []


def test_a_root_short_of_cap_sys_admin_is_not_served(stacks: list[dict[str, Path]]) -> None:
    """A root that dropped CAP_SYS_ADMIN cannot mount; the server's child, which could, must
    not do it for it."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    a, b = stacks[:2]
    _mount(a)
    opts = f"lowerdir={b['lower']},upperdir={b['upper']},workdir={b['work']}"
    drop = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"]
    r = subprocess.run(
        [*drop, *helper_command(), "overlay", str(b["merged"]), "-o", opts],
        capture_output=True,
        text=True,
        env=helper_env(),
        timeout=TIMEOUT,
        check=False,
    )
    assert r.returncode == 1, r.stderr
    assert "cannot mount" in r.stderr
    assert not is_mounted(b["merged"])


def test_another_python_at_the_same_path_gets_another_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A venv remade with another interpreter (scripts/setup.sh) keeps its bin/python path:
    its mounts must not be served by a server of the old interpreter still up."""
    before = forkclient.address()
    monkeypatch.setattr(sys, "version", sys.version + " (another build)")
    assert forkclient.address() != before
    monkeypatch.undo()
    assert forkclient.address() == before


def test_each_engine_has_its_own_server(stacks: list[dict[str, Path]]) -> None:
    """LAYERFS_COMPILED picks the server (layerfs.compiled): a caller asking for the
    interpreted engine is never served by a server that preloaded the compiled one, nor the
    other way round. Needs the build (scripts/build_compiled.py, run by setup.sh)."""
    from layerfs import compiled

    built = Path(compiled.DIR) / "MANIFEST"
    assert built.is_file() and built.read_text() == compiled.manifest(), "build_compiled.py"
    a, b, c = stacks
    _mount(a, LAYERFS_COMPILED="1")
    _mount(b, LAYERFS_COMPILED="0")
    _mount(c, LAYERFS_COMPILED="1")
    assert _server_of(a) == _server_of(c) != _server_of(b)

    def lib_mapped(d: dict[str, Path]) -> bool:
        with open(f"/proc/{_daemon(d)}/maps") as f:
            return f"{compiled.DIR}/layerfs/engine__mypyc" in f.read()

    assert [lib_mapped(d) for d in stacks] == [True, False, True]


_FORKS = """
import os, sys, threading
from layerfs import forkserver
ran = []
os.register_at_fork(after_in_child=lambda: ran.append(1))
fork = forkserver._forker()
for second_thread in (False, True):
    if second_thread:
        threading.Thread(target=threading.Event().wait, args=(30,), daemon=True).start()
    pid = fork()
    if pid == 0:
        os._exit(10 + len(ran))
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_the_server_forks_without_the_after_fork_hooks_while_alone() -> None:
    """The server's fork (forkserver._forker) leaves out the interpreter's after-fork work
    while the process has one thread, the hooks given to os.register_at_fork included (their
    writes were ~0.7 MiB of each child's own pages); with a second thread it is os.fork."""
    r = subprocess.run(
        [sys.executable, "-c", _FORKS], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["10", "11"]  # alone: no hook ran; a second thread: it did


def test_the_server_preloads_the_compiled_raw_path(stacks: list[dict[str, Path]]) -> None:
    """The fork server imports layerfs._craw (where scripts/setup.sh built it) before it
    forks: a daemon serving with LAYERFS_LOOP=craw imports nothing of its own (importing it
    there made 0.3-0.4 MiB of each daemon's pages its own)."""
    craw = list(Path(forkserver.__file__).parent.glob("_craw*.so"))
    assert craw, "layerfs._craw is not built (scripts/setup.sh)"
    a = stacks[0]
    _mount(a, LAYERFS_LOOP="craw")
    with open(f"/proc/{_server_of(a)}/maps") as f:
        assert "/layerfs/_craw" in f.read()
