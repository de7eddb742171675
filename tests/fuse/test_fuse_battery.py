"""Direct checks on a mounted subject that need no kernel reference.

Each test mounts the real command in a subprocess (support.mounts), which also checks that the
daemon logged no error and exited by itself after ``fusermount3 -u``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shlex
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.layerspec import HardLink, LayerSpec, d, f, sym
from support.mounts import (
    EXIT_TIMEOUT,
    KERNEL,
    Layout,
    Subject,
    is_mounted,
    layerfs_command,
    stop_if_held,
    subject_named,
    unmount_fuse,
)

pytestmark = pytest.mark.fuse


def _requests(mnt: Path, op: str) -> int:
    """How many OP requests the layerfs daemon at MNT has served (its statistics xattr;
    reading it is a GETXATTR itself)."""
    stats = json.loads(os.getxattr(mnt, "trusted.layerfs.statistics"))
    return int(stats.get(f"req_{op}", 0))


def _layout(tmp_path: Path, spec: LayerSpec, *, upper: bool = True) -> Layout:
    layout = Layout.create(tmp_path / "fs", len(spec.layers), upper=upper)
    spec.materialize(layout.lowers)
    return layout


SIMPLE = LayerSpec(
    [d({b"top": f(b"t")}), d({b"f": f(b"lower"), b"dir": d({b"x": f()}), b"empty": d()})]
)


def _quirk(request: pytest.FixtureRequest, subject: Subject, quirk: str) -> None:
    if quirk in subject.quirks:
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=quirk))


def _session_processes(sid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of stat: session id
            out.append(int(entry))
    return out


def test_daemon_exits_after_fusermount(tmp_path: Path, subject: Subject) -> None:
    layout = _layout(tmp_path, SIMPLE)
    with layout.mount(subject) as m:
        assert m.proc is not None
        sid = m.proc.pid
        assert (m.mnt / "f").read_bytes() == b"lower"
        r = subprocess.run(["fusermount3", "-u", str(m.mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        held = stop_if_held(m.mnt, [m.proc.pid])  # another namespace's copy: stopped
        assert m.proc.wait(timeout=EXIT_TIMEOUT) == 0 or held
    assert not is_mounted(layout.mnt)
    assert _session_processes(sid) == [], "processes left behind by the daemon"


def _detached_command(subject: Subject, layout: Layout) -> list[str]:
    lowers = ":".join(map(str, layout.lowers))
    if subject.name == "layerfs":
        return [
            *layerfs_command(),
            "mount",
            lowers,
            str(layout.upper),
            str(layout.mnt),
            "--workdir",
            str(layout.work),
        ]
    return [
        "fuse-overlayfs",
        "-o",
        f"lowerdir={lowers},upperdir={layout.upper},workdir={layout.work}",
        str(layout.mnt),
    ]


def _pids_with_arg(arg: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if os.fsencode(arg) in fh.read().split(b"\0"):
                        out.append(int(entry))
            except OSError:
                pass
    return out


def test_detached_mount_is_live_on_return_and_daemon_exits(
    tmp_path: Path, subject: Subject
) -> None:
    layout = _layout(tmp_path, SIMPLE)
    # Pipes that stay open would keep a caller such as containers/storage waiting forever.
    r = subprocess.run(
        _detached_command(subject, layout),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    try:
        assert r.returncode == 0, r.stderr
        assert is_mounted(layout.mnt), "the command returned before the mount was live"
        assert (layout.mnt / "f").read_bytes() == b"lower"
        assert _pids_with_arg(str(layout.mnt)), "no daemon process found"
    finally:
        problems = unmount_fuse(layout.mnt)
    assert not problems
    stop_if_held(layout.mnt, _pids_with_arg(str(layout.mnt)))
    deadline = time.monotonic() + EXIT_TIMEOUT
    while _pids_with_arg(str(layout.mnt)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pids_with_arg(str(layout.mnt)) == [], "daemon still running after unmount"


ODD = [b"\xff\xfe\xfd", b"new\nline", b"tab\there", b"n" * 255, b"\xe2\x80\xae-rtl"]


def test_odd_names(tmp_path: Path, subject: Subject, request: pytest.FixtureRequest) -> None:
    _quirk(request, subject, "namemax-251")
    spec = LayerSpec(
        [d({b"d": d({n: f(n[:10]) for n in ODD})}), d({b"d": d({b"l" * 255: f(b"low")})})]
    )
    layout = _layout(tmp_path, spec)
    with layout.mount(subject) as m:
        base = os.fsencode(m.mnt / "d")
        assert sorted(os.listdir(base)) == sorted([*ODD, b"l" * 255])
        for n in ODD:
            with open(base + b"/" + n, "rb") as fh:
                assert fh.read() == n[:10]
        for n in (b"\xc0new", b"m" * 255, b"x\ny"):
            with open(base + b"/" + n, "wb") as fh:
                fh.write(b"created")
            assert os.lstat(base + b"/" + n).st_size == 7
            os.rename(base + b"/" + n, base + b"/" + n[:-1] + b"Z")
        with pytest.raises(OSError) as exc:
            os.open(base + b"/" + b"q" * 256, os.O_WRONLY | os.O_CREAT)
        assert exc.value.errno == errno.ENAMETOOLONG
        with pytest.raises(OSError) as exc:
            os.lstat(base + b"/" + b"q" * 256)
        assert exc.value.errno == errno.ENAMETOOLONG
    assert (layout.upper / os.fsdecode(b"d/" + b"m" * 254 + b"Z")).exists()  # type: ignore[operator]


def test_inodes_and_nlink(tmp_path: Path, subject: Subject, request: pytest.FixtureRequest) -> None:
    _quirk(request, subject, "hardlink-copyup")
    spec = LayerSpec(
        [
            d({b"single": f(b"1")}),
            d({b"a": f(b"shared"), b"b": HardLink(b"a"), b"dir": d({b"f": f()})}),
        ]
    )
    layout = _layout(tmp_path, spec)
    with layout.mount(subject) as m:
        st_a, st_b = os.lstat(m.mnt / "a"), os.lstat(m.mnt / "b")
        assert st_a.st_ino == st_b.st_ino and st_a.st_nlink == st_b.st_nlink == 2
        ino_single = os.lstat(m.mnt / "single").st_ino
        ino_dir = os.lstat(m.mnt / "dir").st_ino
        # Copy-up keeps st_ino (kernel: OVL_CONST_INO for files with one link, and dirs).
        with open(m.mnt / "single", "ab") as fh:
            fh.write(b"more")
        (m.mnt / "dir" / "new").write_bytes(b"n")
        assert os.lstat(m.mnt / "single").st_ino == ino_single
        assert os.lstat(m.mnt / "dir").st_ino == ino_dir
        # New hard links through the mount share st_ino and count.
        (m.mnt / "c").write_bytes(b"c")
        os.link(m.mnt / "c", m.mnt / "dir" / "c2")
        st_c, st_c2 = os.lstat(m.mnt / "c"), os.lstat(m.mnt / "dir" / "c2")
        assert st_c.st_ino == st_c2.st_ino and st_c.st_nlink == st_c2.st_nlink == 2
        with os.scandir(m.mnt) as it:
            d_inos = {e.name: e.inode() for e in it}
        assert d_inos["c"] == st_c.st_ino and d_inos["single"] == ino_single
        os.unlink(m.mnt / "c")
        assert os.lstat(m.mnt / "dir" / "c2").st_nlink == 1
        # Write through one name of a lower hard link: the kernel (index=off) breaks the link.
        with open(m.mnt / "a", "r+b") as fh:
            fh.write(b"SHARED")
        assert (m.mnt / "b").read_bytes() == b"shared"
        assert os.lstat(m.mnt / "a").st_ino != os.lstat(m.mnt / "b").st_ino


def test_statfs(tmp_path: Path, subject: Subject, request: pytest.FixtureRequest) -> None:
    _quirk(request, subject, "namemax-251")
    layout = _layout(tmp_path, SIMPLE)
    with layout.mount(subject) as m:
        sv = os.statvfs(m.mnt)
        assert sv.f_bsize > 0 and sv.f_blocks > 0 and sv.f_namemax >= 255
        up = os.statvfs(layout.upper)  # type: ignore[arg-type]
        # Free space is the upper's, where writes go (it changes as others write: no equality).
        assert sv.f_blocks * sv.f_frsize == up.f_blocks * up.f_frsize


WRITES: dict[str, Callable[[Path], object]] = {
    "create": lambda p: os.close(os.open(p / "new", os.O_WRONLY | os.O_CREAT)),
    "write-open": lambda p: os.close(os.open(p / "f", os.O_WRONLY)),
    "truncate": lambda p: os.truncate(p / "f", 0),
    "mkdir": lambda p: os.mkdir(p / "nd"),
    "unlink": lambda p: os.unlink(p / "f"),
    "rmdir": lambda p: os.rmdir(p / "empty"),
    "rename": lambda p: os.rename(p / "f", p / "g"),
    "chmod": lambda p: os.chmod(p / "f", 0o600),
    "utime": lambda p: os.utime(p / "f", ns=(1, 1)),
    "setxattr": lambda p: os.setxattr(p / "f", "user.x", b"1"),
    "symlink": lambda p: os.symlink("f", p / "s"),
    "link": lambda p: os.link(p / "f", p / "l"),
}


def test_readonly_stack_erofs(tmp_path: Path, subject: Subject) -> None:
    layout = _layout(tmp_path, SIMPLE, upper=False)
    with layout.mount(subject) as m:
        assert (m.mnt / "f").read_bytes() == b"lower"
        got = {}
        for name, fn in WRITES.items():
            try:
                fn(m.mnt)
                got[name] = "ok"
            except OSError as e:
                got[name] = errno.errorcode[e.errno or 0]
        assert got == dict.fromkeys(WRITES, "EROFS")
    for low in layout.lowers:
        assert not os.path.lexists(low / "new")


def _chrooted(root: Path, code: str) -> subprocess.CompletedProcess[str]:
    prog = f"import os, sys\nos.chroot({str(root)!r})\nos.chdir('/')\n{code}"
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60)


def test_layer_symlinks_never_followed_by_daemon(
    tmp_path: Path, subject: Subject, request: pytest.FixtureRequest
) -> None:
    """Symlinks in layers pointing outside: resolved only by the kernel, in the merged view.

    The canary's absolute path also exists inside the layers, with a decoy file. A process
    chrooted into the mount that writes through the layer symlink must reach the decoy (the
    kernel resolves the target inside the merged view), and the real canary must not change
    by any operation on the symlinks.
    """
    _quirk(request, subject, "symlink-xattr-follows")
    outside = tmp_path / "outside"
    outside.mkdir()
    canary = outside / "canary"
    canary.write_bytes(b"canary")
    os.utime(canary, ns=(10**18, 10**18))
    before = os.lstat(canary)
    rel = os.fsencode(canary).lstrip(b"/").split(b"/")
    decoy = d({rel[-1]: f(b"decoy")})
    for part in reversed(rel[:-1]):
        decoy = d({part: decoy})
    spec = LayerSpec(
        [
            d(
                {
                    b"x": sym(os.fsencode(canary)),
                    b"xd": sym(os.fsencode(outside)),
                    b"up": sym(
                        b"../../../../../../../../../../" + os.fsencode(canary).lstrip(b"/")
                    ),
                }
            ),
            decoy,
        ]
    )
    layout = _layout(tmp_path, spec)
    with layout.mount(subject) as m:
        assert os.readlink(m.mnt / "x") == str(canary)
        r = _chrooted(
            m.mnt,
            "\n".join(
                [
                    "open('/x', 'r+b').write(b'WROTE')",
                    "open('/up', 'ab').write(b'+UP')",
                    "open('/xd/new', 'wb').write(b'n')",
                    "print(open('/x', 'rb').read())",
                ]
            ),
        )
        assert r.returncode == 0, r.stderr
        # Operations on the links themselves, from outside the chroot.
        os.chown(m.mnt / "x", 4321, 4321, follow_symlinks=False)
        os.utime(m.mnt / "x", ns=(5, 5), follow_symlinks=False)
        os.setxattr(m.mnt / "x", "trusted.canary", b"1", follow_symlinks=False)
        os.link(m.mnt / "x", m.mnt / "x2", follow_symlinks=False)
        os.rename(m.mnt / "x2", m.mnt / "x3")
        os.unlink(m.mnt / "x3")
        assert os.readlink(m.mnt / "x") == str(canary)
        assert os.lstat(m.mnt / "x").st_uid == 4321
        decoy_path = m.mnt / os.fsdecode(b"/".join(rel))
        assert decoy_path.read_bytes() == b"WROTE+UP"
        assert (m.mnt / os.fsdecode(b"/".join(rel[:-1])) / "new").read_bytes() == b"n"
    after = os.lstat(canary)
    assert canary.read_bytes() == b"canary"
    assert (after.st_uid, after.st_gid, after.st_mtime_ns, after.st_mode) == (
        before.st_uid,
        before.st_gid,
        before.st_mtime_ns,
        before.st_mode,
    )
    assert os.listxattr(canary) == []
    assert os.listdir(outside) == ["canary"]


def _namespace_holder(script: str, *args: str) -> subprocess.Popen[bytes]:
    """sh -c SCRIPT in a mount namespace of its own, made now: it holds a copy of every mount
    of ours, as anyone's ``unshare -m`` or container does. SCRIPT prints a line first."""
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == b"in\n"
    return holder


def test_a_copy_in_another_namespace_is_served_until_it_goes(
    tmp_path: Path, subject: Subject
) -> None:
    """After our fusermount3 -u, a copy of the mount in another mount namespace keeps the
    kernel's session: the daemon serves it, then exits by itself once that namespace ends."""
    layout = _layout(tmp_path, SIMPLE)
    with layout.mount(subject) as m:
        assert m.proc is not None
        holder = _namespace_holder('echo in && read _ && cat "$1"', str(m.mnt / "f"))
        try:
            r = subprocess.run(["fusermount3", "-u", str(m.mnt)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            assert not is_mounted(m.mnt)
            out, _ = holder.communicate(b"\n", timeout=EXIT_TIMEOUT)
            assert (holder.returncode, out) == (0, b"lower")
        finally:
            holder.kill()
            holder.wait()
        assert m.proc.wait(timeout=EXIT_TIMEOUT) == 0


def test_harness_stops_a_daemon_held_elsewhere(tmp_path: Path, subject: Subject) -> None:
    """The suite's teardown tells such a daemon from one that does not exit (the load-only
    "daemon still running 20 s after unmount": another engineer's rootless test made its
    namespaces while ours were mounted): it names the holder and stops the daemon."""
    layout = _layout(tmp_path, SIMPLE)
    holder = None
    try:
        with layout.mount(subject) as m:
            assert m.proc is not None
            holder = _namespace_holder("echo in && exec sleep 600")
        # leaving the block raised nothing: the daemon exited, its log clean
        assert [h.split()[0] for h in m.held_by] == [str(holder.pid)]
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()


def test_lazy_unmount_with_open_file(tmp_path: Path, subject: Subject) -> None:
    """fusermount3 -u -z while a file is open: the daemon exits once the last user is gone."""
    layout = _layout(tmp_path, SIMPLE)
    with layout.mount(subject) as m:
        assert m.proc is not None
        fh = open(m.mnt / "f", "rb")  # noqa: SIM115 (kept open across the unmount)
        try:
            r = subprocess.run(["fusermount3", "-u", "-z", str(m.mnt)], capture_output=True)
            assert r.returncode == 0, r.stderr
            assert not is_mounted(m.mnt)
            assert fh.read() == b"lower"  # still served through the detached mount
        finally:
            fh.close()
        held = stop_if_held(m.mnt, [m.proc.pid])
        assert m.proc.wait(timeout=EXIT_TIMEOUT) == 0 or held


def test_sequential_reads_come_a_window_at_a_time(tmp_path: Path) -> None:
    """The mount's readahead is widened to READAHEAD_KB once INIT is answered (found through
    mountinfo, here under a path with a space, which mountinfo escapes): a cold sequential read
    then costs one READ request per window, not one per 128 KiB, the kernel's default."""
    from layerfs.ops import READAHEAD_KB

    size = 16 * READAHEAD_KB * 1024
    spec = LayerSpec([d({b"big": f(os.urandom(size))})])
    layout = _layout(tmp_path / "with space", spec)
    with layout.mount(subject_named("layerfs")) as m:
        st = os.stat(m.mnt)
        sysfs = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
        deadline = time.monotonic() + 10
        while int(sysfs.read_text()) != READAHEAD_KB and time.monotonic() < deadline:
            time.sleep(0.05)
        assert int(sysfs.read_text()) == READAHEAD_KB

        before = _requests(m.mnt, "read")
        with open(m.mnt / "big", "rb") as fh:
            while fh.read(1 << 20):
                pass
        # 16 windows; at the default 128 KiB it would be 16 * READAHEAD_KB / 128
        assert _requests(m.mnt, "read") - before <= 2 * 16 + 2


def test_walk_under_a_low_open_files_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon started with soft and hard limits of 1024 open files (systemd's and many
    container engines' soft default; here both, so it cannot lift it) walks 400 directories
    merged from three layers as kernel overlayfs does: the layers' caches of directory fds
    are sized to the limit (each held up to 512 before, and listings came back without the
    entries whose lookup failed with EMFILE)."""
    names = [b"d%03d" % i for i in range(400)]
    spec = LayerSpec([d({n: d({b"f%d" % k: f(n)}) for n in names}) for k in range(3)])

    def walk(
        where: str, subject: Subject
    ) -> tuple[set[tuple[str, tuple[str, ...]]], list[OSError]]:
        errors: list[OSError] = []
        with _layout(tmp_path / where, spec).mount(subject) as m:
            seen = {
                (os.path.relpath(top, m.mnt), tuple(sorted(files)))
                for top, _, files in os.walk(m.mnt, onerror=errors.append)
            }
        return seen, errors

    want, _ = walk("kernel", KERNEL)
    assert len(want) == len(names) + 1
    command = layerfs_command()
    for limit, must_complete in ((1024, True), (80, False)):
        limited = ["prlimit", f"--nofile={limit}:{limit}", *command]
        monkeypatch.setenv("LAYERFS_COMMAND", shlex.join(limited))
        got, errors = walk(f"layerfs-{limit}", subject_named("layerfs"))
        if must_complete:
            assert not errors, errors[:3]
        # Far below what the caches need, the daemon runs out of fds: the walk may then fail,
        # but a listing must never come back silently short of entries.
        assert got == want or errors, f"limit {limit}: {len(got)} of {len(want)} directories"


def test_writes_skip_the_capability_check(tmp_path: Path) -> None:
    """INIT is answered with FUSE_HANDLE_KILLPRIV_V2 (layerfs.fusehooks.answer_init), so the
    kernel marks a written file S_NOSEC: only its first write asks for security.capability
    (GETXATTR), not every write, as it did with the flags libfuse 3.14 asks for."""
    layout = _layout(tmp_path, LayerSpec([d({b"f": f(b"lower")})]))
    with layout.mount(subject_named("layerfs")) as m:
        before = _requests(m.mnt, "getxattr")
        fd = os.open(m.mnt / "f", os.O_WRONLY | os.O_APPEND)
        try:
            for _ in range(50):
                os.write(fd, b"x" * 100)
        finally:
            os.close(fd)
        # the statistics read itself is one GETXATTR; the first write checks once
        assert _requests(m.mnt, "getxattr") - before <= 3
        assert (m.mnt / "f").read_bytes() == b"lower" + b"x" * 5000


def _linked_names(tmp_path: Path, where: str) -> tuple[list[bytes], Layout, Subject]:
    """Ten lower files, each with a hard link NAME.hl, and the subject WHERE names."""
    names = [b"f%d" % i for i in range(10)]
    entries: dict[bytes, object] = {n: f(n) for n in names}
    entries.update({n + b".hl": HardLink(n) for n in names})
    layout = _layout(tmp_path, LayerSpec([d(entries)]))
    return names, layout, KERNEL if where == "kernel" else subject_named("layerfs")


@pytest.mark.parametrize("where", ["layerfs", "kernel"])
def test_listing_right_after_a_link_breaking_copy_up(tmp_path: Path, where: str) -> None:
    """A copy-up that breaks a lower hard link changes the file's st_ino (index=off), so the
    parent's listing changes its d_ino: a readdir right after the request returns must show
    the new one, as on kernel overlayfs (layerfs once dropped the kernel's cached listing only
    after replying, and a quick readdir saw the old d_ino)."""
    names, layout, subject = _linked_names(tmp_path, where)
    with layout.mount(subject) as m:
        base = os.fsencode(m.mnt)
        stale = []
        for n in names:
            os.listdir(base)  # the kernel now holds the listing
            os.setxattr(base + b"/" + n, b"user.t", b"x")  # copy-up: the link breaks
            d_ino = {e.name: e.inode() for e in os.scandir(base)}[n]
            if d_ino != os.lstat(base + b"/" + n).st_ino:
                stale.append(n)
        assert not stale, f"readdir showed the old d_ino of {stale}"


@pytest.mark.parametrize("where", ["layerfs", "kernel"])
def test_attributes_right_after_a_link_breaking_chmod(tmp_path: Path, where: str) -> None:
    """chmod of one name of a lower hard link copies it up and breaks the link: the stat right
    after (its attributes cached by the kernel before) shows the new mode, nlink 1 and the
    new st_ino, as on kernel overlayfs. layerfs sends no invalidation for a node whose
    SETATTR reply carries its attributes: the reply is what refreshes them."""
    names, layout, subject = _linked_names(tmp_path, where)
    with layout.mount(subject) as m:
        base = os.fsencode(m.mnt)
        for n in names:
            path = base + b"/" + n
            before = os.lstat(path)  # cached now
            assert before.st_nlink == 2
            os.chmod(path, 0o640)
            after = os.lstat(path)
            assert (stat.S_IMODE(after.st_mode), after.st_nlink) == (0o640, 1)
            assert after.st_ino != before.st_ino
            assert os.lstat(path + b".hl").st_nlink == 2  # still the lower file (index=off)


def test_fallocate_punches_a_hole_in_the_upper(tmp_path: Path) -> None:
    """FALLOCATE reaches the upper file (layerfs.fusehooks.serve_fallocate; pyfuse3 forwards
    none, and the kernel answered EOPNOTSUPP): a punched range of a lower file is a hole of
    the copied-up file, not zeros written, and a KEEP_SIZE allocation keeps the size."""
    keep_size, punch_hole = 0x01, 0x02
    layout = _layout(tmp_path, LayerSpec([d({b"f": f(b"x" * 65536)})]))
    assert layout.upper is not None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

    def fallocate(fd: int, mode: int, off: int, length: int) -> None:
        assert libc.fallocate(fd, mode, off, length) == 0, os.strerror(ctypes.get_errno())

    with layout.mount(subject_named("layerfs")) as m:
        fd = os.open(m.mnt / "f", os.O_WRONLY)
        ufd = -1
        try:
            fallocate(fd, punch_hole | keep_size, 16384, 16384)
            # before any read: a cached page over an unwritten range counts as data
            ufd = os.open(layout.upper / "f", os.O_RDONLY)
            assert os.lseek(ufd, 0, os.SEEK_HOLE) == 16384
            assert os.lseek(ufd, 16384, os.SEEK_DATA) == 32768
            fallocate(fd, keep_size, 0, 1 << 20)
            st = os.fstat(ufd)
            assert st.st_size == 65536 and st.st_blocks * 512 >= 1 << 20
        finally:
            os.close(fd)
            if ufd >= 0:
                os.close(ufd)
        assert (m.mnt / "f").read_bytes() == b"x" * 16384 + bytes(16384) + b"x" * 32768
        assert (m.mnt / "f").stat().st_size == 65536


def _inode_flags(path: Path) -> tuple[str, bytes]:
    """lsattr's line for PATH (FS_IOC_GETFLAGS) and FS_IOC_FSGETXATTR's bytes, or errors."""
    r = subprocess.run(["lsattr", "-d", str(path)], capture_output=True, text=True, check=False)
    line = r.stdout.split()[0] if r.returncode == 0 else r.stderr.rsplit(":", 1)[-1].strip()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        out = bytearray(28)
        fcntl.ioctl(fd, 0x801C581F, out)  # FS_IOC_FSGETXATTR
        xattr = bytes(out)
    except OSError as e:
        xattr = errno.errorcode[e.errno or 0].encode()
    finally:
        os.close(fd)
    return line, xattr


def test_inode_flags_as_the_kernel_shows_them(tmp_path: Path) -> None:
    """lsattr and FS_IOC_FSGETXATTR answer from the real file, lower or upper, as kernel
    overlayfs answers them (served through layerfs.fusehooks.serve_ioctl; pyfuse3 forwards no
    IOCTL, and lsattr said "Operation not supported")."""
    spec = LayerSpec([d({b"f": f(b"lower"), b"g": f(b"x"), b"dir": d({b"x": f()})})])
    seen = {}
    for name, subject in (("layerfs", subject_named("layerfs")), ("kernel", KERNEL)):
        layout = _layout(tmp_path / name, spec)
        with layout.mount(subject) as m:
            with open(m.mnt / "g", "ab") as fh:
                fh.write(b"copied up")
            (m.mnt / "new").write_bytes(b"upper only")
            seen[name] = {p: _inode_flags(m.mnt / p) for p in ("", "f", "g", "dir", "new")}
    assert seen["layerfs"] == seen["kernel"]
    assert all(not line.startswith("Op") for line, _x in seen["kernel"].values())
