"""Mount the subjects and the kernel reference; always unmount, lazily when the first try fails.

Each ``mount_*`` is a context manager taking ``(lowers, upper, work, mnt)`` with ``lowers``
topmost first and ``upper``/``work`` None for a read-only stack. FUSE subjects run in the
foreground in a subprocess (pyfuse3 allows one session per process, and a test touching its own
mount from the loop thread would deadlock); their stderr goes to a log file that must not
contain a traceback or an ERROR line, and the daemon must exit by itself after the unmount,
unless another mount namespace still holds a copy of the mount (stop_if_held): it is stopped.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from layerfs import mountinfo

from . import idmapped

MOUNT_TIMEOUT = 30.0
EXIT_TIMEOUT = 20.0

PathLike = str | os.PathLike[str]
MountFn = Callable[..., contextlib.AbstractContextManager["Mounted"]]


@dataclass
class Mounted:
    """A live mount: where it is, and for FUSE subjects the daemon and its log."""

    mnt: Path
    name: str
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    problems: list[str] = field(default_factory=list)
    # other mount namespaces that still held the mount after our unmount (stop_if_held)
    held_by: list[str] = field(default_factory=list)


def write_fds_in(pid: int, top: Path) -> list[str]:
    """The descriptors process PID holds open for writing on files below TOP (read from
    /proc: no request to a daemon's mount)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            flags = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split()[3], 8)
        except (FileNotFoundError, ProcessLookupError):
            continue  # closed meanwhile
        if target.startswith(f"{top}/") and flags & os.O_ACCMODE != os.O_RDONLY:
            found.append(target)
    return found


# --- mount table ---------------------------------------------------------------------------


def mountpoints() -> list[bytes]:
    """Mount points of this mount namespace, as /proc/self/mountinfo lists them."""
    return [m.point for m in mountinfo.mounts()]


def is_mounted(mnt: PathLike) -> bool:
    return os.fsencode(os.path.realpath(mnt)) in mountpoints()


def _wait_for_mount(
    mnt: Path, proc: subprocess.Popen[bytes], log: Path, *, userns: bool = False
) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not (ns_mounted(proc.pid, mnt) if userns else is_mounted(mnt)):
        if proc.poll() is not None:
            raise AssertionError(
                f"daemon exited with {proc.returncode} before mounting {mnt}:\n"
                + log.read_text(errors="replace")
            )
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"{mnt} not mounted after {MOUNT_TIMEOUT}s:\n" + log.read_text(errors="replace")
            )
        time.sleep(0.02)


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False)


def foreign_holders(mnt: PathLike) -> list[str]:
    """Processes of other mount namespaces whose table has a FUSE mount on MNT, one "pid
    command" a namespace. A namespace made while MNT was mounted (anyone's ``unshare -m``, a
    container starting, a rootless test's holder) holds a copy of the mount, and the kernel
    keeps its FUSE session, so its daemon, alive until that copy goes, whatever we unmount."""
    want = os.fsencode(os.path.realpath(mnt))
    seen = {os.readlink("/proc/self/ns/mnt")}
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ns = os.readlink(f"/proc/{entry}/ns/mnt")
            if ns in seen:
                continue
            seen.add(ns)
            table = mountinfo.mounts(f"/proc/{entry}/mountinfo")
            if any(m.point == want and m.fstype.startswith(b"fuse") for m in table):
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
                out.append(f"{entry} {cmd.decode(errors='replace').strip()}")
        except OSError:
            continue  # gone meanwhile, or a kernel thread
    return out


def stop_if_held(mnt: PathLike, pids: Sequence[int]) -> list[str]:
    """After MNT's unmount here, with its daemon(s) PIDS still running: when other mount
    namespaces hold a copy of it (foreign_holders), the daemons rightly serve on (until those
    namespaces end, minutes maybe), so no exit can be waited for: stop them (SIGTERM, which
    they must obey all the same) and return the holders. Else [] and nothing is done: a
    daemon that then does not exit by itself is its own fault."""
    if is_mounted(mnt):
        return []
    holders = foreign_holders(mnt)
    if holders:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    return holders


def unmount_fuse(mnt: PathLike) -> list[str]:
    """fusermount3 -u, then -u -z when that fails; returns what went wrong."""
    if not is_mounted(mnt):
        return []
    r = _run(["fusermount3", "-u", os.fspath(mnt)])
    if r.returncode == 0:
        return []
    problems = [f"fusermount3 -u {mnt} failed: {r.stderr.strip()}"]
    r = _run(["fusermount3", "-u", "-z", os.fspath(mnt)])
    if r.returncode != 0:
        problems.append(f"fusermount3 -u -z failed: {r.stderr.strip()}")
    return problems


def unmount_kernel(mnt: PathLike) -> list[str]:
    if not is_mounted(mnt):
        return []
    r = _run(["umount", os.fspath(mnt)])
    if r.returncode == 0:
        return []
    problems = [f"umount {mnt} failed: {r.stderr.strip()}"]
    r = _run(["umount", "-l", os.fspath(mnt)])
    if r.returncode != 0:
        problems.append(f"umount -l failed: {r.stderr.strip()}")
    return problems


# --- user namespaces (rootless) ----------------------------------------------------------

# ids 0..65535 mapped onto themselves: owners and modes behave as outside, but the namespace's
# root has no privilege over the initial one (no trusted.* xattrs, no real device nodes), as
# rootless podman's. Written by us (root may write any map; newuidmap would want /etc/subuid).
USERNS_IDS = 65536


def userns_popen(cmd: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
    """Start CMD as root of a new user namespace with a mount namespace of its own."""
    unshare = ["unshare", "--user", "--mount", "--propagation", "private", "--"]
    proc = subprocess.Popen(
        [*unshare, "sh", "-c", 'read _ && exec "$@"', "sh", *cmd],
        stdin=subprocess.PIPE,
        **kw,
    )
    assert proc.stdin is not None
    try:
        own = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while os.readlink(f"/proc/{proc.pid}/ns/user") == own:  # unshare(2) not done yet
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"unshare did not start: {cmd}")
            time.sleep(0.005)
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{proc.pid}/{name}", "w") as fh:
                fh.write(f"0 0 {USERNS_IDS}\n")
        proc.stdin.write(b"\n")
        proc.stdin.close()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def ns_path(pid: int, path: PathLike) -> Path:
    """PATH as the mount namespace of process PID sees it (from ours, through /proc)."""
    return Path(f"/proc/{pid}/root") / Path(path).relative_to("/")


def ns_mounted(pid: int, mnt: PathLike) -> bool:
    want = os.fsencode(os.path.realpath(mnt))
    return any(m.point == want for m in mountinfo.mounts(f"/proc/{pid}/mountinfo"))


def ns_unmount(pid: int, mnt: PathLike) -> list[str]:
    """umount MNT in the mount namespace of PID (lazily when that fails)."""
    problems = []
    for lazy in ([], ["-l"]):
        r = _run(["nsenter", "-t", str(pid), "-m", "umount", *lazy, os.fspath(mnt)])
        if r.returncode == 0:
            return problems
        problems.append(f"umount {lazy} {mnt} in the namespace of {pid}: {r.stderr.strip()}")
    return problems


# --- daemon logs ---------------------------------------------------------------------------

_BAD_LOG = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b")


def log_problems(log: Path) -> list[str]:
    """Lines of a daemon log that fail a test (checklogs-style guard)."""
    if not log.exists():
        return []
    text = log.read_text(errors="replace")
    if _BAD_LOG.search(text):
        return [f"daemon log {log} has errors:\n{text[-4000:]}"]
    return []


# --- FUSE subjects -------------------------------------------------------------------------


def layerfs_command() -> list[str]:
    """The layerfs CLI: $LAYERFS_COMMAND (e.g. a pinned checkout), else the installed one."""
    if cmd := os.environ.get("LAYERFS_COMMAND"):
        return shlex.split(cmd)
    exe = shutil.which("layerfs")
    if exe:
        return [exe]
    venv_exe = Path(sys.executable).with_name("layerfs")
    if venv_exe.exists():
        return [os.fspath(venv_exe)]
    return [sys.executable, "-m", "layerfs.cli"]


def layerfs_available() -> str | None:
    """None when the layerfs CLI can mount; else the reason it cannot (for a skip)."""
    for mod in ("layerfs.cli", "layerfs.mount"):
        try:
            if importlib.util.find_spec(mod) is None:
                return f"{mod} does not exist yet"
        except ImportError as e:
            return f"{mod}: {e}"
    return None


def _threads(pid: int) -> list[tuple[str, str, str]]:
    """(name, state, wchan) of each thread of PID: where a daemon that does not exit waits."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            wchan = Path(f"/proc/{pid}/task/{tid}/wchan").read_text()
        except OSError:
            continue
        name, _, rest = stat.partition(") ")
        out.append((name.partition(" (")[2], rest.split()[0], wchan))
    return out


@contextlib.contextmanager
def _fuse_daemon(
    name: str, cmd: list[str], mnt: Path, log: Path, *, userns: bool = False
) -> Iterator[Mounted]:
    """Run the daemon CMD; with USERNS, as root of a user namespace of its own (the mount is
    then reached through /proc/PID/root and unmounted inside that namespace)."""
    with open(log, "ab") as out:
        if userns:
            proc = userns_popen(cmd, stdout=out, stderr=out, start_new_session=True)
        else:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
    m = Mounted(ns_path(proc.pid, mnt) if userns else mnt, name, proc, log)
    failed = False
    try:
        _wait_for_mount(mnt, proc, log, userns=userns)
        yield m
    except BaseException:
        failed = True
        raise
    finally:
        if userns:
            if proc.poll() is None and ns_mounted(proc.pid, mnt):
                m.problems += ns_unmount(proc.pid, mnt)
        else:
            m.problems += unmount_fuse(mnt)
            if proc.poll() is None:
                m.held_by = stop_if_held(mnt, [proc.pid])
        try:
            proc.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            m.problems.append(
                f"{name} daemon still running {EXIT_TIMEOUT}s after unmount; its threads "
                f"(state, kernel wait channel): {_threads(proc.pid)}"
            )
            proc.kill()
            proc.wait()
        if failed:
            # A short pause so a dying daemon's last words reach the log, then show them
            # (pytest prints captured stderr with the failure).
            time.sleep(0.2)
            text = log.read_text(errors="replace") if log.exists() else ""
            if text.strip():
                print(f"--- {name} daemon log {log}:\n{text[-6000:]}", file=sys.stderr)
        m.problems += log_problems(log)
    if m.problems and not failed:
        raise AssertionError("\n".join(m.problems))


def _log_path(mnt: Path, name: str) -> Path:
    fd, p = tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=mnt.parent)
    os.close(fd)
    return Path(p)


def layerfs_mount_cmd(
    lowers: Sequence[PathLike],
    upper: PathLike | None,
    work: PathLike | None,
    mnt: PathLike,
    *,
    options: Sequence[str] = (),
    foreground: bool = True,
) -> list[str]:
    """The ``layerfs mount`` command line for this stack."""
    cmd = [*layerfs_command(), "mount", ":".join(os.fspath(p) for p in lowers)]
    if upper is not None:
        cmd.append(os.fspath(upper))
    cmd.append(os.fspath(mnt))
    if work is not None:
        cmd += ["--workdir", os.fspath(work)]
    if options:
        cmd += ["-o", ",".join(options)]
    if foreground:
        cmd.append("-f")
    return cmd


@contextlib.contextmanager
def mount_layerfs(
    lowers: Sequence[PathLike],
    upper: PathLike | None,
    work: PathLike | None,
    mnt: PathLike,
    *,
    options: Sequence[str] = (),
    userns: bool = False,
) -> Iterator[Mounted]:
    """layerfs; with USERNS, mounted by the root of a user namespace (rootless), with no
    allow_other: the test's own process, outside that namespace, is the one that reads it."""
    mnt = Path(mnt)
    if userns:
        options = ("noallow_other", *options)
    cmd = layerfs_mount_cmd(lowers, upper, work, mnt, options=options)
    with _fuse_daemon("layerfs", cmd, mnt, _log_path(mnt, "layerfs"), userns=userns) as m:
        yield m


@contextlib.contextmanager
def mount_fuse_overlayfs(
    lowers: Sequence[PathLike],
    upper: PathLike | None,
    work: PathLike | None,
    mnt: PathLike,
    *,
    options: Sequence[str] = (),
) -> Iterator[Mounted]:
    mnt = Path(mnt)
    opts = ["lowerdir=" + ":".join(os.fspath(p) for p in lowers)]
    if upper is not None:
        opts += [f"upperdir={os.fspath(upper)}", f"workdir={os.fspath(work or '')}"]
    opts += list(options)
    cmd = ["fuse-overlayfs", "-f", "-o", ",".join(opts), os.fspath(mnt)]
    with _fuse_daemon("fuse-overlayfs", cmd, mnt, _log_path(mnt, "fuse-overlayfs")) as m:
        yield m


# --- kernel reference ----------------------------------------------------------------------

KERNEL_OPTIONS = ("redirect_dir=on", "index=off", "metacopy=off")


def kernel_mount_cmd(
    lowers: Sequence[str],
    upper: str | None,
    work: str | None,
    mnt: PathLike,
    options: Sequence[str],
) -> list[str]:
    """The ``mount -t overlay`` command line for this stack: KERNEL_OPTIONS, and OPTIONS,
    which override the defaults of the same name (metacopy=on, say)."""
    opts = ["lowerdir=" + ":".join(lowers)]
    if upper is not None:
        opts += [f"upperdir={upper}", f"workdir={work or ''}"]
    keys = {o.partition("=")[0] for o in options}
    opts += [o for o in KERNEL_OPTIONS if o.partition("=")[0] not in keys] + list(options)
    return ["mount", "-t", "overlay", "overlay", "-o", ",".join(opts), os.fspath(mnt)]


@contextlib.contextmanager
def mount_kernel(
    lowers: Sequence[PathLike],
    upper: PathLike | None,
    work: PathLike | None,
    mnt: PathLike,
    *,
    options: Sequence[str] = (),
    userns: bool = False,
    idmap: tuple[idmapped.Ranges, idmapped.Ranges] | None = None,
) -> Iterator[Mounted]:
    """Kernel overlayfs; with USERNS, mounted by the root of a user namespace (which the kernel
    allows with ``userxattr`` only), reached through /proc/PID/root; with IDMAP (uid and gid
    ranges, layerfs' ``uidmapping=``), over idmapped mounts of the layers (support.idmapped)."""
    mnt = Path(mnt)
    lower_list = [os.fspath(p) for p in lowers]
    with contextlib.ExitStack() as stack:
        if upper is None and len(lower_list) == 1:
            # The kernel wants 2 lowers for a read-only overlay: add an empty bottom layer.
            empty = stack.enter_context(tempfile.TemporaryDirectory(dir=mnt.parent))
            lower_list.append(empty)
        upper_path = None if upper is None else os.fspath(upper)
        work_path = None if work is None else os.fspath(work)
        fds: list[int] = []
        if idmap is not None:
            lower_list, upper_path, work_path, fds = stack.enter_context(
                idmapped.idmapped_layers(lower_list, upper_path, work_path, *idmap)
            )
        mount = kernel_mount_cmd(lower_list, upper_path, work_path, mnt, options)
        holder = None
        if userns:
            # the namespace lives as long as its holder: mount, say so, then wait to be killed
            holder = userns_popen(
                ["sh", "-c", '"$@" && echo mounted && exec sleep 1000000', "sh", *mount],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            stack.callback(holder.wait)
            stack.callback(holder.kill)
            assert holder.stdout is not None and holder.stderr is not None
            if holder.stdout.readline() != b"mounted\n":
                err = holder.stderr.read().decode(errors="replace").strip()
                raise AssertionError(f"kernel overlay mount in a user namespace failed: {err}")
        else:
            r = subprocess.run(mount, capture_output=True, text=True, check=False, pass_fds=fds)
            if r.returncode != 0:
                raise AssertionError(f"kernel overlay mount failed: {r.stderr.strip()} ({mount})")
        m = Mounted(ns_path(holder.pid, mnt) if holder else mnt, "kernel")
        failed = False
        try:
            yield m
        except BaseException:
            failed = True
            raise
        finally:
            m.problems += ns_unmount(holder.pid, mnt) if holder else unmount_kernel(mnt)
        if m.problems and not failed:
            raise AssertionError("\n".join(m.problems))


# --- subjects ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """A filesystem under test: how to mount it, and its known differences from the kernel.

    ``quirks`` names behaviours in which the subject is known to differ from kernel overlayfs;
    scenarios that need one are strict xfails for that subject and generated stacks avoid them.
    layerfs's are limits of the FUSE stack under it, or one deliberate choice (LAYERFS_LIMITS);
    any other difference is a bug to report.
    """

    name: str
    mount: MountFn
    quirks: frozenset[str] = frozenset()
    kernel_options: tuple[str, ...] = ()  # the kernel reference's options for this subject
    userns: bool = False  # the subject and its kernel reference mount in user namespaces
    # uid and gid ranges (stored, shown, count) the subject maps: the kernel reference's
    # layers are idmapped mounts with that mapping
    idmap: tuple[idmapped.Ranges, idmapped.Ranges] | None = None

    @property
    def kernel(self) -> Subject:
        """The kernel overlayfs mount this subject is compared with."""
        if not self.kernel_options and not self.userns and self.idmap is None:
            return KERNEL
        return Subject(
            "kernel",
            functools.partial(
                mount_kernel, options=self.kernel_options, userns=self.userns, idmap=self.idmap
            ),
        )


# Found with this suite against fuse-overlayfs 1.10 (see docs/testing.md for reproducers).
FUSE_OVERLAYFS_QUIRKS = frozenset(
    {
        # read path
        "whiteout:xattr",  # xattr whiteouts are shown as empty files
        "whiteout:user_xattr",
        "opaque:root",  # an opaque xattr on a lower layer's root hides the layers below
        "dir-nlink",  # merged directories report real link counts, the kernel reports 1
        "hidden-hardlink-nlink",  # a lower hard link whose other name is hidden: 1, kernel 2
        # write path
        "hardlink-copyup",  # copy-up of one name shows through the other names
        "copyup-parent-mtime",  # copy-up into a dir changes its mtime; the kernel restores it
        "writeback-mtime",  # a new file's mtime in the mount differs from the one on disk
        "rename-dir",  # EXDEV for directories from a lower; redirect xattrs not followed
        "upper-artifacts",  # writes user.fuseoverlayfs.* xattrs and .wh..opq whiteouts
        "no-origin",  # writes no overlay.origin / overlay.impure
        "symlink-copyup-owner",  # copy-up of a symlink: owner root, mtime now
        "copyup-suid",  # copy-up of a setuid file owned by a user loses the setuid bit
        "rmrf-mkdir-not-opaque",  # mkdir over a removed lower dir: a subdir's lower comes back
        "setgid-inherit",  # new entries in a setgid dir do not take its group
        # a user's write keeps setgid on a file of a group the user is not in (the kernel
        # clears it), and an rmdir of the user's new directory leaves a whiteout
        "user-write-keeps-setgid",
        "unlinked-nlink",  # fstat of an open, unlinked file: nlink 1, kernel 0
        "removexattr-copyup",  # removexattr of a missing xattr copies the file up
        "namemax-251",  # statfs f_namemax 251, and 255-byte names cannot be created
        "symlink-xattr-follows",  # lsetxattr on a layer symlink sets it on the link's target!
        "device-copyup",  # chown of a lower device node (copy-up): EIO
        "truncate-same-size",  # truncate of a lower file to its size: no copy-up, no new mtime
        "copyup-holes",  # copy-up writes holes out as zeros (the kernel skips them)
        "no-tmpfile",  # open(dir, O_TMPFILE): EOPNOTSUPP (the kernel copies the dir up)
        "no-fallocate-shift",  # FUSE refuses fallocate's COLLAPSE_RANGE and INSERT_RANGE
        "wh-names",  # refuses user names starting with .wh. (EINVAL), hides them
        "xattr-escape",  # no trusted.overlay.* escaping (kernel >= 6.7 stores them escaped)
        "user-overlay-names",  # setxattr of user.overlay.* fails (ENODATA); kernel stores it
        # a default ACL set through the mount is not handed down to new entries (a mkfifo
        # under one fails with ENOENT); a lower's is, with other entries than the kernel's
        "acl-inherit",
    }
)

# Not bugs of the engine, and documented in docs/design.md ("Caveats"):
LAYERFS_LIMITS = frozenset(
    {
        # FUSE itself refuses fallocate's COLLAPSE_RANGE and INSERT_RANGE (EOPNOTSUPP)
        "no-fallocate-shift",
        "no-tmpfile",  # libfuse 3.14 has no TMPFILE request: open(dir, O_TMPFILE) fails
        # names starting with .wh. are whiteout markers on disk: layerfs refuses to create
        # them (EPERM) rather than let a user write a whiteout; the kernel creates them
        "wh-names",
        # The kernel lists a zero-size xattr whiteout in an opaque=y directory that its own
        # lookup then refuses (a name that readdir shows and stat says does not exist);
        # layerfs shows that file consistently instead.
        "xwhiteout-ghost",
        # With no OPEN requests (the default) an open for write reaches the daemon as nothing:
        # a lower file opened for writing and unlinked before its first write shows the
        # lower's st_nlink (1) in fstat, where the kernel's open copied it up (0); opened
        # read-only the kernel shows 1 too, and layerfs cannot tell the two opens apart.
        # LAYERFS_OPEN_REQUESTS=1 shows 0 (tests/fuse/test_no_open.py).
        "no-open-unlinked-nlink",
        # Without userxattr the kernel stores a user's user.overlay.* xattrs as they are (and
        # shows them); layerfs reads that namespace as overlay bookkeeping always and refuses
        # them (EPERM), so that an upper means the same whichever way it was written.
        "user-overlay-names",
    }
)

# layerfs-idmap's mapping, stored -> shown: every id the generated stacks, the scripts and the
# test's callers use is mapped (0-65535), and none of 0, 1000, 2000 (uids) or 0, 50, 1000
# (gids) onto itself: a cycle, so that an id mapped the wrong way (shown for stored), or a gid
# through the uid ranges, shows. Root (shown 0) is mapped, so the test's own operations are
# those of a mapped caller (the kernel refuses an unmapped one).
IDMAP_UIDS: idmapped.Ranges = (
    (0, 1000, 1), (1000, 2000, 1), (2000, 0, 1), (1, 1, 999), (1001, 1001, 999),
    (2001, 2001, 63535),
)  # fmt: skip
IDMAP_GIDS: idmapped.Ranges = (
    (0, 50, 1), (50, 1000, 1), (1000, 0, 1), (1, 1, 49), (51, 51, 949), (1001, 1001, 64535),
)  # fmt: skip
IDMAP_OPTIONS = (
    f"uidmapping={idmapped.option(IDMAP_UIDS)}",
    f"gidmapping={idmapped.option(IDMAP_GIDS)}",
)

SUBJECTS: dict[str, Subject] = {
    "layerfs": Subject("layerfs", mount_layerfs, LAYERFS_LIMITS),
    "fuse-overlayfs": Subject("fuse-overlayfs", mount_fuse_overlayfs, FUSE_OVERLAYFS_QUIRKS),
    # metadata-only copy-up, against the kernel with metacopy=on (the write-path suite)
    "layerfs-metacopy": Subject(
        "layerfs-metacopy",
        functools.partial(mount_layerfs, options=("metacopy=on",)),
        LAYERFS_LIMITS,
        ("metacopy=on",),
    ),
    # rootless: mounted by the root of a user namespace, so writing user.overlay.* (chosen by
    # itself there), against the kernel mounted there with userxattr (whose redirect_dir is
    # then nofollow: a lower directory's rename is EXDEV, on both). The operations come from
    # the test, outside the namespace, through /proc/PID/root, which only root may walk.
    "layerfs-userns": Subject(
        "layerfs-userns",
        functools.partial(mount_layerfs, userns=True),
        # The kernel with userxattr writes an empty overlay.origin (no file handle), so after
        # link() the new name of a copied-up file shows the upper's st_ino and the old one the
        # lower's; layerfs shows one inode for both names, as it does with trusted xattrs.
        # An ACL entry for an id outside the namespace's map (0-65535 here) cannot pass
        # between the kernel's FUSE and a daemon there (both sides map ACL ids through the
        # daemon's namespace, and refuse the id: EINVAL); the kernel overlay mounted there
        # shows it and copies it up (script acl-unmapped-ids). A layer's owner outside the map
        # (70000) reaches the daemon as the overflow id, as stat shows it there: the same as
        # a real 65534, which the namespace maps, so that user owns such a file; the kernel
        # overlay's checks see the real owner (script unmapped-owner-is-nobodys, run by
        # test_users_inside_a_user_namespace).
        (LAYERFS_LIMITS - {"user-overlay-names"})
        | {"userxattr-link-ino", "userns-acl-unmapped", "userns-unmapped-owner"},
        ("userxattr", "redirect_dir=nofollow"),
        userns=True,
    ),
    # id-mapped (rootful podman --uidmap, a mount program's uidmapping=), against the kernel
    # over idmapped mounts of the layers with the same mapping (support.idmapped)
    "layerfs-idmap": Subject(
        "layerfs-idmap",
        functools.partial(mount_layerfs, options=IDMAP_OPTIONS),
        # a chown to, or a create by, an id outside every range: the kernel's idmapped
        # layers refuse it (EOVERFLOW); layerfs stores 65534, as fuse-overlayfs (design.md)
        LAYERFS_LIMITS | {"idmap-unmapped-overflow"},
        idmap=(IDMAP_UIDS, IDMAP_GIDS),
    ),
}
KERNEL = Subject("kernel", mount_kernel)


def subject_named(name: str) -> Subject:
    """SUBJECTS[NAME], or a skip when it cannot run on this machine."""
    if name.startswith("layerfs") and (why := layerfs_available()):
        pytest.skip(f"layerfs cannot mount yet: {why}")
    if name == "layerfs-idmap" and (why := idmapped.skip_reason(IDMAP_UIDS, IDMAP_GIDS)):
        pytest.skip(why)
    if name == "fuse-overlayfs" and shutil.which("fuse-overlayfs") is None:
        pytest.skip("fuse-overlayfs not installed (apt-get install fuse-overlayfs)")
    return SUBJECTS[name]


@dataclass
class Layout:
    """The directories of one filesystem instance under a test's tmp dir."""

    root: Path
    lowers: list[Path]
    upper: Path | None
    work: Path | None
    mnt: Path

    @classmethod
    def create(cls, root: Path, n_lowers: int, *, upper: bool = True) -> Layout:
        root.mkdir(parents=True)
        lowers = [root / f"lower{i}" for i in range(n_lowers)]
        for p in lowers:
            p.mkdir()
        up = root / "upper" if upper else None
        work = root / "work" if upper else None
        for extra in (up, work):
            if extra is not None:
                extra.mkdir()
        mnt = root / "merged"
        mnt.mkdir()
        return cls(root, lowers, up, work, mnt)

    def mount(self, subject: Subject, **kw: object) -> contextlib.AbstractContextManager[Mounted]:
        return subject.mount(self.lowers, self.upper, self.work, self.mnt, **kw)
