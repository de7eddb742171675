"""The filesystems compared: native (a plain directory), kernel overlayfs, fuse-overlayfs and
layerfs. Each mount is fresh: a new mountpoint, an empty upper and workdir; the lowers of the
data set are shared read-only. Mounts are made through each tool's command line, in a
subprocess, so the harness never imports pyfuse3 nor shares a process with a daemon."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.dataset import Dataset
from benchmarks.model import Mounted, Scenario, Skip
from benchmarks.system import (
    CommandError,
    command_version,
    find_daemon,
    force_unmount,
    is_mountpoint,
    run,
    wait_pid_gone,
)
from mount_helper import launcher

MOUNT_TIMEOUT = 120.0
REPO = Path(__file__).resolve().parent.parent


class Target:
    """One filesystem under test."""

    name = ""
    fuse = False

    def unavailable(self) -> str | None:
        """Why this target cannot run here, or None."""
        return None

    def version(self) -> str:
        return ""

    def mount(self, ds: Dataset, scenario: Scenario, work: Path) -> Mounted:
        raise NotImplementedError

    def umount(self, mnt: Mounted) -> None:
        raise NotImplementedError

    def podman_mount_program(self) -> Path | None:
        """The ``mount_program`` podman's overlay driver runs for this target (None: the
        kernel's own overlay); raises Skip where podman cannot store on this target."""
        raise Skip(f"{self.name} is not a podman storage driver")


class Native(Target):
    """The merged tree as a plain directory on the layers' filesystem: the floor."""

    name = "native"

    def version(self) -> str:
        return "plain directory"

    def mount(self, ds: Dataset, scenario: Scenario, work: Path) -> Mounted:
        src = ds.stack_native(scenario.stack)
        if not scenario.writable:
            return Mounted(self.name, src, ds, scenario.stack)
        # Writes get a private copy of what the scenario touches: copying everything (the
        # big file above all) would cost seconds per run.
        copy = work / "native"
        copy.mkdir()
        shutil.copystat(src, copy)
        wanted = scenario.native_copy
        entries = [
            str(p)
            for p in sorted(src.iterdir())
            if (p.name in wanted if wanted is not None else p.name != "big")
        ]
        if entries:
            run(["cp", "-a", *entries, str(copy)])
        return Mounted(self.name, copy, ds, scenario.stack)

    def umount(self, mnt: Mounted) -> None:
        pass  # the harness removes the work directory


class _Overlay(Target):
    """Shared mount plumbing of the overlay targets."""

    def __init__(self) -> None:
        self._served: dict[int, int] = {}  # a daemon's pid -> its mounts live

    def mount_cmd(self, lowers: str, upper: Path, workdir: Path, mnt: Path) -> list[str]:
        raise NotImplementedError

    def mount(self, ds: Dataset, scenario: Scenario, work: Path) -> Mounted:
        upper, workdir, mnt = work / "upper", work / "work", work / "mnt"
        for d in (upper, workdir, mnt):
            d.mkdir()
        cwd = ds.stack_dir(scenario.stack)
        lowers = ":".join(ds.stack_lowers(scenario.stack))
        cmd = self.mount_cmd(lowers, upper, workdir, mnt)
        t0 = time.perf_counter_ns()
        run(cmd, cwd=cwd, timeout=MOUNT_TIMEOUT)
        exited = (time.perf_counter_ns() - t0) / 1e9
        # "Live" = the root answers a stat through the new mount.
        st = os.stat(mnt)
        seconds = (time.perf_counter_ns() - t0) / 1e9
        if not is_mountpoint(mnt):
            raise CommandError(f"{cmd[0]} returned but {mnt} is not a mountpoint")
        pid = find_daemon(mnt) if self.fuse else None
        if pid is not None:
            self._served[pid] = self._served.get(pid, 0) + 1
        return Mounted(
            self.name,
            mnt,
            ds,
            scenario.stack,
            pid=pid,
            mount_seconds=seconds,
            exec_seconds=exited,
            fuse_conn=st.st_dev if self.fuse else None,
        )

    def unmount_cmds(self, mnt: Path) -> list[list[str]]:
        return [["umount", str(mnt)]]

    def umount(self, mnt: Mounted) -> None:
        errors: list[str] = []
        done = False
        for cmd in self.unmount_cmds(mnt.path):
            try:
                run(cmd, timeout=MOUNT_TIMEOUT)
                done = True
                break
            except (CommandError, subprocess.TimeoutExpired) as e:
                errors.append(str(e))
        if not done or is_mountpoint(mnt.path):
            force_unmount(mnt.path, mnt.fuse_conn)
        # The daemon must exit by itself once unmounted; don't let a straggler run on into
        # the next measurement. A process serving several mounts (layerfs -o share=K) exits
        # with the last of them.
        left = self._served.pop(mnt.pid, 1) - 1 if mnt.pid is not None else 0
        if left > 0 and mnt.pid is not None:
            self._served[mnt.pid] = left
        elif mnt.pid is not None and not wait_pid_gone(mnt.pid, 30):
            errors.append(f"daemon {mnt.pid} still running 30 s after unmount: killed")
            done = False
            os.kill(mnt.pid, signal.SIGKILL)
            wait_pid_gone(mnt.pid, 10)
        if not done:
            raise CommandError("; ".join(errors))


class Kernel(_Overlay):
    name = "kernel"
    extra = ""  # mount options after the directories

    def unavailable(self) -> str | None:
        if os.geteuid() != 0:
            return "needs root"
        if "overlay" not in Path("/proc/filesystems").read_text():
            return "no overlay in /proc/filesystems"
        return None

    def version(self) -> str:
        return f"overlayfs, Linux {os.uname().release}"

    def mount_cmd(self, lowers: str, upper: Path, workdir: Path, mnt: Path) -> list[str]:
        opts = f"lowerdir={lowers},upperdir={upper},workdir={workdir}{self.extra}"
        return ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)]

    def podman_mount_program(self) -> Path | None:
        if self.extra:
            return super().podman_mount_program()
        return None  # podman's overlay driver mounts the kernel's overlay itself


class KernelMetacopy(Kernel):
    """Kernel overlayfs with metadata-only copy-up: the reference for layerfs -o metacopy=on."""

    name = "kernel-metacopy"
    extra = ",redirect_dir=on,metacopy=on"


class KernelVolatile(Kernel):
    """Kernel overlayfs without syncs (``volatile``): the reference for layerfs -o volatile,
    and the durability fuse-overlayfs has (it does not fsync a copy-up)."""

    name = "kernel-volatile"
    extra = ",volatile"


class KernelStrict(Kernel):
    """Kernel overlayfs ``fsync=strict`` (6.12+ stable): metadata-only copy-ups and directories
    synced too; the reference for layerfs -o fsync=strict."""

    name = "kernel-strict"
    extra = ",fsync=strict"

    def unavailable(self) -> str | None:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
        if (major, minor) < (6, 12):
            return "fsync= needs Linux 6.12+ (with the 2026 stable fix)"
        return super().unavailable()


class FuseOverlayfs(_Overlay):
    name = "fuse-overlayfs"
    fuse = True

    def unavailable(self) -> str | None:
        if not shutil.which("fuse-overlayfs"):
            return "fuse-overlayfs not installed"
        if not Path("/dev/fuse").exists():
            return "no /dev/fuse"
        return None

    def version(self) -> str:
        out = subprocess.run(["fuse-overlayfs", "--version"], capture_output=True, check=False)
        for line in (out.stdout + out.stderr).decode(errors="replace").splitlines():
            if line.startswith("fuse-overlayfs"):
                return line.strip()
        return "unknown"

    def mount_cmd(self, lowers: str, upper: Path, workdir: Path, mnt: Path) -> list[str]:
        opts = f"lowerdir={lowers},upperdir={upper},workdir={workdir}"
        return ["fuse-overlayfs", "-o", opts, str(mnt)]

    def podman_mount_program(self) -> Path | None:
        return Path(shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs").resolve()

    def unmount_cmds(self, mnt: Path) -> list[list[str]]:
        return [["fusermount3", "-u", str(mnt)], ["umount", str(mnt)]]


def layerfs_command() -> str | None:
    """The ``layerfs`` console script: beside this interpreter, in the repo's venv, on PATH."""
    for cand in (
        Path(sys.executable).parent / "layerfs",
        REPO / ".venv/bin/layerfs",
        Path("/work/venv/bin/layerfs"),
    ):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which("layerfs")


# Runs the layerfs CLI from a snapshot directory given as the first argument.
_SNAPSHOT_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'layerfs'; "
    "from layerfs.cli import main; sys.exit(main())"
)


class Layerfs(_Overlay):
    """layerfs through its CLI: the installed command, or (``rev``) the code of one git
    revision, extracted once, so that edits made to the work tree during a long run do not
    change what is measured half-way."""

    name = "layerfs"
    fuse = True

    def __init__(
        self,
        command: str | None = None,
        options: str = "",
        rev: str | None = None,
        name: str = "layerfs",
    ) -> None:
        super().__init__()
        self.name = name
        self.command = command or layerfs_command()
        self.options = options
        self.rev = rev
        self.prefix: list[str] = [self.command] if self.command else []
        # mount.layerfs, what podman and containerd run: beside the command, or the pinned
        # revision's (pin)
        helper = Path(self.command).with_name("mount.layerfs") if self.command else None
        self.helper = helper if helper is not None and helper.exists() else None
        self.described = ""

    def unavailable(self) -> str | None:
        if not self.command:
            return "layerfs command not found (pip install -e the repo)"
        if not Path("/dev/fuse").exists():
            return "no /dev/fuse"
        return None

    def pin(self, snapshots: Path) -> None:
        """Extract ``rev`` into ``snapshots`` and run layerfs from there."""
        if not self.rev or not self.command:
            return
        sha = _git("rev-parse", "--verify", f"{self.rev}^{{commit}}")
        snap = snapshots / sha
        if not (snap / "layerfs" / "cli.py").exists():
            tmp = snapshots / f"{sha}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", sha, "layerfs", "mount_helper"],
                capture_output=True,
                check=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
            tmp.rename(snap)
        # the engine compiled by mypyc (layerfs.compiled): the work tree's build, loaded by
        # the snapshot's daemons only where it was built from the snapshot's sources (its
        # MANIFEST), else the engine runs interpreted as before
        built = REPO / "build" / "mypyc"
        if (built / "MANIFEST").is_file():
            shutil.rmtree(snap / "build" / "mypyc", ignore_errors=True)
            shutil.copytree(built, snap / "build" / "mypyc")
        # the compiled raw path (layerfs._craw, the default loop): the work tree's build, which
        # fusehooks.craw_module loads only where it was built from the snapshot's _craw.pyx
        for ext in (REPO / "layerfs").glob("_craw*.so"):
            shutil.copy2(ext, snap / "layerfs" / ext.name)
        # The interpreter of the venv the command belongs to has pyfuse3 and trio.
        python = Path(self.command).parent / "python"
        interp = str(python) if python.exists() else sys.executable
        self.prefix = [interp, "-c", _SNAPSHOT_BOOT, str(snap)]
        # mount.layerfs as scripts/setup.sh installs it (podman's mount_program must be a
        # file): the launcher, with the snapshot first on its path, behind the snapshot's C
        # front end where it has one (mount_helper/front.c) and it builds
        helper = snap / "mount.layerfs"
        front = snap / "mount_helper" / "front.c"
        paths = [str(snap), *launcher.site_paths(interp)]
        launcher.install(str(helper), interp, paths, str(front) if front.exists() else None)
        self.helper = helper
        self.described = f"git {sha[:12]} (pinned from {self.rev})"

    def version(self) -> str:
        assert self.command
        ver = command_version([*self.prefix, "--version"])
        if self.described:
            return f"{ver}, {self.described}"
        try:
            rev = _git("describe", "--always", "--dirty")
        except (OSError, subprocess.CalledProcessError):
            rev = "?"
        return f"{ver} (git {rev}, work tree)"

    def mount_cmd(self, lowers: str, upper: Path, workdir: Path, mnt: Path) -> list[str]:
        if self.helper is not None:
            # what podman and containerd run (the mount rows time it); atime: as `layerfs
            # mount` mounts, where mount.layerfs defaults to noatime like fuse-overlayfs
            opts = f"lowerdir={lowers},upperdir={upper},workdir={workdir},atime"
            cmd = [str(self.helper), "overlay", str(mnt), "-o"]
            return [*cmd, f"{opts},{self.options}".rstrip(",")]
        cmd = [*self.prefix, "mount", lowers, str(upper), str(mnt), "--workdir", str(workdir)]
        if self.options:
            cmd += ["-o", self.options]
        return cmd

    def unmount_cmds(self, mnt: Path) -> list[list[str]]:
        return [[*self.prefix, "umount", str(mnt)], ["fusermount3", "-u", str(mnt)]]

    def podman_mount_program(self) -> Path | None:
        if self.options or self.helper is None:
            return super().podman_mount_program()
        return self.helper


def _git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, check=True)
    return out.stdout.decode().strip()


SHARE = 5  # the pss row's layerfs-share: 20 mounts in 4 processes

ALL_TARGETS = ["native", "kernel", "fuse-overlayfs", "layerfs"]
# Opt-in (--targets), for the copy-up scenarios: metadata-only copy-up on both sides, and
# each fsync= mode on both sides (the default, auto, is "kernel" and "layerfs"); for the pss
# row, layerfs -o ksm and -o share=SHARE.
EXTRA_TARGETS = [
    "kernel-metacopy",
    "layerfs-metacopy",
    "kernel-volatile",
    "layerfs-volatile",
    "kernel-strict",
    "layerfs-strict",
    "layerfs-ksm",
    "layerfs-share",
]


def make_targets(
    names: list[str], layerfs_cmd: str | None, layerfs_opts: str, layerfs_rev: str | None = None
) -> list[Target]:
    def layerfs(variant: str, opt: str) -> Layerfs:
        opts = ",".join(filter(None, [layerfs_opts, opt]))
        return Layerfs(layerfs_cmd, opts, layerfs_rev, name=f"layerfs-{variant}")

    table: dict[str, Target] = {
        "native": Native(),
        "kernel": Kernel(),
        "fuse-overlayfs": FuseOverlayfs(),
        "layerfs": Layerfs(layerfs_cmd, layerfs_opts, layerfs_rev),
        "kernel-metacopy": KernelMetacopy(),
        "layerfs-metacopy": layerfs("metacopy", "metacopy=on"),
        "kernel-volatile": KernelVolatile(),
        "layerfs-volatile": layerfs("volatile", "fsync=volatile"),
        "kernel-strict": KernelStrict(),
        "layerfs-strict": layerfs("strict", "fsync=strict"),
        "layerfs-ksm": layerfs("ksm", "ksm"),  # the pss row then runs the host's ksmd
        "layerfs-share": layerfs("share", f"share={SHARE}"),  # SHARE mounts a process
    }

    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown target(s) {unknown}; choose from {ALL_TARGETS + EXTRA_TARGETS}")
    return [table[n] for n in names]
