"""Comparable snapshots of a merged tree, and of an upper directory left on disk.

``snapshot(root)`` walks a tree through ``os.lstat``/``readlink``/``listxattr`` without ever
following a symlink and records, per path (bytes, relative):

- type, permission bits (incl. setuid/setgid/sticky), uid, gid;
- size (not for directories: a merged directory's size is an implementation detail);
- nlink (directories too: the kernel reports 1 for merged directories);
- mtime in ns. Entries a test modified through a mount carry "now", which cannot match across
  two mounts, so ``compare`` skips mtime only when *both* sides are newer than the test's
  start (``since_ns``); a spec's mtimes are far in the past;
- symlink target, content digest (xxh3_128), rdev for devices, all xattrs as listed (so a
  private overlay xattr leaking into the merged view shows up as a difference);
- hard-link groups: paths sharing one st_ino (compared as groups, never as numbers);
- ``ghost`` for a name readdir lists but lstat cannot find (see GHOST).

``inode_problems(root)`` checks st_ino within one mount: stat vs readdir d_ino, names of a
hard link, stability across two walks. st_dev, atime and ctime are never compared.

``upper_snapshot(upper)`` normalises an upper directory: every whiteout dialect becomes
``whiteout``, every opaque marker ``opaque``; every other overlay xattr is kept, ``origin``
as its header and uuid with the handle's length (the two uppers' lowers are different
copies, so their inode numbers differ), except the upper root's random ``uuid``.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import xxhash

PRIVATE_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"user.fuseoverlayfs.")
# What kernel overlayfs writes for its own bookkeeping in an upper (fs/overlayfs/overlayfs.h
# OVL_XATTR_*) is compared across uppers, all but the random uuid of the upper's root.
UPPER_XATTRS_DROPPED = (b"uuid",)
OVL_FB_HEADER = 21  # struct ovl_fb: version, magic, len, flags, type, uuid[16]; then the fid


def _upper_xattr(short: bytes, value: bytes) -> bytes:
    if short == b"origin" and len(value) > OVL_FB_HEADER:
        return value[:OVL_FB_HEADER] + b"+fid[%d]" % (len(value) - OVL_FB_HEADER)
    return value


def digest(data: bytes) -> str:
    h: str = xxhash.xxh3_128_hexdigest(data)
    return h


def file_digest(path: bytes) -> str:
    h = xxhash.xxh3_128()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        total = 0
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
            total += len(chunk)
            if total > MAX_FILE_BYTES:
                raise AssertionError(f"read of {path!r} did not end after {total} bytes")
    finally:
        os.close(fd)
    out: str = h.hexdigest()
    return out


def kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "chr"),
        (stat.S_ISBLK, "blk"),
        (stat.S_ISSOCK, "sock"),
    ):
        if test(mode):
            return name
    return "?"


def read_xattrs(path: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for name in os.listxattr(path, follow_symlinks=False):
        key = os.fsencode(name)
        try:
            out[key] = os.getxattr(path, key, follow_symlinks=False)
        except OSError as e:
            out[key] = f"<{e.__class__.__name__} {e.errno}>".encode()
    return out


@dataclass(frozen=True)
class Entry:
    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None
    nlink: int
    mtime_ns: int
    target: bytes | None = None
    digest: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: tuple[tuple[bytes, bytes], ...] = ()

    def fields(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# Listed by readdir, but lookup says ENOENT. Kernel overlayfs shows this for a whiteout inside a
# directory that exists in one layer only: such a directory is read with the real filesystem's
# readdir, unfiltered (fs/overlayfs/readdir.c, ovl_dir_is_real). A subject need not copy it.
GHOST = Entry("ghost", 0, 0, 0, None, 0, 0)


@dataclass
class Snapshot:
    entries: dict[bytes, Entry] = field(default_factory=dict)
    links: list[frozenset[bytes]] = field(default_factory=list)  # hard-link groups (size > 1)
    inodes: dict[bytes, int] = field(default_factory=dict)  # for in-mount checks only


# Far above any test directory: a readdir stream longer than this never ends (offset bug).
MAX_DIR_ENTRIES = 100_000
MAX_FILE_BYTES = 256 << 20


def list_dir(path: bytes) -> list[os.DirEntry[bytes]]:
    """All entries of one readdir stream, failing instead of looping on an endless stream."""
    out: list[os.DirEntry[bytes]] = []
    with os.scandir(path) as it:
        for e in it:
            out.append(e)
            if len(out) > MAX_DIR_ENTRIES:
                raise AssertionError(f"readdir of {path!r} did not end after {len(out)} entries")
    return out


def _walk(root: bytes, rel: bytes = b"") -> Iterator[tuple[bytes, os.DirEntry[bytes]]]:
    entries = sorted(list_dir(root + (b"/" + rel if rel else b"")), key=lambda e: e.name)
    for e in entries:
        path = rel + b"/" + e.name if rel else e.name
        yield path, e
        if e.is_dir(follow_symlinks=False):
            yield from _walk(root, path)


def walk_entries(root: bytes) -> Iterator[tuple[bytes, os.DirEntry[bytes]]]:
    """(relative path, readdir entry) of everything below ROOT, parents first, sorted."""
    return _walk(root)


def snapshot(root: str | os.PathLike[str] | bytes, *, with_root: bool = True) -> Snapshot:
    """Snapshot the tree below ``root`` (and ``root`` itself as path ``b"."``)."""
    base = os.fsencode(root)
    snap = Snapshot()
    by_ino: dict[int, set[bytes]] = {}
    items: list[tuple[bytes, int | None]] = [(b".", None)] if with_root else []
    items += [(p, e.inode()) for p, e in _walk(base)]
    for rel, _d_ino in items:
        full = base if rel == b"." else base + b"/" + rel
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            snap.entries[rel] = GHOST
            continue
        k = kind(st.st_mode)
        entry = Entry(
            kind=k,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=None if k == "dir" else st.st_size,
            nlink=st.st_nlink,
            mtime_ns=st.st_mtime_ns,
            target=os.readlink(full) if k == "symlink" else None,
            digest=file_digest(full) if k == "file" else None,
            rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if k in ("chr", "blk") else None,
            xattrs=tuple(sorted(read_xattrs(full).items())),
        )
        snap.entries[rel] = entry
        snap.inodes[rel] = st.st_ino
        if k != "dir":
            by_ino.setdefault(st.st_ino, set()).add(rel)
    snap.links = sorted((frozenset(g) for g in by_ino.values() if len(g) > 1), key=sorted)
    return snap


def inode_problems(root: str | os.PathLike[str]) -> list[str]:
    """st_ino checks within one mount: stat == d_ino (a directory's at the second listing, see
    below), hard links share one, stable."""
    base = os.fsencode(root)
    problems: list[str] = []
    first: dict[bytes, int] = {}
    unlooked: dict[bytes, str] = {}  # directories whose d_ino was not st_ino: see below
    for path, e in _walk(base):
        st_ino = os.lstat(base + b"/" + path).st_ino
        if e.inode() != st_ino:
            problem = f"{path!r}: readdir d_ino {e.inode()} != stat st_ino {st_ino}"
            if e.is_dir(follow_symlinks=False):
                unlooked[path] = problem
            else:
                problems.append(problem)
        st_mode = os.lstat(base + b"/" + path).st_mode
        # scandir answers is_dir/is_symlink from d_type when the filesystem fills it in.
        if e.is_dir(follow_symlinks=False) != stat.S_ISDIR(st_mode) or e.is_symlink() != (
            stat.S_ISLNK(st_mode)
        ):
            problems.append(f"{path!r}: readdir d_type disagrees with stat ({kind(st_mode)})")
        first[path] = st_ino
    # A merged upper directory without an origin, listed before its first lookup: a parent
    # not impure lists its upper's own d_ino, the lookup records the origin (ovl_fix_origin),
    # whose inode st_ino shows, and marks the parent impure, so its next listing shows that
    # inode too. Allowed where the second walk's listing agrees; anything else is a problem.
    second: dict[bytes, int] = {}
    for path, e in _walk(base):
        second[path] = os.lstat(base + b"/" + path).st_ino
        if path in unlooked and e.inode() == second[path]:
            del unlooked[path]
    problems += unlooked.values()
    for path, ino in first.items():
        if second.get(path) != ino:
            problems.append(
                f"{path!r}: st_ino changed between two walks {ino} -> {second.get(path)}"
            )
    dirs = {p for p, e in _walk(base) if e.is_dir(follow_symlinks=False)}
    seen: dict[int, bytes] = {}
    for path, ino in first.items():
        if path in dirs and ino in seen:
            problems.append(f"{path!r}: directory shares st_ino {ino} with {seen[ino]!r}")
        seen.setdefault(ino, path)
    return problems


def private_xattr_leaks(snap: Snapshot) -> list[str]:
    return [
        f"{p!r} shows private xattr {k!r}"
        for p, e in snap.entries.items()
        for k, _v in e.xattrs
        if k.startswith(PRIVATE_XATTR_PREFIXES)
    ]


def compare(
    expected: Snapshot,
    actual: Snapshot,
    *,
    since_ns: int | None = None,
    ignore: frozenset[str] = frozenset(),
) -> list[str]:
    """Differences between a reference snapshot and a subject's, one line per field.

    ``since_ns``: mtimes newer than this on both sides were set by the test run and are not
    compared. ``ignore``: field names left out (e.g. ``{"nlink"}``); ``"dir_nlink"``,
    ``"file_nlink"``, ``"dir_mtime"``: for directories / non-directories only; ``"links"``:
    hard-link groups.
    """
    out: list[str] = []
    for path in sorted(expected.entries.keys() | actual.entries.keys()):
        e, a = expected.entries.get(path), actual.entries.get(path)
        if e is not None and e.kind == "ghost" and a is None:
            continue
        if e is None:
            out.append(f"{path!r}: extra in subject ({a and a.kind})")
            continue
        if a is None:
            out.append(f"{path!r}: missing in subject (kernel has {e.kind})")
            continue
        if e.kind != a.kind:
            out.append(f"{path!r}: kind kernel={e.kind} subject={a.kind}")
            continue
        ef, af = e.fields(), a.fields()
        for name, ev in ef.items():
            if name in ignore or ev == af[name]:
                continue
            if name in ("nlink", "mtime_ns") and (
                f"{'dir' if e.kind == 'dir' else 'file'}_{name.removesuffix('_ns')}" in ignore
            ):
                continue
            if (
                name == "mtime_ns"
                and since_ns is not None
                and e.mtime_ns >= since_ns
                and a.mtime_ns >= since_ns
            ):
                continue
            if name == "mode":
                out.append(f"{path!r}: mode kernel={ev:o} subject={af[name]:o}")
            else:
                out.append(f"{path!r}: {name} kernel={ev!r} subject={af[name]!r}")
    if "links" not in ignore and set(expected.links) != set(actual.links):
        out.append(
            f"hard-link groups kernel={sorted(map(sorted, expected.links))} "
            f"subject={sorted(map(sorted, actual.links))}"
        )
    return out


def assert_same(
    expected: Snapshot,
    actual: Snapshot,
    *,
    since_ns: int | None = None,
    ignore: frozenset[str] = frozenset(),
    what: str = "",
) -> None:
    diffs = compare(expected, actual, since_ns=since_ns, ignore=ignore)
    assert not diffs, f"{what}: {len(diffs)} differences from the kernel:\n" + "\n".join(diffs[:60])


# --- uppers --------------------------------------------------------------------------------


def _is_whiteout(st: os.stat_result, path: bytes, name: bytes) -> bool:
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0):
        return True
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        xs = {os.fsencode(x) for x in os.listxattr(path, follow_symlinks=False)}
        return bool(xs & {b"trusted.overlay.whiteout", b"user.overlay.whiteout"})
    return False


def upper_snapshot(upper: str | os.PathLike[str]) -> Snapshot:
    """Normalised view of an upper dir: dialects folded, kernel bookkeeping dropped.

    Whiteouts (char 0/0, ``.wh.NAME``, xattr) become kind ``whiteout`` with no metadata;
    opaque markers (xattr ``y`` in trusted/user/fuseoverlayfs form, ``.wh..wh..opq``) become
    the xattr ``opaque=y``; ``redirect`` is kept as written; other private xattrs are dropped.
    """
    raw = snapshot(upper)
    base = os.fsencode(upper)
    out = Snapshot()
    opaque_dirs: set[bytes] = set()
    for path, e in raw.entries.items():
        parent, _, name = path.rpartition(b"/")
        full = base + b"/" + path if path != b"." else base
        if name == b".wh..wh..opq":
            opaque_dirs.add(parent or b".")
            continue
        if name.startswith(b".wh."):
            wpath = (parent + b"/" if parent else b"") + name[4:]
            out.entries[wpath] = Entry("whiteout", 0, 0, 0, None, 0, 0)
            continue
        if e.kind in ("chr", "file") and _is_whiteout(os.lstat(full), full, name):
            out.entries[path] = Entry("whiteout", 0, 0, 0, None, 0, 0)
            continue
        xattrs: dict[bytes, bytes] = {}
        for k, v in e.xattrs:
            if k.startswith(PRIVATE_XATTR_PREFIXES):
                short = k.split(b".", 2)[2]
                if short == b"opaque" and v == b"y":
                    opaque_dirs.add(path)
                elif short not in UPPER_XATTRS_DROPPED and short != b"opaque":
                    xattrs[b"overlay." + short] = _upper_xattr(short, v)
                continue
            xattrs[k] = v
        out.entries[path] = Entry(
            e.kind,
            e.mode,
            e.uid,
            e.gid,
            e.size,
            e.nlink if e.kind != "dir" else 0,
            e.mtime_ns,
            e.target,
            e.digest,
            e.rdev,
            tuple(sorted(xattrs.items())),
        )
    # The kernel hard-links its whiteouts to one shared inode: not a hard-link group to compare.
    out.links = [
        g
        for g in raw.links
        if not any(out.entries[p].kind == "whiteout" for p in g if p in out.entries)
        and g <= out.entries.keys()
    ]
    for path in opaque_dirs:
        e = out.entries.get(path)
        if e is None:  # e.g. a directory named .wh.X, taken for a whiteout above
            continue
        out.entries[path] = dataclasses.replace(
            e, xattrs=tuple(sorted((*e.xattrs, (b"overlay.opaque", b"y"))))
        )
    return out


def workdir_leftovers(work: str | os.PathLike[str]) -> list[bytes]:
    """Entries left in a workdir's scratch area (``work/work`` for the kernel)."""
    base = os.fsencode(work)
    out = []
    for sub in (b"work", b"index"):
        p = base + b"/" + sub
        if os.path.isdir(p):
            out += [sub + b"/" + n for n in os.listdir(p)]
    return out


# CLOCK_REALTIME_COARSE (Linux): the clock file timestamps are taken from, or below them
CLOCK_REALTIME_COARSE = 5


def fs_clock_ns() -> int:
    """Now, as a lower bound of every file timestamp set from here on: the kernel stamps files
    from the coarse clock (or a finer one), which lags time.time_ns() by up to a tick. A test
    start taken with time.time_ns() can be later than a file created right after it."""
    return time.clock_gettime_ns(CLOCK_REALTIME_COARSE)
