"""``layerfs diff``: a container's changes as A/C/D lines, read from its upper directory.

The upper of an overlay is the diff, so the walk covers the upper only: its cost is
proportional to the changes, not to the image. Lowers are consulted per upper entry (one
lookup each) to tell an addition (A) from a change (C); without lowers every upper entry is
reported as A. The rules are containers/storage's (``podman diff`` on overlay storage), and
a test checks both on the same upper:
- a whiteout is D; an opaque upper directory that exists below is D (replaced), and what it
  holds now is A, or C where the name existed below;
- a directory present below with the same mode, size and mtime is not a change by itself,
  but every ancestor of an A or D is C;
- a renamed (redirected) directory is A under its new name, and so is everything below it,
  from the upper or from its lower part (as ``podman diff`` lists it); a whiteout below it
  hides nothing that existed at its path, so it is no change.

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from layerfs import xattrs
from layerfs._sys import proc_path
from layerfs.whiteout import OPQ_MARKER, WH_PREFIX

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OPAQUE_XATTRS = tuple(x.decode() for x in xattrs.OPAQUE)  # as os.listxattr names them
WHITEOUT_XATTRS = tuple(x.decode() for x in xattrs.WHITEOUT)


@dataclass(frozen=True, slots=True, order=True)
class Change:
    """One line of ``layerfs diff``: ``kind`` is A, C or D; ``path`` is absolute, as bytes."""

    path: bytes
    kind: str

    def __str__(self) -> str:
        return f"{self.kind} {os.fsdecode(self.path)}"


def changes(upper: str, lowers: list[str] | None = None) -> list[Change]:
    """Return the changes recorded in ``upper`` relative to ``lowers`` (topmost first)."""
    with LowerStack(lowers or []) as low:
        fd = os.open(upper, _DIR_FLAGS)
        try:
            out: list[Change] = []
            changed_dirs: set[bytes] = set()
            _walk(fd, [], [], low, out, changed_dirs)
        finally:
            os.close(fd)
    return sorted(set(out))


def _walk(
    dfd: int,
    parts: list[bytes],
    lower_parts: list[bytes] | None,
    low: LowerStack,
    out: list[Change],
    changed_dirs: set[bytes],
    renamed: bool = False,
) -> None:
    """Walk the upper directory ``parts``; its lower part lives at ``lower_parts`` (which
    differs from ``parts`` below a renamed, redirected directory; None: no lower part).
    RENAMED: below a renamed directory, where every path is new (A) and a whiteout hides
    something that never existed at this path (no change)."""
    names = sorted(os.fsencode(n) for n in os.listdir(dfd))
    for name in names:
        if name == OPQ_MARKER:
            continue
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        xattrs = _xattr_names(dfd, name)
        if name.startswith(WH_PREFIX):
            if not renamed:
                _record(out, changed_dirs, [*parts, name[len(WH_PREFIX) :]], "D")
            continue
        xattr_whiteout = any(x in xattrs for x in WHITEOUT_XATTRS)
        if (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0) or (
            stat.S_ISREG(st.st_mode) and st.st_size == 0 and xattr_whiteout
        ):
            if not renamed:
                _record(out, changed_dirs, [*parts, name], "D")
            continue
        path = [*parts, name]
        child_lower = None if lower_parts is None else [*lower_parts, name]
        below = low.lookup(child_lower) if child_lower is not None else None
        is_dir = stat.S_ISDIR(st.st_mode)
        redirect = redirect_target(dfd, name, lower_parts) if is_dir else None
        cfd = os.open(name, _DIR_FLAGS, dir_fd=dfd) if is_dir else -1
        try:
            kind = "A"
            if renamed or redirect is not None:
                kind = "A"  # a renamed directory, or in one: new here, whatever is below
            elif below is not None:
                if is_dir and _is_opaque(cfd):
                    kind = "D"  # replaced: its old contents are gone (containers/storage)
                elif is_dir and stat.S_ISDIR(below.st_mode) and _same_dir(st, below):
                    kind = ""  # only holds changes: not itself a change
                else:
                    kind = "C"
            if kind:
                _record(out, changed_dirs, path, kind)
            if is_dir:
                if kind:
                    changed_dirs.add(_abs(path))
                if redirect is not None:
                    child_lower = redirect
                inside = renamed or redirect is not None
                if inside and _is_opaque(cfd):
                    child_lower = None  # nothing below shows through
                _walk(cfd, path, child_lower, low, out, changed_dirs, inside)
        finally:
            if cfd >= 0:
                os.close(cfd)
    if renamed and lower_parts is not None:
        # In a renamed directory every name is new, also those only its lower part holds
        # (podman diff and a tree comparison list them all): each is A, whole subtrees too.
        shown = {n[len(WH_PREFIX) :] if n.startswith(WH_PREFIX) else n for n in names}
        for name in low.children(lower_parts):
            if name not in shown:
                _lower_added(low, [*lower_parts, name], [*parts, name], out, changed_dirs)


def _lower_added(
    low: LowerStack,
    lower_parts: list[bytes],
    parts: list[bytes],
    out: list[Change],
    changed_dirs: set[bytes],
) -> None:
    """Report the lower object at ``lower_parts`` (and all below it) as added at ``parts``."""
    _record(out, changed_dirs, parts, "A")
    st = low.lookup(lower_parts)
    if st is not None and stat.S_ISDIR(st.st_mode):
        changed_dirs.add(_abs(parts))  # reported: its children's additions add no C for it
        for name in low.children(lower_parts):
            _lower_added(low, [*lower_parts, name], [*parts, name], out, changed_dirs)


def redirect_target(dfd: int, name: bytes, lower_parts: list[bytes] | None) -> list[bytes] | None:
    """Where the lower part of upper directory ``name`` lives, if it carries an overlay
    redirect (a renamed directory): absolute from the root, or a name in the parent's lower
    directory ``lower_parts``. None when it has no redirect."""
    path = proc_path(dfd, name)
    for x in xattrs.REDIRECT:
        try:
            value = os.getxattr(path, x, follow_symlinks=False)
        except OSError:
            continue
        if value.startswith(b"/"):
            return [p for p in value.split(b"/") if p]
        if lower_parts is None or not value or b"/" in value:
            return None
        return [*lower_parts, value]
    return None


def _record(out: list[Change], changed_dirs: set[bytes], path: list[bytes], kind: str) -> None:
    out.append(Change(_abs(path), kind))
    if kind in ("A", "D"):
        # Every ancestor of an addition or deletion is changed, even when its own metadata
        # looks the same (containers/storage pkg/archive changes()).
        for depth in range(len(path) - 1, 0, -1):
            parent = _abs(path[:depth])
            if parent not in changed_dirs:
                out.append(Change(parent, "C"))
                changed_dirs.add(parent)


def _same_dir(a: os.stat_result, b: os.stat_result) -> bool:
    # Go's sameFsTime: equal, or equal seconds where one side has no nanoseconds.
    ta, tb = a.st_mtime_ns, b.st_mtime_ns
    same_time = ta == tb or (
        ta // 1_000_000_000 == tb // 1_000_000_000
        and (ta % 1_000_000_000 == 0 or tb % 1_000_000_000 == 0)
    )
    return a.st_size == b.st_size and a.st_mode == b.st_mode and same_time


def _abs(parts: list[bytes]) -> bytes:
    return b"/" + b"/".join(parts)


def _xattr_names(dfd: int, name: bytes) -> list[str]:
    try:
        return os.listxattr(proc_path(dfd, name), follow_symlinks=False)
    except OSError:
        return []


def _is_opaque(fd: int) -> bool:
    for x in OPAQUE_XATTRS:
        with contextlib.suppress(OSError):
            if os.getxattr(fd, x) == b"y":
                return True
    try:
        os.stat(OPQ_MARKER, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


class LowerStack:
    """Overlay lookups in a read-only lower stack, relative to each layer's root fd."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.fds: list[int] = []

    def __enter__(self) -> LowerStack:
        try:
            for p in self.paths:
                self.fds.append(os.open(p, _DIR_FLAGS))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def _dirs(self, parts: list[bytes]) -> Iterator[tuple[int, int]]:
        """Yield (layer index, directory fd) for each lower whose directory ``parts``
        contributes to the merged directory, topmost first. The fds are closed here."""
        for index, root in enumerate(self.fds):
            fd = os.dup(root)
            stop = False
            ok = True
            try:
                for comp in parts:
                    try:
                        nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                    except OSError:
                        ok = False
                        # A non-directory or whiteout here hides the name in layers below.
                        stop = _exists(fd, comp) or _exists(fd, WH_PREFIX + comp)
                        break
                    os.close(fd)
                    fd = nfd
                    if _is_opaque(fd):
                        stop = True
                if ok:
                    yield index, fd
            finally:
                os.close(fd)
            if stop:
                return

    def locate(self, parts: list[bytes]) -> tuple[int, os.stat_result] | None:
        """(layer index, stat) of ``parts`` as the lower stack shows it, or None."""
        for index, dfd in self._dirs(parts[:-1]):
            name = parts[-1]
            if _exists(dfd, WH_PREFIX + name):
                return None
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                return None
            return index, st
        return None

    def lookup(self, parts: list[bytes]) -> os.stat_result | None:
        """stat of ``parts`` as the lower stack shows it, or None if it does not exist."""
        found = self.locate(parts)
        return None if found is None else found[1]

    def open_dir(self, index: int, parts: list[bytes]) -> int:
        """Open directory ``parts`` of lower ``index`` (never through a symlink); caller closes."""
        fd = os.dup(self.fds[index])
        try:
            for comp in parts:
                nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def children(self, parts: list[bytes]) -> list[bytes]:
        """The names in the merged lower directory ``parts``."""
        seen: set[bytes] = set()
        hidden: set[bytes] = set()
        for _index, dfd in self._dirs(parts):
            for n in os.listdir(dfd):
                b = os.fsencode(n)
                if b == OPQ_MARKER:
                    continue
                if b.startswith(WH_PREFIX):
                    hidden.add(b[len(WH_PREFIX) :])
                    continue
                if b in seen or b in hidden:
                    continue
                st = os.stat(b, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    hidden.add(b)
                else:
                    seen.add(b)
        return sorted(seen)


def _exists(dfd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return False
    return True
