"""Real mounts through mount.layerfs, called exactly as its callers call it.

* containers/storage (drivers/overlay/overlay.go): ``PROGRAM -o LABEL TARGET`` with cmd.Dir =
  the driver home, lowerdirs through the ``l/<id>`` symlinks (relative in older releases,
  absolute in newer ones), stdout to /dev/null, stderr a pipe read to EOF, exit 0 = live mount.
* mount.fuse3 (libfuse util/mount.fuse.c): ``mount.fuse3 'PROG#SOURCE' MNT -o OPTS``, which
  runs ``PROG SOURCE MNT -o OPTS,dev,suid`` through /bin/sh.
* mount(8) (util-linux libmount exec_helper): ``mount -t fuse.layerfs SOURCE MNT -o OPTS`` and
  an fstab line run ``/sbin/mount.fuse.layerfs SOURCE MNT -o OPTS``. Tested in a private mount
  namespace with a scratch /usr/sbin holding only that helper, so the host's /sbin is untouched.

fuse-overlayfs runs the same tests as a stand-in: it proves the harness, and that layerfs
behaves as the program it replaces. After every unmount no daemon may be left behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from compat import helpers
from compat.helpers import (
    daemon_pids,
    engine_missing,
    helper_command,
    helper_env,
    is_mounted,
    reap,
    wait_no_daemon,
)
from support import acls

from mount_helper.argv import escape_path

pytestmark = pytest.mark.fuse

TIMEOUT = 60


@dataclass(frozen=True)
class Program:
    """A mount program under test and the FUSE type name it answers to (fuse.NAME)."""

    name: str
    exe: str


@pytest.fixture(params=["layerfs", "layerfs-py", "fuse-overlayfs"])
def program(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Program:
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("needs /dev/fuse and fusermount3 (apt-get install fuse3)")
    if request.param == "fuse-overlayfs":
        exe = shutil.which("fuse-overlayfs")
        if exe is None:
            pytest.skip("fuse-overlayfs not installed (apt-get install fuse-overlayfs)")
        return Program("fuse-overlayfs", exe)
    if why := engine_missing():
        pytest.skip(f"layerfs cannot mount yet: {why}")
    if request.param == "layerfs-py":  # the Python front end, run directly
        monkeypatch.setattr(helpers, "FRONT", "python")
    cmd = helper_command()
    if len(cmd) != 1:
        pytest.skip("mount.layerfs console script not installed (pip install -e .)")
    return Program("layerfs", cmd[0])


@dataclass
class Storage:
    """A containers/storage overlay driver home with two image layers and one container."""

    home: Path
    layer_links: tuple[str, str]  # l/<id> of the top and bottom layers
    container: str

    @property
    def merged(self) -> Path:
        return self.home / self.container / "merged"

    @property
    def diff(self) -> Path:
        return self.home / self.container / "diff"


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    home = tmp_path / "overlay"
    (home / "l").mkdir(parents=True)
    layers = {"TOPLAYER0000000000000000AA": "1111", "BOTLAYER0000000000000000BB": "2222"}
    for link, layer_id in layers.items():
        (home / layer_id / "diff").mkdir(parents=True)
        (home / "l" / link).symlink_to(f"../{layer_id}/diff")
    top, bottom = home / "1111" / "diff", home / "2222" / "diff"
    (top / "etc").mkdir()
    (top / "etc" / "os-release").write_text("top\n")
    (bottom / "etc").mkdir()
    (bottom / "etc" / "os-release").write_text("bottom\n")
    (bottom / "etc" / "hostname").write_text("base\n")
    (bottom / "bin").mkdir()
    (bottom / "bin" / "sh").write_text("#!shell\n")
    for sub in ("diff", "work", "merged"):
        (home / "ctr" / sub).mkdir(parents=True)
    top_link, bottom_link = (f"l/{k}" for k in layers)
    st = Storage(home, (top_link, bottom_link), "ctr")
    try:
        yield st
    finally:
        reap(st.merged)


def run_like_containers_storage(
    program: Program, storage: Storage, label: str, target: str
) -> tuple[int, str, float]:
    """exec(mountProgram, "-o", label, target), Dir = home, Stderr = a buffer, stdout unset."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [program.exe, "-o", label, target],
        cwd=storage.home,
        env=helper_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # Reading stderr to EOF must end when the program exits: a daemon that kept the pipe
        # open would hang podman here.
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{program.name}: stderr still open {TIMEOUT}s after the exec")
    return proc.returncode, err.decode(errors="replace"), time.perf_counter() - start


def check_merged_view(merged: Path) -> None:
    assert (merged / "etc" / "os-release").read_text() == "top\n"
    assert (merged / "etc" / "hostname").read_text() == "base\n"
    assert sorted(os.listdir(merged / "etc")) == ["hostname", "os-release"]
    assert (merged / "bin" / "sh").read_text() == "#!shell\n"


def unmount_and_check_exit(merged: Path, target: str | None = None) -> None:
    """Unmount MERGED and wait for its daemon to exit. A daemon started with a relative
    TARGET names only that in its command line: look for it under that name too."""
    r = subprocess.run(["fusermount3", "-u", str(merged)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(merged)
    for name in (merged, *([target] if target else [])):
        assert wait_no_daemon(name) == [], "daemon still running after fusermount3 -u"


@pytest.mark.parametrize("paths", ["relative", "absolute"])
def test_containers_storage_invocation(program: Program, storage: Storage, paths: str) -> None:
    top, bottom = storage.layer_links
    ctr = storage.container
    if paths == "absolute":
        h = storage.home
        label = f"lowerdir={h}/{top}:{h}/{bottom},upperdir={h}/{ctr}/diff,workdir={h}/{ctr}/work"
        target = str(storage.merged)
    else:
        label = f"lowerdir={top}:{bottom},upperdir={ctr}/diff,workdir={ctr}/work"
        target = f"{ctr}/merged"
    # the mountopt default and the SELinux label podman appends (comma inside the quotes)
    label += ',nodev,context="system_u:object_r:container_file_t:s0:c1,c2"'
    rc, err, took = run_like_containers_storage(program, storage, label, target)
    assert rc == 0, err
    print(f"{program.name}: exec to live mount {took * 1000:.0f} ms")
    assert is_mounted(storage.merged)  # live when the program exits, not later
    check_merged_view(storage.merged)

    (storage.merged / "etc" / "hostname").write_text("ctr\n")
    (storage.merged / "new").write_text("new\n")
    os.unlink(storage.merged / "bin" / "sh")
    unmount_and_check_exit(storage.merged, target)
    assert (storage.diff / "new").read_text() == "new\n"

    # A new daemon on the same upper right after the unmount sees what the old one wrote.
    rc, err, _ = run_like_containers_storage(program, storage, label, target)
    assert rc == 0, err
    assert (storage.merged / "etc" / "hostname").read_text() == "ctr\n"
    assert (storage.merged / "new").read_text() == "new\n"
    assert not (storage.merged / "bin" / "sh").exists()
    assert (storage.merged / "etc" / "os-release").read_text() == "top\n"
    unmount_and_check_exit(storage.merged, target)


def _as(uid: int, fn: Callable[[], None]) -> None:
    """Run FN in a child with uid and gid UID (a container process, as the host sees it)."""
    pid = os.fork()
    if pid == 0:  # child: never return into the test runner
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fn()
            code = 0
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0


def test_containers_storage_id_mapping(program: Program, storage: Storage) -> None:
    # podman --uidmap 0:500000:65536 with a mount program: containers/storage keeps the image's
    # ids on disk and passes the map, each range written ":C:H:N" (overlay.go).
    top, bottom = storage.layer_links
    ctr = storage.container
    low = storage.home / "2222" / "diff"
    os.chown(low / "bin" / "sh", 1, 2)
    os.chown(low / "etc" / "hostname", 70000, 70000)  # outside the range
    label = f"lowerdir={top}:{bottom},upperdir={ctr}/diff,workdir={ctr}/work"
    label += ",uidmapping=:0:500000:65536,gidmapping=:0:500000:65536"
    rc, err, _ = run_like_containers_storage(program, storage, label, f"{ctr}/merged")
    assert rc == 0, err
    m = storage.merged
    try:
        st = os.stat(m / "bin" / "sh")
        assert (st.st_uid, st.st_gid) == (500001, 500002)
        st = os.stat(m / "etc" / "os-release")
        assert (st.st_uid, st.st_gid) == (500000, 500000)
        st = os.stat(m / "etc" / "hostname")
        assert (st.st_uid, st.st_gid) == (65534, 65534)  # the overflow id
        os.chmod(m / "etc", 0o777)
        # a container's uid 7 (host 500007) creates a file: stored as 7 (through a dir fd
        # opened here: the test's tmp dirs are not searchable by others)
        etc = os.open(m / "etc", os.O_RDONLY | os.O_DIRECTORY)
        try:
            _as(500007, lambda: os.close(os.open("made", os.O_CREAT | os.O_WRONLY, dir_fd=etc)))
        finally:
            os.close(etc)
        assert os.stat(m / "etc" / "made").st_uid == 500007
        os.chown(m / "bin" / "sh", 500010, 500011)  # chown to shown ids: stored as 10, 11
    finally:
        unmount_and_check_exit(m)
    assert os.stat(storage.diff / "etc" / "made").st_uid == 7
    st = os.stat(storage.diff / "bin" / "sh")
    assert (st.st_uid, st.st_gid) == (10, 11)


def test_containers_storage_id_mapping_acls(program: Program, storage: Storage) -> None:
    """The named entries of POSIX ACLs are mapped as owners are, both ways (a kernel
    idmapped mount's mapping, tests/diff's layerfs-idmap against the kernel); an entry
    outside the range shows as the overflow id (the kernel shows (uid_t)-1, which FUSE
    refuses to pass) and cannot be set (EINVAL, as the kernel)."""
    if program.name == "fuse-overlayfs":
        pytest.skip("fuse-overlayfs shows and stores ACL entries unmapped")
    top, bottom = storage.layer_links
    ctr = storage.container
    low = storage.home / "2222" / "diff"
    hostname_acl = acls.acl("u::rw,u:1:r,u:70000:r,g::r,g:2:r,m::r,o::")
    os.setxattr(low / "etc" / "hostname", acls.ACCESS, hostname_acl)
    label = f"lowerdir={top}:{bottom},upperdir={ctr}/diff,workdir={ctr}/work"
    label += ",uidmapping=:0:500000:65536,gidmapping=:0:500000:65536"
    rc, err, _ = run_like_containers_storage(program, storage, label, f"{ctr}/merged")
    assert rc == 0, err
    m = storage.merged
    try:
        shown = acls.decode(os.getxattr(m / "etc" / "hostname", acls.ACCESS))
        assert shown == "u::rw-,u:500001:r--,g::r--,g:500002:r--,m::r--,o::---"
        sh_acl = acls.acl("u::rwx,u:500010:rx,g::rx,g:500011:r,m::rx,o::")
        os.setxattr(m / "bin" / "sh", acls.ACCESS, sh_acl)
        with pytest.raises(OSError) as e:
            os.setxattr(m / "bin" / "sh", acls.ACCESS, acls.acl("u::rwx,u:7:rx,g::rx,m::rx,o::"))
        assert e.value.errno == errno.EINVAL
        shown = acls.decode(os.getxattr(m / "bin" / "sh", acls.ACCESS))
        assert shown == "u::rwx,u:500010:r-x,g::r-x,g:500011:r--,m::r-x,o::---"
    finally:
        unmount_and_check_exit(m)
    stored = acls.decode(os.getxattr(storage.diff / "bin" / "sh", acls.ACCESS))
    assert stored == "u::rwx,u:10:r-x,g::r-x,g:11:r--,m::r-x,o::---"


def test_containers_storage_read_only(program: Program, storage: Storage) -> None:
    # overlay.go, read-only layer mount: lowerdir=<diff>:<lowers> and no upperdir.
    top, bottom = storage.layer_links
    rc, err, _ = run_like_containers_storage(
        program, storage, f"lowerdir={top}:{bottom},ro", f"{storage.container}/merged"
    )
    assert rc == 0, err
    check_merged_view(storage.merged)
    with pytest.raises(OSError):
        (storage.merged / "x").write_text("x")
    unmount_and_check_exit(storage.merged)


def test_lazy_unmount_ends_the_daemon(program: Program, storage: Storage) -> None:
    top, bottom = storage.layer_links
    label = f"lowerdir={top}:{bottom}"
    rc, err, _ = run_like_containers_storage(program, storage, label, f"{storage.container}/merged")
    assert rc == 0, err
    fd = os.open(storage.merged / "etc", os.O_RDONLY)  # keep the mount busy
    try:
        r = subprocess.run(["fusermount3", "-u", "-z", str(storage.merged)], capture_output=True)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(storage.merged)
    finally:
        os.close(fd)
    assert wait_no_daemon(storage.merged) == []


def test_mount_fuse3_form(program: Program, storage: Storage, tmp_path: Path) -> None:
    # mount -t fuse 'PROG#overlay' MNT runs mount.fuse3 like this; PROG comes from PATH.
    if shutil.which("mount.fuse3") is None:
        pytest.skip("mount.fuse3 not installed (apt-get install fuse3)")
    top, bottom = storage.layer_links
    h, ctr = storage.home, storage.container
    opts = f"lowerdir={h}/{top}:{h}/{bottom},upperdir={h}/{ctr}/diff,workdir={h}/{ctr}/work"
    env = helper_env()
    env["PATH"] = os.path.dirname(program.exe) + os.pathsep + env.get("PATH", "")
    prog = os.path.basename(program.exe)
    r = subprocess.run(
        ["mount.fuse3", f"{prog}#overlay", str(storage.merged), "-o", opts],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    check_merged_view(storage.merged)
    unmount_and_check_exit(storage.merged)


def test_containerd_mount_helper_form(program: Program, storage: Storage) -> None:
    # containerd mount_linux.go mountWithHelper: mount.fuse3 SOURCE TARGET -o O1 -o O2 ...
    # -t NAME (the type minus "fuse3."), output read with CombinedOutput (to EOF).
    if shutil.which("mount.fuse3") is None:
        pytest.skip("mount.fuse3 not installed (apt-get install fuse3)")
    top, bottom = storage.layer_links
    h, ctr = storage.home, storage.container
    env = helper_env()
    env["PATH"] = os.path.dirname(program.exe) + os.pathsep + env.get("PATH", "")
    args = ["overlay", str(storage.merged), "-o", f"lowerdir={h}/{top}:{h}/{bottom}"]
    args += ["-o", f"upperdir={h}/{ctr}/diff", "-o", f"workdir={h}/{ctr}/work"]
    args += ["-t", os.path.basename(program.exe)]
    r = subprocess.run(
        ["mount.fuse3", *args], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout
    check_merged_view(storage.merged)
    unmount_and_check_exit(storage.merged)


def test_source_mountpoint_shape(program: Program, storage: Storage) -> None:
    # What mount.fuse3 execs for containerd's fuse3 mounts: PROG overlay MNT -o OPTS.
    top, bottom = storage.layer_links
    h = storage.home
    opts = f"rw,lowerdir={h}/{top}:{h}/{bottom},dev,suid"
    r = subprocess.run(
        [program.exe, "overlay", str(storage.merged), "-o", opts],
        env=helper_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    check_merged_view(storage.merged)
    unmount_and_check_exit(storage.merged)


def test_escaped_and_non_utf8_paths(program: Program, tmp_path: Path) -> None:
    if program.name == "fuse-overlayfs":
        pytest.skip("fuse-overlayfs splits lowerdir on every ':' (no '\\:' escape)")
    base = os.fsencode(tmp_path)
    lower = base + b"/low,er:1 \xff"
    upper, work, merged = base + b"/up\\per", base + b'/wo"rk', base + b"/merged"
    for p in (lower, upper, work, merged):
        os.mkdir(p)
    with open(lower + b"/f", "w") as fh:
        fh.write("hi\n")
    opts = ",".join(
        f"{name}={escape_path(os.fsdecode(p))}"
        for name, p in (("lowerdir", lower), ("upperdir", upper), ("workdir", work))
    )
    try:
        r = subprocess.run(
            [program.exe, "-o", opts, os.fsdecode(merged)], env=helper_env(),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        with open(merged + b"/f") as fh:
            assert fh.read() == "hi\n"
        with open(merged + b"/g", "w") as fh:
            fh.write("g")
        unmount_and_check_exit(Path(os.fsdecode(merged)))
        assert os.path.exists(upper + b"/g")
    finally:
        reap(os.fsdecode(merged))


def mount_flags(mnt: Path) -> set[str]:
    """The per-mount options of ``mnt`` (field 6 of /proc/self/mountinfo)."""
    want = os.fsencode(os.path.realpath(mnt))
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            fields = line.split()
            if fields[4] == want:
                return set(fields[5].decode().split(","))
    raise AssertionError(f"{mnt} is not mounted")


@pytest.mark.parametrize(
    ("given", "expected", "absent"),
    [
        # containers/storage's default mountopt is "nodev"
        ("nodev,nosuid,noexec", {"nodev", "nosuid", "noexec"}, set()),
        ("dev,suid", set(), {"nodev", "nosuid"}),
    ],
)
def test_mount_flags_follow_options(
    program: Program, storage: Storage, given: str, expected: set[str], absent: set[str]
) -> None:
    top, bottom = storage.layer_links
    ctr = storage.container
    label = f"lowerdir={top}:{bottom},upperdir={ctr}/diff,workdir={ctr}/work,{given}"
    rc, err, _ = run_like_containers_storage(program, storage, label, f"{ctr}/merged")
    assert rc == 0, err
    flags = mount_flags(storage.merged)
    assert expected <= flags, flags
    assert not absent & flags, flags
    unmount_and_check_exit(storage.merged)


def test_device_nodes_by_default_as_root(program: Program, storage: Storage) -> None:
    # podman drops flag options (mountopt = "nodev") before it runs the program: the label
    # below is what it sends (test_options: test_podman_4_3_golden_argv). layerfs then mounts
    # as kernel overlayfs does without options: devices and setuid work where the caller's
    # privileges allow (root here; a user namespace's mounts never honour device nodes).
    # fuse-overlayfs keeps libfuse's nodev.
    top, bottom = storage.layer_links
    ctr = storage.container
    label = f"lowerdir={top}:{bottom},upperdir={ctr}/diff,workdir={ctr}/work,volatile"
    rc, err, _ = run_like_containers_storage(program, storage, label, f"{ctr}/merged")
    assert rc == 0, err
    try:
        flags = mount_flags(storage.merged)
        assert "nosuid" not in flags
        assert ("nodev" in flags) == (program.name == "fuse-overlayfs"), flags
        if program.name == "layerfs":
            os.mknod(storage.merged / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            with open(storage.merged / "null", "wb") as fh:  # nodev: EACCES
                fh.write(b"x")
    finally:
        unmount_and_check_exit(storage.merged)


NAMESPACE_SCRIPT = r"""
set -eu
mount --bind "$SBIN" /usr/sbin
# 1. mount -t fuse.NAME SOURCE MNT -o OPTS
mount -t "fuse.$NAME" overlay "$MNT" -o "$OPTS"
cat "$MNT/etc/os-release" "$MNT/etc/hostname"
fusermount3 -u "$MNT"
# 2. an fstab line, mounted by its mount point
printf 'overlay %s fuse.%s %s,nofail,x-systemd.requires=foo 0 0\n' "$MNT" "$NAME" "$OPTS" \
    > "$FSTAB"
mount -T "$FSTAB" "$MNT"
cat "$MNT/etc/os-release"
grep -c " $MNT " /proc/self/mountinfo
fusermount3 -u "$MNT"
echo done
"""


def test_mount8_type_and_fstab(program: Program, storage: Storage, tmp_path: Path) -> None:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare (util-linux) for a private mount namespace")
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    # What `mount.layerfs --install-mount-helper` puts into /sbin (= /usr/sbin on Debian).
    (sbin / f"mount.fuse.{program.name}").symlink_to(program.exe)
    top, bottom = storage.layer_links
    h = storage.home
    env = helper_env()
    env.update(
        SBIN=str(sbin),
        NAME=program.name,
        MNT=str(storage.merged),
        OPTS=f"lowerdir={h}/{top}:{h}/{bottom}",
        FSTAB=str(tmp_path / "fstab"),
    )
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", NAMESPACE_SCRIPT],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["top", "base", "top", "1", "done"], r.stdout + r.stderr
    assert wait_no_daemon(storage.merged) == []


def test_second_mount_of_one_upper_is_busy(
    program: Program, storage: Storage, tmp_path: Path
) -> None:
    """Two daemons on one upper would corrupt it (a second Mounts of one containerd snapshot,
    a second podman mount): the second mount fails with EBUSY while the first serves on. A
    mount made while the previous daemon is still exiting after its unmount (ctr unmounts its
    temporary mount of a rootfs and the shim mounts it at once) waits for it and succeeds."""
    if program.name != "layerfs":
        pytest.skip("fuse-overlayfs does not lock its workdir")
    top, bottom = storage.layer_links
    h, ctr = storage.home, storage.container
    label = f"lowerdir={h}/{top}:{h}/{bottom},upperdir={h}/{ctr}/diff,workdir={h}/{ctr}/work"
    second = tmp_path / "second"
    second.mkdir()
    code, err, _ = run_like_containers_storage(program, storage, label, str(storage.merged))
    assert code == 0, err
    first = daemon_pids(storage.merged)
    try:
        code, err, _ = run_like_containers_storage(program, storage, label, str(second))
        assert code != 0 and "EBUSY" in err, err
        assert not is_mounted(second)
        check_merged_view(storage.merged)
        # unmount while the daemon is stopped: it still holds the lock when the next mount
        # starts, and lets go when it runs on and exits
        for pid in first:
            os.kill(pid, signal.SIGSTOP)
        subprocess.run(["fusermount3", "-u", "-z", str(storage.merged)], check=True)
        threading.Timer(1.0, lambda: [os.kill(p, signal.SIGCONT) for p in first]).start()
        code, err, _ = run_like_containers_storage(program, storage, label, str(second))
        assert code == 0, err
        check_merged_view(second)
        unmount_and_check_exit(second)
    finally:
        for pid in first:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        reap(second)


@pytest.mark.kernel_overlay
def test_kernel_overlay_refuses_a_busy_workdir_with_index_on(tmp_path: Path) -> None:
    """The reference for the test above: kernel overlayfs's EBUSY (it only warns without
    index=on)."""
    for d in ("lower", "upper", "work", "m1", "m2"):
        (tmp_path / d).mkdir()
    opts = f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,workdir={tmp_path}/work,index=on"
    mount = ["mount", "-t", "overlay", "overlay", "-o", opts]
    subprocess.run([*mount, str(tmp_path / "m1")], check=True)
    try:
        r = subprocess.run([*mount, str(tmp_path / "m2")], capture_output=True, text=True)
        # mount(8) words EBUSY from overlay oddly ("already mounted on ..."); the kernel log
        # says "upperdir is in-use as upperdir/workdir of another mount"
        busy = r.returncode != 0 and not os.path.ismount(tmp_path / "m2")
    finally:
        for m in ("m2", "m1"):
            subprocess.run(["umount", str(tmp_path / m)], capture_output=True)
    assert busy, r.stderr
