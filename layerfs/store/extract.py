"""Safe extraction of an OCI layer tar into the kernel overlayfs lower-layer form.

The tar is read as a stream (it is being hashed on the way in) and written below one layer
directory, relative to directory fds, one component at a time and never through a symlink:
an entry whose path is absolute, contains ``..``, or crosses a symlink is refused, and so is a
hard link whose target does the same. OCI whiteouts become what overlayfs reads in a lower:
``.wh.NAME`` -> character device 0/0 named NAME, ``.wh..wh..opq`` -> ``trusted.overlay.opaque=y``
on the directory. Owners, modes (setuid included), nanosecond times, xattrs (PAX
``SCHILY.xattr.*``), hard links, device nodes and FIFOs are kept.

Invariants:
- Nothing outside the destination directory is created, changed or followed.
- Overlay-private xattrs carried by a tar (``trusted.overlay.*`` and the like) are dropped: a
  layer says "whiteout" and "opaque" only in the OCI way, never by smuggled xattrs.

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, BinaryIO, cast

from layerfs._sys import proc_path
from layerfs.errors import LayerfsError
from layerfs.store.diff import LowerStack
from layerfs.store.digest import DigestError, HashingReader
from layerfs.whiteout import OPQ_MARKER, WH_PREFIX
from layerfs.xattrs import OPAQUE_W, PRIVATE_PREFIXES

PRIVATE_XATTR_PREFIXES = tuple(x.decode() for x in PRIVATE_PREFIXES)  # os.listxattr's str
CHUNK = 1 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class ExtractError(LayerfsError):
    """A layer tar that cannot be extracted safely (bad path, bad entry, corrupt stream)."""


class TraversalError(ExtractError):
    """A tar entry whose path (or link target) would escape the layer directory."""


@dataclass(frozen=True, slots=True)
class ExtractStats:
    """What one layer extraction did."""

    entries: int
    whiteouts: int
    opaques: int
    file_bytes: int
    tar_bytes: int  # uncompressed stream size
    blob_bytes: int  # compressed stream size


def split_path(name: str | bytes) -> list[bytes]:
    """Split a tar member name into safe components; refuse absolute paths and ``..``."""
    b = os.fsencode(name)
    if b.startswith(b"/"):
        raise TraversalError(f"tar entry {os.fsdecode(b)!r} has an absolute path")
    parts = [p for p in b.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise TraversalError(f"tar entry {os.fsdecode(b)!r} contains '..'")
    return parts


def open_decompressed(raw: BinaryIO, compression: str) -> BinaryIO:
    """Wrap ``raw`` in a decompressing reader for ``none``, ``gzip`` or ``zstd``."""
    if compression == "none":
        return raw
    if compression == "gzip":
        return cast(BinaryIO, gzip.GzipFile(fileobj=raw, mode="rb"))
    if compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raise ExtractError("zstd layers need the 'zstandard' Python package") from None
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return cast(BinaryIO, reader)
    raise ExtractError(f"unknown compression {compression!r}")


def extract_blob(
    blob: BinaryIO,
    compression: str,
    *,
    digest: str,
    size: int,
    diff_id: str,
    dest: str | None,
    progress: Callable[[int], None] | None = None,
    lowers: list[str] | None = None,
    max_size: int | None = None,
) -> ExtractStats:
    """Stream one layer blob: verify its digest and diffID, extract it into ``dest``.

    With ``dest`` None the tar is only hashed (the layer is already in the store, but this
    blob has not been seen: its diffID must still be proved). Both digests are checked here
    again even when the caller verified the blob first. Raises DigestError or ExtractError;
    the caller owns ``dest`` and removes it on failure. ``lowers`` (topmost first) are the
    extracted layers below this one; ``max_size`` refuses a layer whose files add up to more
    bytes (apparent sizes).
    """
    outer = HashingReader(blob, limit=size)
    try:
        inner = HashingReader(open_decompressed(cast(BinaryIO, outer), compression))
        if dest is None:
            inner.read_all()
            stats = ExtractStats(0, 0, 0, 0, 0, 0)
        else:
            tick = lambda: progress(outer.count) if progress else None  # noqa: E731
            with LowerStack(lowers or []) as low:
                stats = _extract_tar(inner, dest, tick, low if lowers else None, max_size)
            inner.read_all()  # the zero blocks and padding after the tar end marker
        outer.read_all()  # anything after the compressed stream's end
    except tarfile.TarError as e:
        raise ExtractError(f"layer {digest}: bad or truncated tar stream: {e}") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DigestError(f"layer {digest}: corrupt or truncated compressed stream: {e}") from None
    except ExtractError as e:
        # Name the layer: the entry path alone does not say which of N layers was refused.
        raise type(e)(f"layer {digest}: {e}") from None
    except LayerfsError:
        raise
    except Exception as e:
        # zstandard.ZstdError derives from Exception only.
        if type(e).__module__.startswith("zstandard"):
            raise DigestError(f"layer {digest}: corrupt zstd stream: {e}") from None
        raise
    outer.check(digest, f"layer blob {digest}", size)
    inner.check(diff_id, f"layer {digest} uncompressed (diffID)")
    return ExtractStats(
        stats.entries, stats.whiteouts, stats.opaques, stats.file_bytes, inner.count, outer.count
    )


def _extract_tar(
    stream: HashingReader,
    dest: str,
    tick: Callable[[], None],
    lowers: LowerStack | None,
    max_size: int | None,
) -> ExtractStats:
    root_fd = os.open(dest, _DIR_FLAGS)
    try:
        ex = _Extractor(root_fd, lowers, max_size)
        src = cast(IO[bytes], stream)
        with tarfile.open(fileobj=src, mode="r|", errors="surrogateescape") as tf:
            for member in tf:
                try:
                    ex.member(tf, member)
                except OSError as e:
                    # A full disk (or any refusal) names the entry, as umoci does.
                    raise ExtractError(f"tar entry {member.name!r}: {e.strerror or e}") from None
                tick()
        ex.finish()
        return ExtractStats(ex.entries, ex.whiteouts, ex.opaques, ex.file_bytes, 0, 0)
    finally:
        os.close(root_fd)


class _Extractor:
    """Applies tar members below ``root_fd``; see the module docstring for the rules."""

    def __init__(
        self, root_fd: int, lowers: LowerStack | None = None, max_size: int | None = None
    ) -> None:
        self.root_fd = root_fd
        self.lowers = lowers  # the layers below this one, for directories a tar only implies
        self.max_size = max_size
        self.apparent = 0  # sum of regular files' sizes, holes included
        self.entries = self.whiteouts = self.opaques = self.file_bytes = 0
        # directory -> (atime, mtime), set last; an entry of the tar replaces an implied one.
        self._dir_times: dict[tuple[bytes, ...], tuple[int, int]] = {}
        self._cached: tuple[tuple[bytes, ...], int] | None = None

    # -- walking ---------------------------------------------------------------------------

    def _parent(self, parts: list[bytes], *, create: bool) -> int:
        """Return an O_PATH fd of the directory holding ``parts[-1]`` (cached; do not close)."""
        key = tuple(parts[:-1])
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        fd = os.dup(self.root_fd)
        try:
            for depth, comp in enumerate(key):
                fd = self._step(fd, comp, parts, create=create, depth=depth)
        except BaseException:
            os.close(fd)
            raise
        self._drop_cache()
        self._cached = (key, fd)
        return fd

    def _step(
        self, fd: int, comp: bytes, parts: list[bytes], *, create: bool, depth: int = -1
    ) -> int:
        try:
            nfd = os.open(comp, _PATH_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise ExtractError(f"hard link target {_show(parts)} does not exist") from None
            # Tars may omit parent directories (umoci repack, many builders): the directory
            # is only implied, so it keeps what the layers below say about it.
            os.mkdir(comp, 0o755, dir_fd=fd)
            nfd = os.open(comp, _PATH_FLAGS, dir_fd=fd)
            self._implied(nfd, parts[: depth + 1])
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "a non-directory"
            raise TraversalError(
                f"tar entry {_show(parts)} goes through {what} ({os.fsdecode(comp)!r})"
            ) from None
        os.close(fd)
        return nfd

    def _implied(self, fd: int, parts: list[bytes]) -> None:
        """Give directory ``parts``, just created because an entry needs it, the metadata
        of the same directory in the layers below (as ``umoci unpack``, which extracts onto
        the tree below, keeps it); with none below it stays 0755 root:root, stamped now."""
        if self.lowers is None:
            return
        found = self.lowers.locate(parts)
        if found is None or not stat.S_ISDIR(found[1].st_mode):
            return
        index, st = found
        path = proc_path(fd)
        os.chown(path, st.st_uid, st.st_gid)
        os.chmod(path, stat.S_IMODE(st.st_mode))
        pfd = self.lowers.open_dir(index, parts[:-1])
        try:
            for name, value in _lower_xattrs(pfd, parts[-1]):
                os.setxattr(path, name, value)
        finally:
            os.close(pfd)
        # Set last, in finish(), unless the tar names the directory itself later.
        self._dir_times.setdefault(tuple(parts), (st.st_atime_ns, st.st_mtime_ns))

    def _drop_cache(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def finish(self) -> None:
        """Set directory times last: creating their entries changed them."""
        self._drop_cache()
        for key, (atime, mtime) in reversed(self._dir_times.items()):
            parts = list(key)
            if not parts:
                os.utime(self.root_fd, ns=(atime, mtime))
                continue
            pfd = self._parent(parts, create=False)
            os.utime(parts[-1], ns=(atime, mtime), dir_fd=pfd, follow_symlinks=False)
        self._drop_cache()

    def _clear(self, pfd: int, name: bytes, *, keep_dir: bool) -> bool:
        """Remove whatever is at ``name`` (a later tar entry replaces an earlier one).

        ``pfd`` is the cached parent, which stays valid: only its child is removed.

        Returns True when an existing directory was kept (``keep_dir``).
        """
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            shutil.rmtree(os.fsdecode(name), dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)
        return False

    # -- members ---------------------------------------------------------------------------

    def member(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = split_path(m.name)
        self.entries += 1
        if not parts:
            if m.isdir():
                self._meta_fd(self.root_fd, m, is_dir=True)
                self._dir_times[()] = _times(m)
            return
        base = parts[-1]
        if base == OPQ_MARKER:
            pfd = self._parent(parts, create=True)
            os.setxattr(proc_path(pfd), OPAQUE_W, b"y")
            self.opaques += 1
            return
        if base.startswith(WH_PREFIX + WH_PREFIX):
            return  # aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not content
        if base.startswith(WH_PREFIX):
            name = base[len(WH_PREFIX) :]
            if not name or name in (b".", b".."):
                raise TraversalError(f"tar entry {_show(parts)} is a malformed whiteout")
            pfd = self._parent(parts, create=True)
            self._clear(pfd, name, keep_dir=False)
            os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=pfd)
            self.whiteouts += 1
            return
        pfd = self._parent(parts, create=True)
        if m.isdir():
            try:
                os.mkdir(base, 0o700, dir_fd=pfd)
            except FileExistsError:
                if not self._clear(pfd, base, keep_dir=True):
                    os.mkdir(base, 0o700, dir_fd=pfd)
            fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
            try:
                self._meta_fd(fd, m, is_dir=True)
            finally:
                os.close(fd)
            self._dir_times[tuple(parts)] = _times(m)
        elif m.isreg():
            self._file(tf, m, pfd, base)
        elif m.issym():
            self._clear(pfd, base, keep_dir=False)
            os.symlink(os.fsencode(m.linkname), base, dir_fd=pfd)
            self._meta_path(pfd, base, m, chmod=False)
        elif m.islnk():
            self._link(m, pfd, base, parts)
        elif m.ischr() or m.isblk() or m.isfifo():
            self._clear(pfd, base, keep_dir=False)
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
            dev = os.makedev(m.devmajor, m.devminor) if kind != stat.S_IFIFO else 0
            os.mknod(base, kind | 0o600, dev, dir_fd=pfd)
            self._meta_path(pfd, base, m, chmod=True)
        else:
            raise ExtractError(f"tar entry {_show(parts)} has unsupported type {m.type!r}")

    def _file(self, tf: tarfile.TarFile, m: tarfile.TarInfo, pfd: int, base: bytes) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(base, flags, 0o600, dir_fd=pfd)
        except FileExistsError:
            # Rare: a later entry replaces an earlier one. Try first, clear on conflict.
            self._clear(pfd, base, keep_dir=False)
            fd = os.open(base, flags, 0o600, dir_fd=pfd)
        try:
            self.apparent += m.size
            if self.max_size is not None and self.apparent > self.max_size:
                raise ExtractError(
                    f"tar entry {m.name!r}: the layer unpacks to more than the limit of "
                    f"{self.max_size} bytes"
                )
            sparse = cast("list[tuple[int, int]] | None", getattr(m, "sparse", None))
            if sparse is not None:
                # A GNU or PAX sparse member: its data regions are stored one after the
                # other; write each at its offset, so the holes stay holes (a 100 GiB-apparent
                # file in a 20 KiB tar takes 20 KiB here too). The stream only moves forward.
                raw = cast(IO[bytes], tf.fileobj)
                raw.seek(m.offset_data)
                for offset, length in sparse:
                    self._copy(raw, fd, length, offset)
                os.ftruncate(fd, m.size)
            elif (src := tf.extractfile(m)) is not None:
                self._copy(src, fd, None, None)
            self._meta_fd(fd, m)
        finally:
            os.close(fd)

    def _copy(self, src: IO[bytes], fd: int, length: int | None, offset: int | None) -> None:
        """Copy ``length`` bytes (all, if None) of ``src`` to ``fd`` at ``offset`` (or on)."""
        left = length
        while left is None or left > 0:
            data = src.read(CHUNK if left is None else min(CHUNK, left))
            if not data:
                break
            view = memoryview(data)
            while view:
                n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
                view = view[n:]
                if offset is not None:
                    offset += n
            self.file_bytes += len(data)
            if left is not None:
                left -= len(data)

    def _link(self, m: tarfile.TarInfo, pfd: int, base: bytes, parts: list[bytes]) -> None:
        target = split_path(m.linkname)
        if not target:
            raise TraversalError(f"hard link {_show(parts)} points at the layer root")
        if target == parts:
            return  # a link to itself: nothing to do
        # Resolve the target's directory without the cache: it is usually elsewhere.
        tfd = os.dup(self.root_fd)
        try:
            for comp in target[:-1]:
                tfd = self._step(tfd, comp, target, create=False)
            st = os.stat(target[-1], dir_fd=tfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise ExtractError(f"hard link {_show(parts)} points at a directory")
            self._clear(pfd, base, keep_dir=False)
            os.link(target[-1], base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            raise ExtractError(
                f"hard link {_show(parts)}: target {_show(target)} is not in this layer"
            ) from None
        finally:
            os.close(tfd)

    # -- metadata --------------------------------------------------------------------------

    def _meta_fd(self, fd: int, m: tarfile.TarInfo, *, is_dir: bool = False) -> None:
        # Order matters: chown clears setuid bits and file capabilities, so chown first,
        # then mode, then xattrs (security.capability), then times.
        os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, m.mode & 0o7777)
        for name, value in _xattrs(m):
            os.setxattr(fd, name, value)
        if not is_dir:  # directory times are set last, in finish()
            os.utime(fd, ns=_times(m))

    def _meta_path(self, pfd: int, base: bytes, m: tarfile.TarInfo, *, chmod: bool) -> None:
        os.chown(base, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        if chmod:  # never on a symlink: Linux has no lchmod
            os.chmod(base, m.mode & 0o7777, dir_fd=pfd)
        for name, value in _xattrs(m):
            os.setxattr(proc_path(pfd, base), name, value, follow_symlinks=False)
        os.utime(base, ns=_times(m), dir_fd=pfd, follow_symlinks=False)


def _xattrs(m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    out = []
    for key, value in m.pax_headers.items():
        if not key.startswith("SCHILY.xattr."):
            continue
        name = key[len("SCHILY.xattr.") :]
        if name.startswith(PRIVATE_XATTR_PREFIXES):
            continue
        out.append((name, value.encode("utf-8", "surrogateescape")))
    return out


def _lower_xattrs(pfd: int, name: bytes) -> list[tuple[str, bytes]]:
    """The public xattrs of ``name`` in directory ``pfd`` (overlay-private ones stay below)."""
    path = proc_path(pfd, name)
    out = []
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []
    for x in names:
        if x.startswith(PRIVATE_XATTR_PREFIXES):
            continue
        with contextlib.suppress(OSError):
            out.append((x, os.getxattr(path, x, follow_symlinks=False)))
    return out


def _times(m: tarfile.TarInfo) -> tuple[int, int]:
    mtime = _pax_ns(m.pax_headers.get("mtime")) or int(m.mtime) * 1_000_000_000
    atime = _pax_ns(m.pax_headers.get("atime")) or mtime
    return atime, mtime


def _pax_ns(value: str | None) -> int | None:
    """Parse a PAX decimal time ("1700000000.123456789") exactly, to nanoseconds."""
    if not value:
        return None
    neg = value.startswith("-")
    whole, _, frac = value.lstrip("-").partition(".")
    try:
        ns = int(whole or "0") * 1_000_000_000 + int((frac + "000000000")[:9])
    except ValueError:
        return None
    return -ns if neg else ns


def _show(parts: list[bytes]) -> str:
    return repr(os.fsdecode(b"/".join(parts)))
