"""kill -9 at every crash point of a random operation sequence over a random stack.

test_crash_points crashes one hand-picked operation on a one-layer stack, each in a daemon of
its own. Here hypothesis draws the stack (2-4 layers with whiteouts of every dialect, opaque
directories, hard links: support.layerspec) and 2-4 operations run one after the other in one
daemon, so that a crash also lands where one operation left the daemon's state for the next
(a MKNOD's descriptor kept for the first WRITE, a node copied up a moment before, a redirect
set by the previous rename). For k = 1, 2, ...: a fresh upper, a layerfs daemon told to
SIGKILL itself before its k-th change (``LAYERFS_CRASH_AT``), the sequence until the daemon
dies, then a layerfs remount and kernel overlayfs on the same upper: both must show one of the
trees kernel overlayfs shows at the start, the end or a step of the operation the crash cut
(its steps: the copy-up, which parts a lower hard link's names; a create is an empty file,
then its data; an ``O_TRUNC`` open a truncation, then its data), never anything else. The
sweep ends at the first k the daemon survives: that run must show the kernel's tree after the
whole sequence.

Also drawn: the daemon's ``fsync=`` (auto, strict, volatile: a daemon's crash loses nothing
in any), writes of one file after its first (the compiled raw path's WRITE, Files.write_now;
a user's, clearing a setuid bit there), listings, and upper directories another tool wrote
(no origin), whose first lookup under a cached listing has the raw path defer its reply
(its fix_origin's changes are crash points then).

LAYERFS_CRASH_SEQ_EXAMPLES (default 2) and LAYERFS_CRASH_SEQ_OPS (default 4, the longest
sequence) set its budget for a longer hunt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.diff import Pair, stack_options_for
from support.layerspec import Dir, LayerSpec, layer_stacks
from support.mounts import SUBJECTS, mount_kernel
from support.ops import RENAME_EXCHANGE, RENAME_NOREPLACE, Op, apply
from support.snapshot import Snapshot, compare, fs_clock_ns, snapshot

from ._helpers import layerfs_daemon, needs_root
from .test_crash_points import IGNORE, MAX_POINTS, PARALLEL, Verdicts, _disk_state

pytestmark = [pytest.mark.fuse, pytest.mark.kernel_overlay, pytest.mark.slow, needs_root]

EXAMPLES = int(os.environ.get("LAYERFS_CRASH_SEQ_EXAMPLES", "2"))
MAX_OPS = int(os.environ.get("LAYERFS_CRASH_SEQ_OPS", "4"))
# what a process sees when the daemon dies under it (see _workload.CRASH_ERRORS)
CRASH_ERRORS = {"ENOTCONN", "ECONNABORTED", "EIO"}

_NAMES = [b"a", b"b", b"c", b"d", b"e"]
_data = st.sampled_from([b"x", b"hello\n", b"y" * 70_000])


def _layer_paths(spec: LayerSpec) -> list[bytes]:
    """The names of SPEC's layers down to depth 2 (hard links' ``hl-*`` too): uniform draws
    from a..e named nothing that exists in most operations, which then changed nothing."""
    out: set[bytes] = set()
    for layer in spec.layers:
        for name, node in layer.entries.items():
            out.add(name)
            if isinstance(node, Dir):
                out.update(name + b"/" + sub for sub in node.entries)
    return sorted(p for p in out if not p.rpartition(b"/")[2].startswith(b".wh."))


def _paths(spec: LayerSpec) -> st.SearchStrategy[bytes]:
    uniform = st.lists(st.sampled_from(_NAMES), min_size=1, max_size=2).map(b"/".join)
    existing = _layer_paths(spec)
    return st.one_of(uniform, st.sampled_from(existing)) if existing else uniform


_offsets = st.sampled_from([0, 3, 9000])


def _write_op(p: st.SearchStrategy[bytes]) -> st.SearchStrategy[Op]:
    return st.tuples(st.just("write"), p, _offsets, _data)


def _sequence(spec: LayerSpec) -> st.SearchStrategy[list[Op]]:
    """One operation, or writes of one file: the WRITEs after the first, on a file already
    up, are the compiled raw path's (``Files.write_now``)."""
    writes = st.lists(st.tuples(_offsets, _data), min_size=2, max_size=3)
    return st.one_of(
        _ops(spec).map(lambda op: [op]),
        st.builds(lambda p, ws: [("write", p, *w) for w in ws], _paths(spec), writes),
    )


def _ops(spec: LayerSpec) -> st.SearchStrategy[Op]:
    p = _paths(spec)
    existing = _layer_paths(spec)
    dirs = st.sampled_from(sorted({b"", *(x.rpartition(b"/")[0] for x in existing)}))
    return st.one_of(
        # a listing the kernel then caches: a later change in that directory (a copy-up
        # marking it impure, an origin fixed) has the raw path defer its reply until the
        # listing is dropped (fusehooks._Replies.defer)
        st.tuples(st.just("listdir"), dirs),
        # a user's write (to a setuid file: chmod 0o4777 below) clears the bit in the write
        st.tuples(st.just("as_user"), st.just(1000), st.just(1000), _write_op(p)),
        st.tuples(st.just("create"), p, st.sampled_from([b"", b"new\n", b"z" * 70_000])),
        _write_op(p),
        st.tuples(st.just("append"), p, _data),
        st.tuples(st.just("open_trunc"), p, st.sampled_from([b"", b"t"])),
        st.tuples(st.just("truncate"), p, st.sampled_from([0, 2, 70_000])),
        st.tuples(st.just("chmod"), p, st.sampled_from([0o600, 0o4755, 0o4777])),
        st.tuples(st.just("chown"), p, st.just(1000), st.just(1000)),
        st.tuples(st.just("setxattr"), p, st.just(b"user.crash"), st.just(b"v")),
        st.tuples(st.just("removexattr"), p, st.sampled_from([b"user.a", b"trusted.t"])),
        st.tuples(st.just("unlink"), p),
        st.tuples(st.just("rmdir"), p),
        st.tuples(st.just("mkdir"), p),
        st.tuples(st.just("mkfifo"), p),
        st.tuples(st.just("symlink"), st.just(b"t"), p),
        st.tuples(st.just("link"), p, p),
        st.tuples(
            st.just("rename"), p, p, st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE])
        ),
    )


# operations that change a file's size or data (and fill a metacopy file's, metacopy=on)
_FILLS = {"write", "append", "open_trunc", "truncate"}

# operations that copy their first path up before they change it (rename and link: the
# source; an exchange: both)
_COPY_FIRST = {"write", "append", "open_trunc", "truncate", "chmod", "chown", "setxattr"}
_COPY_FIRST |= {"removexattr", "rename", "link"}


def _inner(op: Op) -> Op:
    """The operation itself, run by whoever runs it."""
    return op[3] if op[0] == "as_user" else op  # type: ignore[return-value]


def _steps(op: Op) -> list[Op]:
    """OP as the steps whose trees a crash may leave: a create of data is the empty file
    first (its WRITE comes after the MKNOD), an O_TRUNC open with data the truncation first."""
    if op[0] == "create" and op[2]:
        return [("create", op[1], b""), ("write", op[1], 0, op[2])]
    if op[0] == "open_trunc" and op[2]:
        return [("truncate", op[1], 0), ("write", op[1], 0, op[2])]
    return [op]


def _copied_up(tree: Snapshot, op: Op, upper: Path) -> list[Snapshot]:
    """The trees after OP's copy-up and before its change: they differ from TREE only where
    the copy of a lower hard link's name (one not in UPPER yet) parts it from the other
    names, visible or hidden (index=off: its own inode, nlink 1; the others keep the
    lower's)."""
    op = _inner(op)
    if op[0] not in _COPY_FIRST:
        return []
    copied = [op[1], op[2]] if op[0] == "rename" and op[3] == RENAME_EXCHANGE else [op[1]]
    out = []
    for n in range(1, len(copied) + 1):
        t = Snapshot(dict(tree.entries), list(tree.links))
        for p in copied[:n]:
            assert isinstance(p, bytes)
            e = t.entries.get(p)
            if e is None or e.kind == "dir" or e.nlink < 2:
                continue
            if os.path.lexists(upper / os.fsdecode(p)):
                continue  # an upper hard link: no copy-up
            t.entries[p] = dataclasses.replace(e, nlink=1)
            group = next((g for g in t.links if p in g), None)
            if group is not None:
                t.links.remove(group)
                if len(group) > 2:
                    t.links.append(group - {p})
        if t.entries != tree.entries:
            out.append(t)
    return out


def _cap_dropped(tree: Snapshot, p: object) -> Snapshot | None:
    """TREE with P's security.capability gone, if it has one: a change of size or data
    removes it first, a change of its own (security_inode_killpriv before the setattr,
    file_remove_privs before the write: the kernel's calls on its upper too); a metacopy
    file's data filled in place drops it, and it is set again after
    (ovl_copy_up_meta_inode_data)."""
    if not isinstance(p, bytes):
        return None
    e = tree.entries.get(p)
    cap = b"security.capability"
    if e is None or not any(x[0] == cap for x in e.xattrs):
        return None
    t = Snapshot(dict(tree.entries), list(tree.links))
    t.entries[p] = dataclasses.replace(e, xattrs=tuple(x for x in e.xattrs if x[0] != cap))
    return t


@dataclass
class Reference:
    """The kernel's trees: at the start of each operation, and after each of its steps."""

    start: list[Snapshot] = field(default_factory=list)
    steps: list[list[Snapshot]] = field(default_factory=list)
    end: Snapshot | None = None

    def allowed(self, i: int) -> list[Snapshot]:
        """The trees a crash within operation I may leave (I past the last: in the walk of
        the end's tree, whose lookups may record origins: ovl_fix_origin)."""
        if i == len(self.start):
            return [self.end] if self.end else []
        return [self.start[i], *self.steps[i]]


def _lower_dirs(spec: LayerSpec) -> list[bytes]:
    """The directories of SPEC's layers down to depth 2."""
    out: set[bytes] = set()
    for layer in spec.layers:
        for name, node in layer.entries.items():
            if isinstance(node, Dir):
                out.add(name)
                out.update(name + b"/" + s for s, n in node.entries.items() if isinstance(n, Dir))
    return sorted(p for p in out if b".wh." not in p)


def _make_dirs(upper: Path, dirs: Sequence[bytes]) -> None:
    """Upper directories with no xattrs over lower ones (an upper another tool wrote): the
    first lookup of each records its origin and marks its parent impure (ovl_fix_origin),
    and a listing of that parent the kernel cached must go first: the compiled raw path's
    LOOKUP defers its reply until it has (fusehooks._Replies.defer)."""
    for d in dirs:
        os.makedirs(os.fsencode(upper) + b"/" + d, exist_ok=True)


def _reference(
    pair: Pair, ops: Sequence[Op], options: Sequence[str], upper_dirs: Sequence[bytes] = ()
) -> Reference:
    ref = Reference()
    k = pair.ref
    assert k.upper and k.work
    _make_dirs(k.upper, upper_dirs)
    with mount_kernel(k.lowers, k.upper, k.work, k.mnt, options=options):
        for op in ops:
            start = snapshot(k.mnt)
            ref.start.append(start)
            copies = _copied_up(start, op, k.upper)  # before the step copies up
            if _inner(op)[0] in _FILLS:
                fill = _inner(op)[1]
                copies += [t for t in (_cap_dropped(t, fill) for t in [start, *copies]) if t]
            trees = []
            for n, step in enumerate(_steps(op)):
                if apply(k.mnt, step)[0] != "ok":
                    break  # the operation fails here, on both
                if n == 0:
                    trees += copies
                trees.append(snapshot(k.mnt))
            ref.steps.append(trees)
        ref.end = snapshot(k.mnt)
    return ref


@dataclass
class Sweep:
    pair: Pair
    ops: Sequence[Op]
    ref: Reference
    options: tuple[str, ...]
    since_ns: int
    tmp: Path
    fsync: str = "auto"  # the daemon's fsync= (the kernel's trees are the same in each)
    upper_dirs: Sequence[bytes] = ()  # in the upper at the start (_make_dirs)
    verdicts: Verdicts = field(default_factory=Verdicts)
    log: list[str] = field(default_factory=list)

    def match(
        self, snap: Snapshot, allowed: list[Snapshot], *, fill: bool = False
    ) -> tuple[int, list[str]]:
        """Which of ALLOWED SNAP is (its index), or -1 and the differences from each. FILL:
        the operation fills a metacopy file's data in place, whose mtime the writes move
        until it is set back: the mtimes of the trees before its end are not compared
        (test_crash_points' mtime_may_move)."""
        diffs: list[str] = []
        for n, tree in enumerate(allowed):
            ignore = IGNORE | {"file_mtime"} if fill and n < len(allowed) - 1 else IGNORE
            d = compare(tree, snap, ignore=ignore, since_ns=self.since_ns)
            if not d:
                return n, []
            diffs += [f"vs allowed tree {n}:", *d]
        return -1, diffs

    def point(self, k: int) -> str | None:
        """Crash before change K; None when the daemon made fewer changes than K."""
        run = Path(tempfile.mkdtemp(dir=self.tmp, prefix=f"k{k}-"))
        upper, work, mnt = run / "upper", run / "work", run / "mnt"
        for p in (upper, work, mnt):
            p.mkdir()
        _make_dirs(upper, self.upper_dirs)
        lowers = self.pair.subj.lowers
        env = {"LAYERFS_CRASH_AT": str(k)}
        cut = -1
        daemon_options = (*self.options, f"fsync={self.fsync}")
        with layerfs_daemon(lowers, upper, work, mnt, options=daemon_options, env=env) as d:
            for i, op in enumerate(self.ops):
                r = apply(mnt, op)
                if r[0] == "err" and r[1] in CRASH_ERRORS:
                    # an EIO from a live daemon is an answer: it does not die then
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        d.proc.wait(timeout=20 if r[1] != "EIO" else 2)
                if not d.alive():
                    cut = i
                    break
            if cut < 0:
                try:
                    n, diffs = self.match(snapshot(mnt), self.ref.allowed(len(self.ops)))
                    assert n == 0, "the complete run:\n" + "\n".join(diffs)
                except OSError as e:
                    if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
                        raise
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        d.proc.wait(timeout=20)
                    if d.alive():
                        raise
                    cut = len(self.ops)
            if cut >= 0:
                assert d.proc.returncode == -9, f"daemon exit {d.proc.returncode}:\n{d.log_text()}"
        if cut < 0:
            shutil.rmtree(run)
            return None
        allowed = self.ref.allowed(cut)
        last = self.ops[cut] if cut < len(self.ops) else ("walk of the end",)
        fill = "metacopy=on" in self.options and _inner(last)[0] in _FILLS
        what = f"crash before change {k}, in operation {cut} {last!r}"

        def verify() -> str:
            with layerfs_daemon(lowers, upper, work, mnt, options=daemon_options):
                assert os.listdir(work / "work") == [], "the remount must clean the workdir"
                n, diffs = self.match(snapshot(mnt), allowed, fill=fill)
            assert n >= 0, f"{what}, layerfs remount:\n" + "\n".join(diffs)
            with mount_kernel(self.pair.ref.lowers, upper, work, mnt, options=self.options):
                kn, kdiffs = self.match(snapshot(mnt), allowed, fill=fill)
            assert kn == n, (
                f"{what}: layerfs shows allowed tree {n}, kernel overlayfs on the same upper "
                f"{kn}:\n" + "\n".join(kdiffs)
            )
            return f"op{cut}:{n}"

        state = self.verdicts.once((cut, _disk_state(run)), verify)
        shutil.rmtree(run)
        return state


@pytest.mark.parametrize("subject_name", ["layerfs", "layerfs-metacopy"])
def test_crash_at_every_point_of_a_sequence(tmp_path: Path, subject_name: str) -> None:
    subject = SUBJECTS[subject_name]
    opts = stack_options_for(subject, odd_names=False)

    @settings(max_examples=EXAMPLES)
    @given(spec=layer_stacks(opts), data=st.data())
    def run(spec: LayerSpec, data: st.DataObject) -> None:
        seqs = data.draw(st.lists(_sequence(spec), min_size=2, max_size=MAX_OPS), label="ops")
        ops = [op for seq in seqs for op in seq]
        fsync = data.draw(st.sampled_from(["auto", "strict", "volatile"]), label="fsync")
        dirs = _lower_dirs(spec)
        upper_dirs = data.draw(
            st.one_of(
                st.just([]), st.lists(st.sampled_from(dirs), min_size=1, max_size=3, unique=True)
            )
            if dirs
            else st.just([]),
            label="upper_dirs",
        )
        work = Path(tempfile.mkdtemp(dir=tmp_path))
        try:
            pair = Pair.create(work, subject, spec)
            since_ns = fs_clock_ns()
            ref = _reference(pair, ops, subject.kernel_options, upper_dirs)
            sweep = Sweep(pair, ops, ref, subject.kernel_options, since_ns, work, fsync, upper_dirs)
            seen: list[str] = []
            with ThreadPoolExecutor(PARALLEL) as pool:
                for k in range(1, MAX_POINTS * len(ops) + 1, PARALLEL):
                    states = list(pool.map(sweep.point, range(k, k + PARALLEL)))
                    seen += [s for s in states if s is not None]
                    if None in states:
                        break
                else:
                    raise AssertionError(f"still crashing after {MAX_POINTS * len(ops)} changes")
            shown = [tuple(a[:12] if isinstance(a, bytes) else a for a in op) for op in ops]
            states = len(sweep.verdicts.verified)
            print(
                f"fsync={fsync} upper {upper_dirs!r} {shown!r}: {len(seen)} crash points, "
                f"{states} states: {seen}"
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)

    run()
