"""Differential harness: one spec, two identical stacks, the subject and the kernel side by side."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .layerspec import DEFAULT_MTIME_NS, LayerSpec, StackOptions
from .mounts import SUBJECTS, Layout, Mounted, Subject
from .snapshot import assert_same, inode_problems, private_xattr_leaks, snapshot

SUBJECT_QUIRKS = {name: sub.quirks for name, sub in SUBJECTS.items()}


@dataclass
class Pair:
    """The subject's and the kernel's copies of one stack."""

    subject: Subject
    subj: Layout
    ref: Layout

    @classmethod
    def create(cls, tmp: Path, subject: Subject, spec: LayerSpec, *, upper: bool = True) -> Pair:
        root = Path(tempfile.mkdtemp(dir=tmp, prefix="pair-"))
        subj = Layout.create(root / "s", len(spec.layers), upper=upper)
        ref = Layout.create(root / "k", len(spec.layers), upper=upper)
        if subject.userns:  # rootless: the layers carry user.overlay.* markers only
            spec = spec.user_namespace_form()
        spec.materialize(subj.lowers)
        spec.to_kernel_form("user" if subject.userns else "trusted").materialize(ref.lowers)
        for layout in (subj, ref):
            if layout.upper is not None:
                # The upper root is what both mounts show as the root: same mtime for both.
                os.utime(layout.upper, ns=(DEFAULT_MTIME_NS, DEFAULT_MTIME_NS))
        return cls(subject, subj, ref)

    @contextlib.contextmanager
    def mounted(self) -> Iterator[tuple[Mounted, Mounted]]:
        with self.ref.mount(self.subject.kernel) as k, self.subj.mount(self.subject) as s:
            yield s, k


def check_merged(s: Mounted, k: Mounted, *, since_ns: int | None = None, what: str = "") -> None:
    """Compare the subject's merged tree with the kernel's, plus in-mount inode checks."""
    ref, got = snapshot(k.mnt), snapshot(s.mnt)
    problems = inode_problems(s.mnt) + private_xattr_leaks(got)
    assert not problems, f"{what}: " + "\n".join(problems)
    assert_same(ref, got, since_ns=since_ns, ignore=ignored_fields(s), what=what or s.name)


MISSING = b"missing\x01name"  # in no layer: a directory's first lookup fails


def _probe(path: bytes, ignore: frozenset[str]) -> tuple[int, int, int | None] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    is_dir = stat.S_ISDIR(st.st_mode)
    nlink = -1 if ("dir_nlink" if is_dir else "file_nlink") in ignore else st.st_nlink
    return st.st_mode, nlink, None if is_dir else st.st_size


def _real_listing(layer: Path, rel: bytes) -> list[bytes]:
    """The names in directory REL of LAYER, walked without following a symlink; none where
    REL is not a directory there."""
    fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in rel.split(b"/") if rel else []:
            try:
                sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:
                return []
            os.close(fd)
            fd = sub
        return [os.fsencode(n) for n in os.listdir(fd)]
    finally:
        os.close(fd)


def check_lookups(pair: Pair, s: Mounted, k: Mounted, *, what: str = "") -> None:
    """Look up, in every directory and before anything else looks there, first a name that
    exists nowhere, then every name any lower layer holds there (whited-out, hidden below an
    opaque directory or a file, ``.wh.`` markers and the names they hide) and every merged
    entry: each the first LOOKUP of its name, compared with the kernel's (kind, mode, links,
    size). A directory where a name was missing is answered through the lowers' index
    (lookup.resolve, Node.missed), the others by asking each layer: the names met here go
    through the index, with the readdir-driven walks of check_merged the other way."""
    problems: list[str] = []
    ignore = ignored_fields(s)
    todo: list[bytes] = [b""]
    while todo:
        rel = todo.pop()
        names = {MISSING}
        for lower in pair.subj.lowers:
            for name in _real_listing(lower, rel):
                names.add(name)
                if name.startswith(b".wh.") and name != b".wh..wh..opq":
                    names.add(name[4:])
        kdir = os.path.join(os.fsencode(k.mnt), rel)
        names.update(os.listdir(kdir))
        # the miss first: it decides how the directory's next lookups are answered
        for name in sorted(names, key=lambda n: n != MISSING):
            got = _probe(os.path.join(os.fsencode(s.mnt), rel, name), ignore)
            want = _probe(os.path.join(kdir, name), ignore)
            if got != want:
                problems.append(f"{os.path.join(rel, name)!r}: lookup {got} != kernel {want}")
            elif want is not None and stat.S_ISDIR(want[0]):
                todo.append(os.path.join(rel, name))
    assert not problems, f"{what}: " + "\n".join(problems)


def ignored_fields(s: Mounted | Subject) -> frozenset[str]:
    """Snapshot fields not compared for a subject: only its known, documented quirks."""
    quirks = s.quirks if isinstance(s, Subject) else SUBJECT_QUIRKS.get(s.name, frozenset())
    table = {
        "dir-nlink": "dir_nlink",
        "hidden-hardlink-nlink": "file_nlink",
        "copyup-parent-mtime": "dir_mtime",
        "userxattr-link-ino": "links",
    }
    return frozenset(field for quirk, field in table.items() if quirk in quirks)


def expect_quirks(request: pytest.FixtureRequest, subject: Subject, needs: Iterable[str]) -> None:
    """Mark the test a strict xfail when the subject has a known quirk the scenario needs."""
    hit = sorted(set(needs) & subject.quirks)
    if hit:
        request.node.add_marker(
            pytest.mark.xfail(strict=True, reason=f"{subject.name} known difference: {hit}")
        )


def stack_options_for(subject: Subject, **kw: object) -> StackOptions:
    """Generated-stack options that avoid the subject's known quirks."""
    base = StackOptions(**kw)  # type: ignore[arg-type]
    # Exploration aid: LAYERFS_STACK_AVOID=whiteout:xattr,... treats these features as quirks.
    avoid = frozenset(filter(None, os.environ.get("LAYERFS_STACK_AVOID", "").split(",")))
    subject = dataclasses.replace(subject, quirks=subject.quirks | avoid)
    return StackOptions(
        whiteouts=tuple(
            w
            for w in base.whiteouts
            if f"whiteout:{w}" not in subject.quirks
            # random stacks may put an xattr whiteout in an opaque dir: the ghost case
            and not (w in ("xattr", "user_xattr") and "xwhiteout-ghost" in subject.quirks)
        ),
        opaques=tuple(o for o in base.opaques if f"opaque:{o}" not in subject.quirks),
        hardlinks=base.hardlinks and "hardlink-copyup" not in subject.quirks,
        specials=base.specials and "device-copyup" not in subject.quirks,
        odd_names=base.odd_names,
        xattrs=base.xattrs,
        acls=base.acls and "acl-inherit" not in subject.quirks,
        setgid_dirs=base.setgid_dirs and "setgid-inherit" not in subject.quirks,
        setid_files=base.setid_files and "copyup-suid" not in subject.quirks,
        min_layers=base.min_layers,
        max_layers=base.max_layers,
    )


def explore_only_layerfs(subject: Subject) -> None:
    """Random exploration is for layerfs. On the stand-in it keeps finding the stand-in's own
    bugs (its known ones are xfailed in the scripted scenarios), which says nothing about
    layerfs and would make CI red by chance: run it with LAYERFS_EXPLORE_STANDIN=1."""
    if not subject.name.startswith("layerfs") and not os.environ.get("LAYERFS_EXPLORE_STANDIN"):
        pytest.skip(f"random exploration of {subject.name}: set LAYERFS_EXPLORE_STANDIN=1")
