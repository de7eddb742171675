"""A private podman installation in a temp dir: config files, the base image, leftover checks.

Nothing in /etc is read or written for storage, engine or registry settings: podman is pointed
at private files through CONTAINERS_STORAGE_CONF, CONTAINERS_CONF and REGISTRIES_CONFIG_PATH,
and HOME/XDG_* point into the temp dir so the signature policy
(``$HOME/.config/containers/policy.json``, read before /etc's) is private too.
Podman as root still touches a few fixed host paths that no option moves (see
docs/testing-podman.md): /run/containers/networks, /var/lib/containers/cache and the runtime's
state dir /run/runc or /run/crun.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from layerfs import mountinfo

# One podman call (a build of several RUN steps included) should take seconds; this only bounds
# a hang so that the test fails with the command's output instead of the pytest timeout.
COMMAND_TIMEOUT = 240.0
# How long to wait for something asynchronous to settle (conmon's cleanup processes exiting,
# a detached container reaching its sleep): a deadline, never an assertion about speed.
SETTLE_TIMEOUT = 60.0

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


class PodmanError(AssertionError):
    """A podman command failed; the message holds the command and its output."""


@dataclass
class PodmanEnv:
    """One private podman: storage, run and config dirs under ``root``."""

    root: Path
    runtime: str
    driver: str = "overlay"
    mount_program: Path | None = None
    # Which mount program this is, for test ids and results: kernel-overlay, fuse-overlayfs...
    label: str = ""
    # containers.conf default_ulimits; podman's own default (nofile 1048576) fails where we lack
    # CAP_SYS_RESOURCE, so the probe measures the host's limits and every env uses them.
    ulimits: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    # podman's stderr lines at level warning or error, from calls that succeeded.
    complaints: list[str] = field(default_factory=list)
    # rootless: podman runs as this user (setpriv, a clean environment), which owns ``root``
    user: str | None = None

    @property
    def graphroot(self) -> Path:
        return self.root / "g"

    @property
    def runroot(self) -> Path:
        return self.root / "r"

    def setup(self) -> None:
        """Write the config files and the environment podman runs with."""
        for sub in ("g", "r", "t", "tmp", "xdg", "net", "home/.config/containers"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "xdg").chmod(0o700)
        storage = [
            "[storage]",
            f'driver = "{self.driver}"',
            f'graphroot = "{self.graphroot}"',
            f'runroot = "{self.runroot}"',
        ]
        if self.mount_program is not None:
            storage += ["[storage.options.overlay]", f'mount_program = "{self.mount_program}"']
        (self.root / "storage.conf").write_text("\n".join(storage) + "\n")
        t = self.root / "t"
        containers = [
            "[containers]",
            'netns = "none"',
            'log_driver = "k8s-file"',
            "default_ulimits = [" + ", ".join(f'"{u}"' for u in self.ulimits) + "]",
            "[engine]",
            'cgroup_manager = "cgroupfs"',
            'events_logger = "file"',
            f'events_logfile_path = "{t}/events.log"',
            # file locks live in tmp_dir; the default shm locks are one host-wide segment that
            # every root podman would share.
            'lock_type = "file"',
            f'tmp_dir = "{t}"',
            f'static_dir = "{self.graphroot}/libpod"',
            f'volume_path = "{self.graphroot}/volumes"',
            f'image_copy_tmp_dir = "{self.root}/tmp"',
            f'runtime = "{self.runtime}"',
            "[network]",
            f'network_config_dir = "{self.root}/net"',
        ]
        (self.root / "containers.conf").write_text("\n".join(containers) + "\n")
        if self.user is not None:
            shutil.chown(self.root, self.user, self.user)
            for p in self.root.rglob("*"):
                shutil.chown(p, self.user, self.user)
        # No search registries, no registries at all: a short name can never reach out.
        (self.root / "registries.conf").write_text("unqualified-search-registries = []\n")
        policy = {"default": [{"type": "insecureAcceptAnything"}]}
        (self.root / "home/.config/containers/policy.json").write_text(json.dumps(policy))
        path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
        self.env = {
            "PATH": path + ":/sbin:/bin",
            "HOME": str(self.root / "home"),
            "XDG_CONFIG_HOME": str(self.root / "home/.config"),
            "XDG_DATA_HOME": str(self.root / "home/.local/share"),
            "XDG_RUNTIME_DIR": str(self.root / "xdg"),
            "TMPDIR": str(self.root / "tmp"),
            "LANG": "C.UTF-8",
            "CONTAINERS_STORAGE_CONF": str(self.root / "storage.conf"),
            "CONTAINERS_CONF": str(self.root / "containers.conf"),
            "REGISTRIES_CONFIG_PATH": str(self.root / "registries.conf"),
        }

    def run(
        self,
        *args: str,
        check: bool = True,
        input: str | bytes | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``podman ARGS`` with the private config; raise PodmanError when it fails."""
        cmd = self.argv(*args)
        data = input.encode() if isinstance(input, str) else input
        try:
            r = subprocess.run(
                cmd,
                env=self.env,
                input=data,
                stdin=None if data is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise PodmanError(f"timed out after {timeout}s: {' '.join(cmd)}\n{_out(e)}") from None
        res = subprocess.CompletedProcess(
            cmd, r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
        )
        if res.returncode == 0:
            self.complaints += [
                f"{' '.join(cmd)[:120]}: {line}"
                for line in res.stderr.splitlines()
                if "level=warning" in line or "level=error" in line
            ]
        if check and res.returncode != 0:
            raise PodmanError(
                f"exit {res.returncode}: {' '.join(cmd)}\n"
                f"--- stdout\n{res.stdout}--- stderr\n{res.stderr}"
            )
        return res

    def argv(self, *args: str) -> list[str]:
        """The command line of ``podman ARGS``: as ``user``, when rootless."""
        if self.user is None:
            return ["podman", *args]
        who = [f"--reuid={self.user}", f"--regid={self.user}", "--init-groups"]
        env = [f"{k}={v}" for k, v in self.env.items()]
        return ["setpriv", *who, "env", "-i", *env, "podman", *args]

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        """Start ``podman ARGS`` without waiting (for concurrent starts)."""
        return subprocess.Popen(
            self.argv(*args),
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def import_rootfs(self, rootfs: Path, ref: str) -> str:
        """``tar -C rootfs -c . | podman import - REF``; returns the image id."""
        tar = subprocess.run(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."],
            capture_output=True,
            check=True,
        )
        r = self.run("import", "-q", "-", ref, input=tar.stdout)
        return r.stdout.strip().splitlines()[-1]

    def sh(self, image: str, script: str, *opts: str) -> str:
        """Run ``sh -c SCRIPT`` in a throw-away container; returns stdout."""
        return self.run("run", "--rm", "--network", "none", *opts, image, "sh", "-c", script).stdout

    def diff(self, name: str) -> set[tuple[str, str]]:
        """``podman diff`` as a set of (A|C|D, path)."""
        data = json.loads(self.run("diff", "--format", "json", name).stdout or "{}")
        kinds = {"added": "A", "changed": "C", "deleted": "D"}
        return {(kinds[k], p) for k, paths in data.items() for p in paths or ()}

    def remove_everything(self) -> None:
        """Remove all containers (force, no grace period); keep the images."""
        self.run("rm", "--all", "--force", "--time", "0", check=False)

    # --- what must be gone at the end -----------------------------------------------------

    def leftover_processes(self) -> list[str]:
        """Live processes that refer to this storage: mount daemons, conmon, cleanup."""
        return leftover_processes(self.root, self.mount_program)

    def leftover_mounts(self) -> list[str]:
        """Mounts under this storage, except containers/storage's own bind of its overlay dir."""
        home = self.graphroot / self.driver
        return [
            f"{mp} ({fstype})"
            for mp, fstype in mounts_under(self.root)
            if Path(mp) != home or fstype.startswith("fuse")
        ]

    def force_cleanup(self) -> list[str]:
        """Best-effort teardown: remove containers, wait for conmon's cleanup processes (each
        podman call mounts containers/storage's home again), unmount whatever is left under
        the root; returns problems."""
        problems: list[str] = []
        try:
            self.remove_everything()
        except PodmanError as e:
            problems.append(str(e))
        problems += settle(self.leftover_processes)
        for _ in range(3):
            left = sorted(mounts_under(self.root), key=lambda m: -len(m[0]))
            if not left:
                break
            for mp, fstype in left:
                if fstype.startswith("fuse"):
                    cmd = ["fusermount3", "-u", "-z", mp]
                else:
                    cmd = ["umount", mp]
                if subprocess.run(cmd, capture_output=True, check=False).returncode != 0:
                    subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
        problems += [f"cannot unmount {mp}" for mp, _ in mounts_under(self.root)]
        return problems


def _out(e: subprocess.TimeoutExpired) -> str:
    def s(b: bytes | str | None) -> str:
        return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

    return f"--- stdout\n{s(e.stdout)}--- stderr\n{s(e.stderr)}"


# --- /proc scans -----------------------------------------------------------------------------


def mounts_under(root: Path) -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount at or below ``root`` in our mount namespace."""
    prefix = os.fsencode(str(root).rstrip("/")) + b"/"
    return [
        (os.fsdecode(m.point), os.fsdecode(m.fstype))
        for m in mountinfo.mounts()
        if m.point == prefix[:-1] or m.point.startswith(prefix)
    ]


def leftover_processes(root: Path, program: Path | None) -> list[str]:
    """Live (non-zombie) processes whose argv or cwd mentions ``root``; those running
    ``program`` are marked "(mount program)"."""
    found = []
    me = os.getpid()
    needle = str(root)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
            if state == "Z":  # a zombie holds no mount; the host's init may be slow to reap
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                cwd = ""
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        # Other test sessions on the machine run the same programs: only ours count.
        if any(needle in a for a in argv) or cwd == needle or cwd.startswith(needle + "/"):
            ours = program is not None and any(str(program) in a for a in argv[:2])
            what = " (mount program)" if ours else ""
            found.append(f"pid {entry}{what}: {' '.join(argv)[:300]}")
    return found


def settle(fn: Callable[[], list[str]], timeout: float = SETTLE_TIMEOUT) -> list[str]:
    """Call ``fn()`` until it returns an empty list or the deadline passes; return the last."""
    deadline = time.monotonic() + timeout
    while True:
        res: list[str] = fn()
        if not res or time.monotonic() > deadline:
            return res
        time.sleep(0.2)


# --- the base image ----------------------------------------------------------------------------


def find_static_busybox() -> Path | None:
    """Debian's busybox-static binary (a dynamically linked busybox cannot run alone)."""
    for cand in BUSYBOX_CANDIDATES:
        p = Path(cand)
        if p.is_file() and not elf_has_interpreter(p):
            return p
    return None


def elf_has_interpreter(path: Path) -> bool:
    """True when the ELF file has a PT_INTERP header, i.e. needs a dynamic loader."""
    with path.open("rb") as f:
        hdr = f.read(64)
        if hdr[:4] != b"\x7fELF" or hdr[4] != 2:  # 64-bit only: Debian amd64/arm64
            return True
        end = "<" if hdr[5] == 1 else ">"
        (phoff,) = struct.unpack_from(end + "Q", hdr, 0x20)
        phentsize, phnum = struct.unpack_from(end + "HH", hdr, 0x36)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            (ptype,) = struct.unpack(end + "I", f.read(4))
            if ptype == 3:
                return True
    return False


def busybox_applets(busybox: Path) -> list[str]:
    r = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    return sorted({a for a in r.stdout.split() if a and "/" not in a and a != "busybox"})


def make_busybox_rootfs(dest: Path, busybox: Path) -> None:
    """A minimal root: /bin/busybox with a symlink per applet, /etc basics, mount points."""
    for d in ("bin", "etc", "proc", "sys", "dev", "run", "root", "tmp", "var/tmp"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, dest / "bin/busybox")
    for applet in busybox_applets(busybox):
        (dest / "bin" / applet).symlink_to("busybox")
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc/group").write_text("root:x:0:\n")
    # Podman bind-mounts these; when the image has them it need not create them in the upper.
    for name in ("hosts", "hostname", "resolv.conf"):
        (dest / "etc" / name).write_text("")
    (dest / "etc/mtab").symlink_to("/proc/mounts")
    normalise_modes(dest)


def write_tree(
    dest: Path, tree: Mapping[str, str | bytes | None], modes: Mapping[str, int]
) -> None:
    """Files (str/bytes content) and directories (None) under ``dest``, modes normalised,
    then ``modes``."""
    for rel, content in tree.items():
        p = dest / rel
        if content is None:
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content.encode() if isinstance(content, str) else content)
    normalise_modes(dest)
    for rel, mode in modes.items():
        os.chmod(dest / rel, mode)


def normalise_modes(root: Path) -> None:
    """Dirs 755, files 644 (busybox 755), /tmp 1777, whatever the umask of the host running
    the test: the expectations assume these modes."""
    root.chmod(0o755)
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        if p.is_dir():
            p.chmod(0o1777 if p.relative_to(root).as_posix() in ("tmp", "var/tmp") else 0o755)
        else:
            p.chmod(0o755 if p.name == "busybox" else 0o644)


def is_root_with_fuse() -> str | None:
    """Why this machine cannot run the e2e test at all, or None."""
    if os.geteuid() != 0:
        return "needs root (podman with a mount_program as root, private storage)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("podman") is None:
        return "podman is not installed (Debian package podman)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    return None


def venv_bin() -> Path:
    return Path(sys.executable).parent
