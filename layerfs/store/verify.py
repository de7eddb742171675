"""Integrity at rest: per-file xxh3 manifests of extracted layers, and checking against them.

sha256 proves the tar that arrived; once extracted, a layer is a tree on disk, and that tree is
what a mount serves. At import the tree is walked once and every entry recorded (type, mode,
owner, size, mtime, an xxh3-128 of the content or symlink target or device number, and of
the xattrs). ``verify`` walks the tree again and reports what is missing, extra or changed.

The manifest is JSON lines, one entry per line, sorted by path; paths are file-system bytes
decoded with surrogateescape (JSON keeps the escapes).

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import xxhash

from layerfs._sys import proc_path

CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MANIFEST_VERSION = 1


def _xxh3_128() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


@dataclass(frozen=True, slots=True)
class Problem:
    """One difference between a layer tree and its manifest."""

    kind: str  # "missing", "extra", "changed"
    path: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.path}" + (f" ({self.detail})" if self.detail else "")


def _type_char(mode: int) -> str:
    for test, ch in (
        (stat.S_ISREG, "f"),
        (stat.S_ISDIR, "d"),
        (stat.S_ISLNK, "l"),
        (stat.S_ISCHR, "c"),
        (stat.S_ISBLK, "b"),
        (stat.S_ISFIFO, "p"),
    ):
        if test(mode):
            return ch
    return "s"


def walk(root: str, progress: Callable[[int], None] | None = None) -> Iterator[dict[str, object]]:
    """Yield one manifest entry per object below ``root`` (root itself as ""), sorted by path.

    Walks with directory fds and never follows a symlink. Hard links are hashed once.
    """
    fd = os.open(root, _DIR_FLAGS)
    seen: dict[tuple[int, int], str] = {}
    done = [0]
    try:
        st = os.fstat(fd)
        yield _entry(b"", st, fd, None, seen, done, progress)
        yield from _walk_dir(fd, b"", seen, done, progress)
    finally:
        os.close(fd)


def _walk_dir(
    dfd: int,
    prefix: bytes,
    seen: dict[tuple[int, int], str],
    done: list[int],
    progress: Callable[[int], None] | None,
) -> Iterator[dict[str, object]]:
    names = sorted(os.fsencode(n) for n in os.listdir(dfd))
    for name in names:
        path = prefix + name
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            cfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            try:
                yield _entry(path, st, cfd, None, seen, done, progress)
                yield from _walk_dir(cfd, path + b"/", seen, done, progress)
            finally:
                os.close(cfd)
        else:
            yield _entry(path, st, dfd, name, seen, done, progress)


def _entry(
    path: bytes,
    st: os.stat_result,
    fd: int,
    name: bytes | None,
    seen: dict[tuple[int, int], str],
    done: list[int],
    progress: Callable[[int], None] | None,
) -> dict[str, object]:
    kind = _type_char(st.st_mode)
    digest = ""
    if kind == "f":
        key = (st.st_dev, st.st_ino)
        if key in seen:
            digest = seen[key]
        else:
            assert name is not None
            digest = _hash_file(fd, name, done, progress)
            if st.st_nlink > 1:
                seen[key] = digest
    elif kind == "l":
        assert name is not None
        digest = xxhash.xxh3_128_hexdigest(os.readlink(name, dir_fd=fd))
    elif kind in "cb":
        digest = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    return {
        "path": os.fsdecode(path),
        "type": kind,
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "size": st.st_size if kind == "f" else 0,
        "mtime": st.st_mtime_ns,
        "digest": digest,
        "xattrs": _xattr_digest(fd, name),
    }


def _hash_file(
    dfd: int, name: bytes, done: list[int], progress: Callable[[int], None] | None
) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        st = os.fstat(fd)
        if st.st_blocks * 512 < st.st_size:
            return _hash_sparse(fd, st.st_size)
        h = _xxh3_128()
        while data := os.read(fd, CHUNK):
            h.update(data)
            done[0] += len(data)
            if progress is not None:
                progress(done[0])
    finally:
        os.close(fd)
    return str(h.hexdigest())


def _hash_sparse(fd: int, size: int) -> str:
    """The digest of a file with holes, read without its holes (a 100 GiB-apparent file of a
    few data blocks hashes in microseconds): each non-zero CHUNK-aligned block of the data
    regions, with its offset, and the size. Zero blocks count as holes, so the digest is the
    same whatever the hole layout; it differs from a dense file's (prefix ``s:``)."""
    h = _xxh3_128()
    h.update(size.to_bytes(8, "little"))
    pos = 0
    zero = bytes(CHUNK)
    while pos < size:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break  # ENXIO: only a hole is left
        end = os.lseek(fd, pos, os.SEEK_HOLE)
        block = pos - pos % CHUNK
        while block < end:
            data = os.pread(fd, CHUNK, block)
            if data and data != zero[: len(data)]:
                h.update(block.to_bytes(8, "little"))
                h.update(data)
            block += CHUNK
        pos = block
    return "s:" + str(h.hexdigest())


def _xattr_digest(fd: int, name: bytes | None) -> str:
    # listxattr/getxattr have no dirfd form: name the entry through the /proc magic link.
    # An fd (directories) takes no follow_symlinks argument; the path form must not follow.
    target: int | bytes = fd if name is None else proc_path(fd, name)
    follow = isinstance(target, int)
    try:
        names = sorted(os.listxattr(target, follow_symlinks=follow))
    except OSError:
        return ""
    if not names:
        return ""
    h = _xxh3_128()
    for xname in names:
        h.update(xname.encode() + b"\0")
        h.update(os.getxattr(target, xname, follow_symlinks=follow) + b"\0")
    return str(h.hexdigest())


def write_manifest(root: str, out_path: str, progress: Callable[[int], None] | None = None) -> int:
    """Walk ``root`` and write its manifest to ``out_path``; return the number of entries."""
    n = 0
    with open(out_path, "w", encoding="ascii") as out:
        out.write(json.dumps({"version": MANIFEST_VERSION}) + "\n")
        for entry in walk(root, progress):
            out.write(json.dumps(entry, sort_keys=True) + "\n")
            n += 1
        out.flush()
        os.fsync(out.fileno())
    return n


def read_manifest(path: str) -> dict[str, dict[str, object]]:
    """Load a manifest written by ``write_manifest``, keyed by path."""
    with open(path, encoding="ascii") as f:
        header = json.loads(f.readline())
        if header.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path}: unknown manifest version {header.get('version')!r}")
        entries = (json.loads(line) for line in f)
        return {str(e["path"]): e for e in entries}


def verify_tree(
    root: str, manifest_path: str, progress: Callable[[int], None] | None = None
) -> list[Problem]:
    """Compare the tree at ``root`` with its manifest; return the differences (none = intact)."""
    expected = read_manifest(manifest_path)
    problems: list[Problem] = []
    seen: set[str] = set()
    for entry in walk(root, progress):
        path = str(entry["path"])
        seen.add(path)
        want = expected.get(path)
        shown = "/" + path
        if want is None:
            problems.append(Problem("extra", shown))
            continue
        diffs = [k for k in want if k != "path" and want[k] != entry.get(k)]
        if diffs:
            problems.append(Problem("changed", shown, ", ".join(sorted(diffs))))
    problems.extend(Problem("missing", "/" + p) for p in sorted(set(expected) - seen))
    return problems
