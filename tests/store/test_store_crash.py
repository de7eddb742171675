"""kill -9 at every crash point of an import's last step, and of the recovery that finishes it.

The store's image ``A`` (a base layer and its own) is in the store; ``image pull`` brings image
``B`` (the same base layer and another), moving the tag ``moving`` from A to B. For k = 1, 2,
...: a fresh copy of the store, the pull run with ``LAYERFS_STORE_CRASH_AT=k`` (an audit hook,
``layerfs.store.store.crash_at``: the pull SIGKILLs itself just before its k-th change to a
filesystem from the start of the last step on, syncfs, writes and fsyncs included), then the
next store operation (``image ls``, a reader). After it the store must hold A untouched and
B either whole (every blob's sha256 and every layer's files verify, ``image ls`` lists it,
its layers mount to B's tree, the tags are the pull's) or not at all (the tags as before);
no layer or blob that no record names, nothing in ``tmp/``; and a retried pull must complete
and leave no download behind. The sweep ends at the first k the pull survives.

The first state past the point of no return (the intent written, nothing renamed yet) is the
one whose recovery does the most: recovery is swept the same way there
(``LAYERFS_STORE_CRASH_AT=recover:m`` on the ``image ls`` that finishes it), each crash
followed by another ``image ls``, which must finish what the killed one left.

The pull is a real one against a local registry, so the sweep covers what a pull adds to an
import's last step (deleting the downloads it consumed). That the hook's crash points are
every change the step makes is checked against strace: the pull makes exactly as many
mutating syscalls from its ``syncfs`` on as the sweep found crash points."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.mounts import mount_kernel

from layerfs.store.pull import pull
from layerfs.store.store import INTENT, ImageRecord, Store
from store.ocitools import E, snapshot, write_image
from store.registry_env import LocalRegistry, local_registry, registry_binary

pytestmark = [pytest.mark.external, pytest.mark.kernel_overlay]

CLI = [sys.executable, "-m", "layerfs.store.cli"]
MAX_POINTS = 80  # the last step makes ~30 changes here; a sweep past this is a runaway
PARALLEL = 2

BASE = [E("etc", "d"), E("etc/os-release", data=b"ID=crash\n"), E("usr/big", data=b"x" * 70000)]


@dataclass
class World:
    reg: LocalRegistry
    template: Path  # a store holding A, tagged A's name and "moving"
    template_ab: Path  # the same after B's pull: B tagged B's name and "moving"
    ref_a: str
    ref_b: str
    digest_a: str
    digest_b: str
    tree_b: dict[str, tuple[object, ...]]
    before_tags: dict[str, str]
    after_tags: dict[str, str]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    missing = [t for t in ("skopeo",) if shutil.which(t) is None]
    if registry_binary() is None:
        missing.append("docker-registry")
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian packages)")
    tmp = tmp_path_factory.mktemp("crash")
    with local_registry(tmp / "reg") as reg:
        for name, top in (("a", b"image a\n"), ("b", b"image b\n")):
            write_image(tmp / name, [BASE, [E("etc/which", data=top)]], tag=name)
            reg.skopeo_copy(f"oci:{tmp / name}:{name}", f"crash/{name}:1")
        ref_a, ref_b = f"{reg.host}/crash/a:1", f"{reg.host}/crash/b:1"
        template = tmp / "template"
        rec_a = pull(Store(str(template)), ref_a, tags=(ref_a, "moving"))
        # B's tree as a pull into an empty store gives it.
        clean = Store(str(tmp / "clean"))
        rec_b = pull(clean, ref_b)
        mnt = tmp / "mnt"
        mnt.mkdir()
        with mount_kernel(clean.lowers(ref_b), None, None, mnt):
            tree_b = snapshot(mnt)
        template_ab = tmp / "template-ab"
        subprocess.run(["cp", "-a", str(template), str(template_ab)], check=True)
        pull(Store(str(template_ab)), ref_b, tags=(ref_b, "moving"))
        before = {ref_a: rec_a.manifest_digest, "moving": rec_a.manifest_digest}
        after = {**before, ref_b: rec_b.manifest_digest, "moving": rec_b.manifest_digest}
        yield World(
            reg, template, template_ab, ref_a, ref_b, rec_a.manifest_digest, rec_b.manifest_digest,
            tree_b, before, after,
        )  # fmt: skip


def _pull_cmd(w: World, root: Path) -> list[str]:
    return [*CLI, "image", "pull", "--store", str(root), "--tag", w.ref_b, "--tag", "moving",
            w.ref_b]  # fmt: skip


def _run(cmd: list[str], crash: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("LAYERFS_STORE_CRASH_AT", None)
    if crash is not None:
        env["LAYERFS_STORE_CRASH_AT"] = crash
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def _ls(root: Path, crash: str | None = None) -> subprocess.CompletedProcess[str]:
    return _run([*CLI, "image", "ls", "--json", "--store", str(root)], crash)


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _pending(root: Path) -> bool:
    tmp = root / "tmp"
    return tmp.is_dir() and any((d / INTENT).exists() for d in tmp.iterdir())


def _check(
    w: World,
    root: Path,
    listed: list[dict[str, object]],
    mnt: Path,
    tags_without_b: dict[str, str] | None = None,
) -> str:
    """The store after a crash and the next operation: A intact, B whole or absent, nothing
    unreferenced, nothing in tmp/. Returns "after" (B there) or "before". The tags are the
    pull's with B, and as before the pull without it (``tags_without_b``: those)."""
    store = Store(str(root))
    records = {r.manifest_digest: r for r in store.images()}
    state = "after" if w.digest_b in records else "before"
    assert set(records) == {w.digest_a} | ({w.digest_b} if state == "after" else set())
    without_b = w.before_tags if tags_without_b is None else tags_without_b
    assert store.tags() == (w.after_tags if state == "after" else without_b)
    assert sorted(str(r["digest"]) for r in listed) == sorted(records)  # image ls shows it
    assert list((root / "tmp").iterdir()) == []
    # No half-written record or tags file either (a crash between its open and its rename).
    assert {p.name for p in (root / "images").iterdir()} == {d[7:] + ".json" for d in records}
    assert not [p.name for p in root.iterdir() if ".tmp-" in p.name]
    used_layers, used_blobs = set(), set()
    for rec in records.values():
        _check_image(store, rec)
        used_layers.update(d[7:] for d in rec.diff_ids)
        used_blobs.update(x.digest[7:] for x in rec.layers)
        used_blobs.update((rec.manifest_digest[7:], rec.config_digest[7:]))
    assert {p.name for p in (root / "layers").iterdir()} == used_layers
    assert {p.name for p in (root / "blobs/sha256").iterdir()} == used_blobs
    if state == "after":
        with mount_kernel(store.lowers(w.ref_b), None, None, mnt):
            assert snapshot(mnt) == w.tree_b
    return state


def _check_image(store: Store, rec: ImageRecord) -> None:
    for digest in (rec.manifest_digest, rec.config_digest, *(x.digest for x in rec.layers)):
        assert _sha256(Path(store.blob_path(digest))) == digest
    assert store.verify(rec.manifest_digest) == {d: [] for d in rec.diff_ids}


def _retry_and_check(w: World, root: Path, mnt: Path) -> None:
    """A retried pull (in this process: the CLI's path is the crashed run's) completes."""
    store = Store(str(root))
    pull(store, w.ref_b, tags=(w.ref_b, "moving"))
    listed = [{"digest": r.manifest_digest} for r in store.require().images()]
    assert _check(w, root, listed, mnt) == "after"
    downloads = root / "downloads"
    assert all(p.name.endswith(".lock") for p in downloads.iterdir()), list(downloads.iterdir())


@dataclass
class Sweep:
    w: World
    tmp: Path
    states: dict[int, str] = field(default_factory=dict)
    pending: dict[int, bool] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fresh(self, name: str, template: Path | None = None) -> tuple[Path, Path]:
        root = self.tmp / name / "store"
        root.parent.mkdir()
        # cp -a: the template's layers hold what shutil.copytree would not copy faithfully.
        subprocess.run(["cp", "-a", str(template or self.w.template), str(root)], check=True)
        mnt = self.tmp / name / "mnt"
        mnt.mkdir()
        return root, mnt

    def point(self, k: int) -> bool:
        """Crash the pull at k, check; True when the pull survived (the sweep's end)."""
        root, mnt = self.fresh(f"k{k}")
        r = _run(_pull_cmd(self.w, root), crash=str(k))
        survived = r.returncode == 0
        assert survived or r.returncode == -signal.SIGKILL, (k, r.returncode, r.stderr)
        pending = _pending(root)
        ls = _ls(root)
        assert ls.returncode == 0, ls.stderr
        state = _check(self.w, root, json.loads(ls.stdout), mnt)
        if survived:
            assert state == "after"
        _retry_and_check(self.w, root, mnt)
        with self.lock:
            self.states[k], self.pending[k] = state, pending
        return survived

    def crashed(self, k: int) -> Path:
        """A store as the pull crashed at k leaves it (copied for each recovery point)."""
        root, _ = self.fresh(f"crashed{k}")
        r = _run(_pull_cmd(self.w, root), crash=str(k))
        assert r.returncode == -signal.SIGKILL and _pending(root), r.stderr
        return root

    def recovery_point(self, crashed: Path, m: int) -> bool:
        """The recovery (a reader's) of a crashed pull's store killed at m: the next reader
        must finish it. True when the recovery survived."""
        root, mnt = self.fresh(f"{crashed.parent.name}-r{m}", crashed)
        ls = _ls(root, crash=f"recover:{m}")
        survived = ls.returncode == 0
        if not survived:
            assert ls.returncode == -signal.SIGKILL, ls.stderr
            ls = _ls(root)
            assert ls.returncode == 0, ls.stderr
        assert _check(self.w, root, json.loads(ls.stdout), mnt) == "after"
        return survived


def _until_survived(pool: ThreadPoolExecutor, point: Callable[[int], bool]) -> int:
    """Run ``point(1)``, ``point(2)``, ... PARALLEL at a time; the first n that survived."""
    k = 1
    while True:
        assert k <= MAX_POINTS, "the process never survived: runaway sweep"
        batch = list(range(k, k + PARALLEL))
        ends = [n for n, survived in zip(batch, pool.map(point, batch), strict=True) if survived]
        if ends:
            return ends[0]
        k += PARALLEL


def test_crash_at_every_point_of_the_last_step(world: World, tmp_path: Path) -> None:
    sweep = Sweep(world, tmp_path)
    with ThreadPoolExecutor(PARALLEL) as pool:
        end = _until_survived(pool, sweep.point)
        points = [n for n in sorted(sweep.states) if n < end]
        seen = [sweep.states[n] for n in points]
        print(f"{len(points)} crash points: {seen}")
        # Before the intent nothing is in the store; from it on, the next operation finishes it.
        assert seen == sorted(seen, key=["before", "after"].index)
        assert "before" in seen and "after" in seen
        assert all(sweep.states[n] == "after" for n in points if sweep.pending[n])
        assert _strace_changes(sweep) == len(points)
        # Recovery from the first state past the intent (nothing renamed yet): the most to do.
        first = next(n for n in points if sweep.pending[n])
        end = _until_survived(pool, functools.partial(sweep.recovery_point, sweep.crashed(first)))
    print(f"recovery from crash point {first}: {end - 1} crash points")
    assert end > 1


_CHANGE_CALLS = (
    "syncfs,fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat,rmdir,mkdir,mkdirat,"
    "link,linkat,symlink,symlinkat,chmod,fchmod,fchmodat,chown,fchown,fchownat,lchown,"
    "truncate,ftruncate,setxattr,fsetxattr,lsetxattr,removexattr,fremovexattr,lremovexattr,"
    "utimensat,fallocate,mknod,mknodat"
)
_WRITES = "write,pwrite64,writev,pwritev,pwritev2,copy_file_range,sendfile"
_OPENS = "open,openat,openat2,creat"


def _strace_changes(sweep: Sweep) -> int:
    """The pull's mutating syscalls (writes to files, not to its pipes; opens that may
    write) from its syncfs, the last step's first change, to its exit, by strace."""
    if shutil.which("strace") is None:
        pytest.skip("needs strace")
    root, _ = sweep.fresh("strace")
    out = root.parent / "strace.out"
    calls = f"{_CHANGE_CALLS},{_WRITES},{_OPENS}"
    r = _run(["strace", "-f", "-qq", "-y", "-e", f"trace={calls}", "-o", str(out),
              *_pull_cmd(sweep.w, root)])  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in out.read_text().splitlines() if "resumed>" not in ln]
    start = next(i for i, ln in enumerate(lines) if " syncfs(" in ln)

    def any_of(names: str) -> str:
        return "(?:" + names.replace(",", "|") + ")"

    write = re.compile(rf" {any_of(_WRITES)}\(\d+<([^>]*)>")
    opened = re.compile(rf" {any_of(_OPENS)}\(.*O_(?:WRONLY|RDWR|CREAT|TRUNC|APPEND)")
    changes = re.compile(rf" {any_of(_CHANGE_CALLS)}\(")
    n = 0
    for ln in lines[start:]:
        if (m := write.search(ln)) is not None:
            n += m.group(1).startswith("/") and not m.group(1).startswith("/dev/")
        elif opened.search(ln) or changes.search(ln):
            n += 1
    return n


def test_crash_at_every_point_of_an_image_rm(world: World, tmp_path: Path) -> None:
    """``image rm`` of B (by digest: all its tags go) killed at each of its changes: after the
    next ``image ls``, B is whole with its tags, or gone with its tags and the layer and blobs
    only it named, A untouched; a second ``rm`` of a B still there completes."""
    w = world
    only_a = {w.ref_a: w.digest_a}
    states: dict[int, str] = {}

    def point(k: int) -> bool:
        root = tmp_path / f"rm{k}" / "store"
        root.parent.mkdir()
        subprocess.run(["cp", "-a", str(w.template_ab), str(root)], check=True)
        mnt = root.parent / "mnt"
        mnt.mkdir()
        rm = [*CLI, "image", "rm", "--store", str(root), w.digest_b]
        r = _run(rm, crash=f"remove:{k}")
        assert r.returncode in (0, -signal.SIGKILL), (k, r.returncode, r.stderr)
        ls = _ls(root)
        assert ls.returncode == 0, ls.stderr
        states[k] = _check(w, root, json.loads(ls.stdout), mnt, only_a)
        if states[k] == "after":
            Store(str(root)).remove(w.digest_b)
            listed = [{"digest": r.manifest_digest} for r in Store(str(root)).images()]
            assert _check(w, root, listed, mnt, only_a) == "before"
        return r.returncode == 0

    with ThreadPoolExecutor(PARALLEL) as pool:
        end = _until_survived(pool, point)
    seen = [states[n] for n in range(1, end)]
    print(f"image rm: {len(seen)} crash points: {seen}")
    assert states[end] == "before"  # the rm that survived removed B
    assert seen == sorted(seen, key=["after", "before"].index)
    assert "after" in seen and "before" in seen
