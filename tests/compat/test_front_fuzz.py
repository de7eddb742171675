"""The C front end against the Python one on random command lines (mount_helper/front.c).

The C front end either has the fork server's child mount the command line (the thin request)
or execs the Python front end, which then does everything as if run directly. So for any
command line, environment and working directory the two programs must end alike: the same
exit status, the same output and messages, a mount in both or in neither (on an error:
nothing mounted, no daemon left). Drawn: mount(8)'s and fuse's shapes (source, mount point,
``-o`` glued or not, repeated, flags known and not, ``--``), the options with good, bad,
relative, missing and non-UTF-8 values, the program's name (``mount.fuse.layerfs``), the
environment (``LAYERFS_FORKSERVER=0``, another variable) and whether a fork server is up in
the namespace (another mount of this code live there) or not. Each program runs in a private
mount namespace of the test (``nsenter``), so no other test's server or mount is met; the
rootless case in a user namespace of its own too (``unshare -U -r``).

LAYERFS_FRONT_FUZZ_EXAMPLES (default 12) sets the budget.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from compat.helpers import c_front_built, daemon_pids, helper_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

EXAMPLES = int(os.environ.get("LAYERFS_FRONT_FUZZ_EXAMPLES", "12"))
TIMEOUT = 60
BAD = b"bad\xff"  # a name that is not UTF-8


class Namespace:
    """A private mount namespace held by a sleeping process; commands run in it by nsenter.
    ROOTLESS: in a user namespace of its own too (``unshare -U -r``, rootless podman's)."""

    def __init__(self, rootless: bool = False) -> None:
        user = ["-U", "-r"] if rootless else []
        self.holder = subprocess.Popen(
            ["unshare", *user, "-m", "--propagation", "private", "sleep", "100000"],
            start_new_session=True,
        )
        ns = f"/proc/{self.holder.pid}/ns/mnt"
        deadline = time.monotonic() + TIMEOUT
        while os.stat(ns).st_ino == os.stat("/proc/self/ns/mnt").st_ino:
            assert time.monotonic() < deadline, "unshare made no namespace"
            time.sleep(0.01)
        userns = [f"--user=/proc/{self.holder.pid}/ns/user"] if rootless else []
        self.enter = ["nsenter", *userns, f"--mount={ns}", "--"]

    def run(
        self, argv: list[bytes], cwd: Path, env: dict[str, str]
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*map(os.fsencode, self.enter), *argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            capture_output=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip

    def front(
        self, argv: list[bytes], root: Path, env: dict[str, str]
    ) -> tuple[subprocess.CompletedProcess[bytes], list[bytes]]:
        """Run a front end in ROOT: its outcome and what it mounted under ROOT. One that
        serves in the foreground (-f, debug) is ended by the unmount of its mount."""
        proc = subprocess.Popen(
            [*map(os.fsencode, self.enter), *argv], cwd=root, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            mounted = _clean(self, root)  # a foreground daemon: its unmount ends it
            out, err = proc.communicate(timeout=TIMEOUT)
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), mounted
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), _clean(self, root)

    def mounts_under(self, root: Path) -> list[bytes]:
        """The mount points under ROOT in the namespace."""
        with open(f"/proc/{self.holder.pid}/mountinfo", "rb") as f:
            points = [line.split()[4] for line in f]
        want = os.fsencode(root) + b"/"
        return [p for p in points if p.startswith(want)]

    def unmount(self, point: bytes) -> None:
        """Detach POINT (umount -l: fusermount3 refuses in a user namespace)."""
        self.run([b"umount", b"-l", point], Path("/"), dict(os.environ))

    def close(self) -> None:
        os.killpg(self.holder.pid, signal.SIGKILL)
        self.holder.wait()


def _clean(ns: Namespace, root: Path) -> list[bytes]:
    """Unmount what the run left under ROOT and wait for its daemons: the mount points."""
    points = ns.mounts_under(root)
    for p in points:
        ns.unmount(p)
    deadline = time.monotonic() + 20
    while daemon_pids(f"{root}/") and time.monotonic() < deadline:
        time.sleep(0.05)
    return points


@pytest.fixture(params=[False, True], ids=["root", "rootless"])
def namespaces(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, Namespace]]:
    """Two namespaces: "none" with no server (nothing of ours mounted there between runs) and
    "up", where a mount of this code stays live (its server serves the thin requests); in a
    user namespace of their own too for the rootless case."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("needs root, unshare and nsenter")
    if not c_front_built():
        pytest.skip("the C front end of mount.layerfs is not built (scripts/setup.sh)")
    made: dict[str, Namespace] = {}
    keep = tmp_path / "keep"
    try:
        made["none"] = Namespace(request.param)
        made["up"] = up = Namespace(request.param)
        for name in ("lower", "upper", "work", "merged"):
            (keep / name).mkdir(parents=True)
        opts = f"lowerdir={keep}/lower,upperdir={keep}/upper,workdir={keep}/work"
        py = os.fsencode(Path(sys.executable).with_name("mount.layerfs-py"))
        r = up.run([py, b"overlay", os.fsencode(keep / "merged"), b"-o", opts.encode()],
                   tmp_path, helper_env())  # fmt: skip
        assert r.returncode == 0, r.stderr
        yield made
    finally:
        for ns in made.values():
            _clean(ns, tmp_path)
            ns.close()


_flags = st.sampled_from(["-f", "-n", "-v", "-s", "-w", "-r", "-x", "--bogus", "-h", "-V", "--"])


def _options(d: dict[str, bytes]) -> st.SearchStrategy[bytes]:
    lowers = st.sampled_from([
        d["lower"], d["lower"] + b":" + d["lower2"], b"lower", b"lower:lower2", b"/nonexistent",
        d["lower"] + b"::" + d["lower2"], b"", d["bad"], d["lower"] + b"\\:x", d["upper"],
    ])  # fmt: skip
    one = st.one_of(
        lowers.map(lambda v: b"lowerdir=" + v),
        st.sampled_from([d["upper"], b"upper", b"/nonexistent", d["lower"], b""]).map(
            lambda v: b"upperdir=" + v
        ),
        st.sampled_from([d["work"], b"work", d["upper"], b"/nonexistent", b""]).map(
            lambda v: b"workdir=" + v
        ),
        st.sampled_from(
            [
                b"ro",
                b"rw",
                b"metacopy=on",
                b"metacopy=yess",
                b"fsync=volatile",
                b"fsync=2",
                b"fsync=strict",
                b"volatile",
                b"redirect_dir=on",
                b"redirect_dir=yes",
                b"index=off",
                b"index=on",
                b"userxattr",
                b"uidmapping=0:1000:10",
                b"uidmapping=0:1000",
                b"gidmapping=0:0:65536",
                b"share=2",
                b"share=x",
                b"noatime",
                b"x-systemd.automount",
                b'context="a,b"',
                b"unknownopt=1",
                b"",
                b"allow_other",
                b"default_permissions",
                b"squash_to_root",
                b"nfs_export=off",
                b"xino=off",
                b"dev",
                b"suid",
                b"exec",
                b"fsname=x",
                b"subtype=y",
            ]
        ),
    )
    good = st.sampled_from([  # a stack that mounts, mostly: options around it
        [b"lowerdir=" + d["lower"], b"upperdir=" + d["upper"], b"workdir=" + d["work"]],
        [b"lowerdir=lower:lower2", b"upperdir=upper", b"workdir=work"],
        [b"lowerdir=" + d["lower"] + b":" + d["lower2"]],
    ])  # fmt: skip
    some = st.lists(one, min_size=0, max_size=3)
    # with the daemon's log in a file (checked after each run)
    mixed = st.tuples(good, some, st.randoms()).map(
        lambda t: _shuffled([*t[0], d["log"], *t[1]], t[2])
    )
    return st.one_of(mixed, mixed, st.lists(one, max_size=6)).map(b",".join)


def _shuffled(items: list[bytes], rnd: random.Random) -> list[bytes]:
    rnd.shuffle(items)
    return items


def _argv(d: dict[str, bytes]) -> st.SearchStrategy[list[bytes]]:
    mnts = st.sampled_from([d["merged"], b"merged", b"/nonexistent/m", d["file"], d["badmnt"]])
    opts = _options(d)
    standard = st.tuples(st.sampled_from([b"overlay", b"", b"layerfs"]), mnts, opts).map(
        lambda t: [t[0], t[1], b"-o", t[2]]
    )
    glued = st.tuples(mnts, opts).map(lambda t: [b"overlay", t[0], b"-o" + t[1]])
    shuffled = st.lists(
        st.one_of(_flags.map(str.encode), opts.map(lambda o: b"-o" + o), mnts, st.just(b"o")),
        max_size=6,
    )
    return st.one_of(standard, standard, glued, shuffled, st.tuples(standard, st.lists(
        _flags.map(str.encode), max_size=2)).map(lambda t: [*t[1], *t[0]]))  # fmt: skip


def _stack(root: Path) -> dict[str, bytes]:
    """The directories a command line may name, emptied (not made anew: a daemon of the last
    run may still be opening them, and must meet its own workdir's lock)."""
    for name in ("lower", "lower2", "upper", "work", "merged", "badmnt"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for name in ("upper", "work"):
        for entry in (root / name).iterdir():
            shutil.rmtree(entry)
    (root / "daemon.log").unlink(missing_ok=True)
    (root / "lower" / "f").write_text("x")
    os.makedirs(os.fsencode(root) + b"/" + BAD, exist_ok=True)
    (root / "file").write_text("not a directory")
    d = {name: os.fsencode(root / name) for name in ("lower", "lower2", "upper", "work")}
    d |= {"merged": os.fsencode(root / "merged"), "file": os.fsencode(root / "file")}
    d |= {"bad": os.fsencode(root) + b"/" + BAD, "badmnt": os.fsencode(root / "badmnt")}
    d |= {"log": b"log=" + os.fsencode(root / "daemon.log")}  # the daemon's, checked after
    return d


def test_c_front_ends_as_the_python_one(tmp_path: Path, namespaces: dict[str, Namespace]) -> None:
    bindir = Path(sys.executable).parent
    fronts = {"c": bindir / "mount.layerfs", "python": bindir / "mount.layerfs-py"}
    names = {}  # mount(8)'s helper name for each front end: a link in a directory of its own
    for kind, prog in fronts.items():
        (tmp_path / kind).mkdir()
        names[kind] = tmp_path / kind / "mount.fuse.layerfs"
        names[kind].symlink_to(prog)
    root = tmp_path / "s"
    d = _stack(root)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        argv=_argv(d),
        helper_name=st.booleans(),
        server=st.sampled_from(["none", "up"]),
        env=st.sampled_from([{}, {"LAYERFS_FORKSERVER": "0"}, {"LAYERFS_OTHER": "1"}]),
    )
    def run(argv: list[bytes], helper_name: bool, server: str, env: dict[str, str]) -> None:
        ns = namespaces[server]
        seen = {}
        for kind in ("c", "python"):
            _stack(root)
            prog = names[kind] if helper_name else fronts[kind]
            r, mounted = ns.front([os.fsencode(prog), *argv], root, {**helper_env(), **env})
            log = root / "daemon.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            assert " ERROR " not in text, f"{kind}: the daemon's log, argv {argv!r}:\n{text}"
            err = r.stderr.replace(os.fsencode(prog), b"PROG")
            seen[kind] = (r.returncode, r.stdout, err, mounted)
            if r.returncode != 0:
                assert not mounted, f"{kind}: exit {r.returncode} with {mounted}: {r.stderr!r}"
            assert b"Traceback" not in r.stderr, f"{kind}: {r.stderr.decode(errors='replace')}"
        assert seen["c"] == seen["python"], (
            f"argv {argv!r}:\n c: {seen['c']!r}\n py: {seen['python']!r}"
        )

    run()
