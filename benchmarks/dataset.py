"""The benchmark data set: built once per size, cached under ``--data-dir``, shared by targets.

Layout of ``DATA_DIR/SIZE/``:

- ``native/``: the merged tree as a plain directory (the reference, and the oracle for the
  tree check). A Debian minbase rootfs with python3 (debootstrap, full size) or a synthetic
  tree shaped like one (tiny, small), plus the workload extras: ``big/bigfile``, ``dir10k/``,
  ``mergeddir/``, ``etc/opaque-dir/``.
- ``layers/l0`` (bottom), ``l1``, ``l2`` (top): the same tree split into three layers. Files
  are spread over the layers by a hash of their path, so most directories are merged across
  layers; the lower layers also hold stale versions of files that a higher layer overrides,
  and "ghost" files and directories that a higher layer deletes with kernel-format whiteouts
  (character device 0/0); ``etc/opaque-dir`` is opaque in ``l2``
  (``trusted.overlay.opaque=y``) over stale entries in ``l0``.
- ``stacks/sN/l000 .. l(N-1)`` (top first) for N in the size's stack depths: the same files in
  the bottom layer and only the directories in every layer above, so a lookup of a bottom
  file misses in N-1 layers first. ``stacks/s1/l000`` doubles as their native reference.
- ``untar.tar``: files to unpack into the merged view (new files in existing directories).
- ``meta.json``: what was built; a changed ``DATASET_VERSION`` or size rebuilds.

Lower paths are given to mounts relative to the data set directory (``layers/l2:...``,
``l000:l001:...`` from the stack directory), as containers/storage does, so 128 lowers fit in
the kernel's one-page mount options.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import random
import shutil
import stat
import subprocess
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from benchmarks.model import SIZES, MiB, SizeParams
from benchmarks.system import run

DATASET_VERSION = 4
DEFAULT_DATA_DIR = Path("/var/tmp/layerfs-bench")
DEBIAN_SUITE = "bookworm"
DEBOOTSTRAP_INCLUDE = "python3"
STACK_DIRS = 20  # directories per stack layer; stack files are spread over them
WHITEOUT_DEV = os.makedev(0, 0)


def log(msg: str) -> None:
    print(f"[dataset] {msg}", flush=True)


@dataclass
class Dataset:
    """A built data set on disk (see the module docstring for the layout)."""

    root: Path
    params: SizeParams
    meta: dict[str, object]

    @property
    def native(self) -> Path:
        return self.root / "native"

    @property
    def layer_names(self) -> list[str]:
        """The base stack's lowers, relative to ``root``, topmost first."""
        return ["layers/l2", "layers/l1", "layers/l0"]

    def stack_dir(self, stack: str) -> Path:
        if stack == "base":
            return self.root
        if stack == "many":
            return self.root / "many"
        return self.root / "stacks" / stack

    def stack_lowers(self, stack: str) -> list[str]:
        """Lower directories of ``stack``, relative to ``stack_dir(stack)``, topmost first."""
        if stack == "base":
            return self.layer_names
        if stack == "many":
            return ["l0"]
        depth = int(stack[1:])
        return [f"l{i:03d}" for i in range(depth)]

    def stack_native(self, stack: str) -> Path:
        if stack == "base":
            return self.native
        if stack == "many":
            return self.root / "many" / "l0"
        return self.root / "stacks" / "s1" / "l000"

    def build_many(self) -> None:
        """The tree of ``params.many_entries`` empty files (built on first use: it is big)."""
        many = self.root / "many"
        n = self.params.many_entries
        if (many / "done").exists():
            return
        fd = os.open(self.root / ".many.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes
        try:
            if not (many / "done").exists():
                self._build_many(many, n)
        finally:
            os.close(fd)

    def _build_many(self, many: Path, n: int) -> None:
        _rmtree(many)
        log(f"{n} empty files for the daemon memory scenario")
        per_dir = 1000
        layer = many / "l0"
        for d in range((n + per_dir - 1) // per_dir):
            sub = layer / f"d{d:04d}"
            sub.mkdir(parents=True)
            dfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for i in range(min(per_dir, n - d * per_dir)):
                    os.close(os.open(f"f{i:04d}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd))
            finally:
                os.close(dfd)
        (many / "done").touch()

    @property
    def big_rel(self) -> str:
        return "big/bigfile"

    @property
    def untar_tarball(self) -> Path:
        return self.root / "untar.tar"

    @property
    def has_python3(self) -> bool:
        return bool(self.meta.get("has_python3"))

    @property
    def has_shell(self) -> bool:
        return bool(self.meta.get("has_shell"))

    @property
    def rm_tree(self) -> str:
        """A large lower directory tree that ``rm -rf`` removes."""
        return "usr/share"

    def stack_files(self) -> list[str]:
        """Paths (relative to a stack's root) of the files in the bottom layer."""
        n = self.params.stack_files
        return [f"d{i % STACK_DIRS:02d}/f{i:06d}" for i in range(n)]

    def tree_listing(self, stack: str = "base") -> list[str]:
        return tree_listing(self.stack_native(stack))


def tree_listing(root: Path) -> list[str]:
    """Sorted ``path type size`` lines of a tree (sizes of directories left out)."""
    proc = subprocess.run(
        ["find", ".", "-mindepth", "1", "-printf", r"%P %y %s\n"],
        cwd=root,
        capture_output=True,
        check=True,
    )
    lines = []
    for line in proc.stdout.decode(errors="surrogateescape").splitlines():
        path, kind, size = line.rsplit(" ", 2)
        lines.append(f"{path} {kind} {'-' if kind == 'd' else size}")
    lines.sort()
    return lines


# --- building -------------------------------------------------------------------------------


def lock_dataset(data_dir: Path, size: str, *, exclusive: bool) -> int:
    """Hold a lock on the data set of ``size`` until the returned fd is closed (or the process
    exits): exclusive to build it, shared to use it, so no run loses its data set to a rebuild
    in another process."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / f".{size}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    return fd


def load_or_build(data_dir: Path, size: str, *, rebuild: bool = False) -> Dataset:
    """Return the cached data set of ``size``, building it first if needed.

    A shared lock on it is held until the process exits (it only blocks a rebuild by
    another process; a rebuild waits for every run that uses the data set to end)."""
    fd = lock_dataset(data_dir, size, exclusive=False)
    ds = None if rebuild else _load(data_dir, size)
    if ds is None:
        os.close(fd)
        fd = lock_dataset(data_dir, size, exclusive=True)
        ds = None if rebuild else _load(data_dir, size)  # built by another process meanwhile?
        if ds is None:
            ds = _build_dataset(data_dir, size)
        fcntl.flock(fd, fcntl.LOCK_SH)
    _held_locks.append(fd)
    return ds


_held_locks: list[int] = []


def _load(data_dir: Path, size: str) -> Dataset | None:
    params = SIZES[size]
    root = data_dir / size
    meta_path = root / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    # Compared as JSON has them (tuples come back as lists).
    if meta.get("version") == DATASET_VERSION and meta.get("params") == json.loads(
        json.dumps(params.__dict__)
    ):
        return Dataset(root, params, meta)
    log(f"{root}: stale (version or size parameters changed)")
    return None


def _build_dataset(data_dir: Path, size: str) -> Dataset:
    params = SIZES[size]
    root = data_dir / size
    data_dir.mkdir(parents=True, exist_ok=True)
    building = data_dir / f"{size}.building"
    _rmtree(building)
    t0 = time.monotonic()
    meta = _build(data_dir, building, params)
    (building / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    _rmtree(root)
    building.rename(root)
    log(f"built {root} in {time.monotonic() - t0:.1f} s")
    return Dataset(root, params, meta)


def _rmtree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def _build(data_dir: Path, root: Path, params: SizeParams) -> dict[str, object]:
    rng = random.Random(f"layerfs-bench-{params.name}")
    native = root / "native"
    root.mkdir(parents=True)
    if params.synthetic_files:
        log(f"synthetic rootfs, {params.synthetic_files} files")
        _synthetic_rootfs(native, params.synthetic_files, rng)
    else:
        rootfs = debootstrap(data_dir)
        log(f"copying {rootfs} to native/")
        run(["cp", "-a", str(rootfs), str(native)])
    plan = _Plan()
    _add_extras(native, params, rng, plan)
    log("splitting into 3 layers")
    _split_layers(native, root / "layers", rng, plan)
    log(f"layer-count stacks {params.stack_depths}")
    _build_stacks(root / "stacks", params)
    log("untar tarball")
    _build_tarball(native, root / "untar.tar", params.untar)
    has_python3 = any(
        (native / p).exists() or (native / p).is_symlink()
        for p in ("usr/bin/python3", "bin/python3")
    )
    has_shell = (native / "bin/sh").exists()
    n_entries = sum(len(d) + len(f) for _, d, f in os.walk(native))
    return {
        "version": DATASET_VERSION,
        "params": params.__dict__,
        "source": "synthetic"
        if params.synthetic_files
        else f"debootstrap {DEBIAN_SUITE} --variant=minbase --include={DEBOOTSTRAP_INCLUDE}",
        "entries": n_entries,
        "has_python3": has_python3,
        "has_shell": has_shell,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def debian_mirror() -> str:
    """The Debian mirror apt is configured with (deb822 or one-line sources)."""
    for path in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt").glob("sources.list.d/*.list")]:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                parts = line.split()
                if parts[:1] == ["deb"] and "security" not in line:
                    return next(p for p in parts[1:] if "://" in p)
    return "http://deb.debian.org/debian"


def debootstrap(data_dir: Path, include: str = DEBOOTSTRAP_INCLUDE) -> Path:
    """A pristine minbase rootfs with INCLUDE's packages (none: ""), cached in ``data_dir`` and
    shared by every size (``debootstrap-bookworm`` with python3, ``debootstrap-bookworm-minbase``
    without: the base the podman build row installs python3 into)."""
    name = f"debootstrap-{DEBIAN_SUITE}" + ("" if include else "-minbase")
    target = data_dir / name
    if (target / "usr/bin/sh").exists() or (target / "bin/sh").exists():
        return target
    partial = data_dir / f"{name}.partial"
    _rmtree(partial)
    mirror = debian_mirror()
    log(f"debootstrap {DEBIAN_SUITE} from {mirror} (a few minutes)")
    run(
        [
            "debootstrap",
            "--variant=minbase",
            *([f"--include={include}"] if include else []),
            DEBIAN_SUITE,
            str(partial),
            mirror,
        ],
        timeout=3600,
    )
    # The apt cache is not part of an image: drop it, as image builds do.
    for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (partial / sub).glob("*"):
            if p.is_file():
                p.unlink()
    partial.rename(target)
    return target


# The synthetic tree: where files go, and how many of every 100.
_SYNTH_AREAS: list[tuple[str, int]] = [
    ("usr/bin", 8),
    ("usr/sbin", 2),
    ("usr/lib/x86_64-linux-gnu", 20),
    ("usr/lib/python3/dist-packages", 15),
    ("usr/share/doc", 18),
    ("usr/share/locale", 8),
    ("usr/share/zoneinfo", 10),
    ("usr/share/man", 7),
    ("etc", 5),
    ("var/lib/dpkg/info", 7),
]


def _synthetic_rootfs(native: Path, n_files: int, rng: random.Random) -> None:
    """A tree shaped like a Debian rootfs: merged /usr, nested dirs, symlinks, small files."""
    for d in (
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "etc",
        "var/lib",
        "var/log",
        "var/tmp",
        "root",
        "home",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "opt",
        "srv",
        "mnt",
    ):
        (native / d).mkdir(parents=True, exist_ok=True)
    os.chmod(native / "tmp", 0o1777)
    for link, target in (
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib"),
    ):
        os.symlink(target, native / link)
    # A static busybox makes `chroot MERGED /bin/sh` work without a real rootfs.
    busybox = shutil.which("busybox")
    if busybox and _is_static(Path(busybox)):
        shutil.copy2(busybox, native / "usr/bin/busybox")
        os.symlink("busybox", native / "usr/bin/sh")
    weights = [w for _, w in _SYNTH_AREAS]
    for i in range(n_files):
        area = rng.choices(_SYNTH_AREAS, weights)[0][0]
        group = rng.randrange(max(1, n_files // 40))
        if area in ("usr/bin", "usr/sbin", "etc"):
            rel = f"{area}/{_word(rng)}{i}"
        elif area == "usr/share/doc":
            rel = f"{area}/pkg{group}/{rng.choice(['copyright', 'changelog.Debian.gz'])}{i}"
        elif area == "usr/share/locale":
            rel = f"{area}/l{group % 60}/LC_MESSAGES/{_word(rng)}{i}.mo"
        elif area == "usr/share/zoneinfo":
            rel = f"{area}/Region{group % 12}/City{i}"
        elif area == "usr/share/man":
            rel = f"{area}/man{group % 8 + 1}/{_word(rng)}{i}.gz"
        elif area == "usr/lib/python3/dist-packages":
            rel = f"{area}/pkg{group % 50}/sub{group % 7}/mod{i}.py"
        elif area == "var/lib/dpkg/info":
            rel = f"{area}/pkg{i}.{rng.choice(['list', 'md5sums', 'postinst'])}"
        else:
            rel = f"{area}/lib{_word(rng)}{i}.so.1.2"
        path = native / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        size = min(int(rng.lognormvariate(8.0, 1.3)), 512 * 1024)
        path.write_bytes(rng.randbytes(size))
        mode = 0o755 if area in ("usr/bin", "usr/sbin") or rel.endswith(".so.1.2") else 0o644
        os.chmod(path, mode)
        if rel.endswith(".so.1.2"):
            os.symlink(path.name, path.with_name(path.name[:-4]))


def _is_static(path: Path) -> bool:
    try:
        out = subprocess.run(["file", "-L", str(path)], capture_output=True, check=False)
    except OSError:
        # No `file`: busybox-static's binary is the only one Debian installs as /bin/busybox.
        return True
    return b"statically linked" in out.stdout or b"static-pie" in out.stdout


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))


class _Plan:
    """Where special paths go, and what only exists in lower layers (stale, ghost, opaque)."""

    def __init__(self) -> None:
        self.fixed_layer: dict[str, int] = {}  # native path -> layer index (0 bottom)
        self.opaque_dirs: list[str] = []  # opaque in l2, with stale entries in l0


def _add_extras(native: Path, params: SizeParams, rng: random.Random, plan: _Plan) -> None:
    big = native / "big"
    big.mkdir()
    log(f"big file, {params.big_file // MiB} MiB")
    with (big / "bigfile").open("wb") as f:
        left = params.big_file
        chunk = rng.randbytes(4 * MiB)
        while left > 0:
            # Vary each chunk cheaply so no filesystem can dedup or compress it away.
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
            chunk = chunk[1:] + chunk[:1]
    plan.fixed_layer["big/bigfile"] = 0
    d10k = native / "dir10k"
    d10k.mkdir()
    for i in range(params.dir10k):
        (d10k / f"file{i:05d}").write_bytes(rng.randbytes(rng.randrange(0, 8192)))
        plan.fixed_layer[f"dir10k/file{i:05d}"] = 1
    md = native / "mergeddir"
    md.mkdir()
    for i in range(params.merged_dir):
        (md / f"m{i:05d}").write_bytes(rng.randbytes(rng.randrange(0, 2048)))
        plan.fixed_layer[f"mergeddir/m{i:05d}"] = i % 3
    od = native / "etc/opaque-dir"
    od.mkdir(parents=True)
    for i in range(3):
        (od / f"new{i}").write_bytes(b"new\n")
        plan.fixed_layer[f"etc/opaque-dir/new{i}"] = 2
    plan.opaque_dirs.append("etc/opaque-dir")


def _layer_of(rel: str, plan: _Plan) -> int:
    if rel in plan.fixed_layer:
        return plan.fixed_layer[rel]
    h = zlib.crc32(rel.encode(errors="surrogateescape")) % 100
    return 0 if h < 70 else 1 if h < 95 else 2


def _split_layers(native: Path, layers: Path, rng: random.Random, plan: _Plan) -> None:
    members: list[list[str]] = [[], [], []]
    for dirpath, dirnames, filenames in os.walk(native):
        rel_dir = os.path.relpath(dirpath, native)
        for name in filenames + [d for d in dirnames if os.path.islink(Path(dirpath, d))]:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            members[_layer_of(rel, plan)].append(rel)
        if not filenames and not dirnames and rel_dir != ".":
            members[0].append(rel_dir)  # empty directories live in the bottom layer
    for idx, files in enumerate(members):
        layer = layers / f"l{idx}"
        layer.mkdir(parents=True)
        # Parents first, so tar recreates every ancestor with its real metadata.
        paths: set[str] = set()
        for rel in files:
            parts = rel.split("/")
            for k in range(1, len(parts)):
                paths.add("/".join(parts[:k]))
            paths.add(rel)
        _copy_paths(native, layer, sorted(paths))
    lower, middle, top = (layers / f"l{i}" for i in range(3))
    # Stale versions below the files that a higher layer provides.
    for idx in (1, 2):
        for rel in members[idx]:
            src = native / rel
            if src.is_symlink() or not src.is_file() or zlib.crc32(os.fsencode(rel)) % 10:
                continue
            if rel.startswith(("dir10k/", "big/")):
                continue  # the 10k directory stays a one-layer directory
            _write_file(lower, rel, b"stale lower version\n" * rng.randint(1, 50))
    # Ghosts: exist in a lower layer, deleted above by a whiteout.
    n_ghost = max(5, len(members[0]) // 100)
    for i in range(n_ghost):
        where = ["usr/share/doc", "usr/bin", "etc", "var/lib", "mergeddir"][i % 5]
        if i % 5 == 0:
            gdir = f"{where}/ghost-pkg{i}"
            for k in range(5):
                _write_file(lower, f"{gdir}/file{k}", b"ghost\n")
            _whiteout(top, gdir)
        else:
            rel = f"{where}/ghost{i}"
            _write_file(lower, rel, b"ghost\n")
            _whiteout(middle if i % 2 else top, rel)
    for rel in plan.opaque_dirs:
        for k in range(20):
            _write_file(lower, f"{rel}/old{k}", b"old\n")
        (top / rel).mkdir(parents=True, exist_ok=True)
        os.setxattr(top / rel, "trusted.overlay.opaque", b"y")


def _copy_paths(src: Path, dst: Path, rels: list[str]) -> None:
    """Copy ``rels`` (parents listed first) from ``src`` to ``dst`` with all metadata."""
    listing = b"".join(os.fsencode(r) + b"\0" for r in rels)
    create = subprocess.Popen(
        [
            "tar",
            "-C",
            str(src),
            "--no-recursion",
            "--null",
            "-T",
            "-",
            "--xattrs",
            "--xattrs-include=*",
            "-cf",
            "-",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    extract = subprocess.Popen(
        ["tar", "-C", str(dst), "--xattrs", "--xattrs-include=*", "--same-owner", "-xpf", "-"],
        stdin=create.stdout,
    )
    assert create.stdin is not None and create.stdout is not None
    create.stdout.close()
    create.stdin.write(listing)
    create.stdin.close()
    if create.wait() != 0 or extract.wait() != 0:
        raise RuntimeError(f"copying {len(rels)} paths from {src} to {dst} failed")


def _write_file(layer: Path, rel: str, data: bytes) -> None:
    path = layer / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _whiteout(layer: Path, rel: str) -> None:
    path = layer / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, WHITEOUT_DEV)


def _build_stacks(stacks: Path, params: SizeParams) -> None:
    bottom = stacks / "bottom"
    for d in range(STACK_DIRS):
        (bottom / f"d{d:02d}").mkdir(parents=True)
    payload = b"x" * 100
    for i in range(params.stack_files):
        (bottom / f"d{i % STACK_DIRS:02d}" / f"f{i:06d}").write_bytes(payload)
    for depth in params.stack_depths:
        sdir = stacks / f"s{depth}"
        sdir.mkdir()
        for k in range(depth - 1):
            for d in range(STACK_DIRS):
                (sdir / f"l{k:03d}" / f"d{d:02d}").mkdir(parents=True)
        # The bottom layer: hard links to one copy (lowers are never written).
        run(["cp", "-al", str(bottom), str(sdir / f"l{depth - 1:03d}")])
    if 1 not in params.stack_depths:
        run(["cp", "-al", str(bottom), str(stacks / "s1")])
    _rmtree(bottom)


def _build_tarball(native: Path, tarball: Path, budget: int) -> None:
    """New files in existing directories (as a package install writes them), ``budget`` bytes
    of real content taken from the rootfs."""
    sources: list[Path] = []
    for dirpath, _, filenames in os.walk(native / "usr"):
        for name in sorted(filenames):
            p = Path(dirpath, name)
            if not p.is_symlink() and p.is_file():
                sources.append(p)
    sources.sort()
    total = 0
    dirs_added: set[str] = set()
    with tarfile.open(tarball, "w", format=tarfile.GNU_FORMAT) as tar:
        rnd = 0
        while total < budget and sources:
            for src in sources:
                if total >= budget:
                    break
                rel = src.relative_to(native).as_posix()
                parent, name = rel.rsplit("/", 1)
                new_dir = f"{parent}/bench-untar{rnd}" if rnd else f"{parent}/bench-untar"
                if new_dir not in dirs_added:
                    info = tarfile.TarInfo(new_dir)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    info.mtime = 1700000000
                    tar.addfile(info)
                    dirs_added.add(new_dir)
                data = src.read_bytes()[: budget - total + 1]
                info = tarfile.TarInfo(f"{new_dir}/{name}")
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 1700000000
                tar.addfile(info, io.BytesIO(data))
                total += len(data)
            rnd += 1
