"""Streaming sha256 verification: readers that hash what passes through them.

A layer blob is read once: the compressed bytes are hashed against the descriptor's digest
(and counted against its size), the decompressed bytes against the config's diffID, while
the tar stream is being extracted. Nothing is trusted until both digests have matched.

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Callable
from typing import BinaryIO

from layerfs.errors import LayerfsError

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class DigestError(LayerfsError):
    """A blob's bytes do not match the digest (or size) that names it."""


def parse_digest(digest: str) -> str:
    """Return the hex part of a ``sha256:HEX`` digest; refuse other algorithms and bad forms.

    The hex part becomes a file name in the store, so this check is also what keeps a
    hostile descriptor from naming a path outside it.
    """
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise DigestError(f"unsupported or malformed digest {digest!r} (want sha256:<64 hex>)")
    return digest[7:]


def sha256_bytes(data: bytes) -> str:
    """Return the ``sha256:HEX`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts every byte read from ``inner``.

    ``limit`` (when given) is the size the descriptor promised: reading past it is refused,
    which stops a blob that is longer than announced from being consumed without bound.
    """

    def __init__(self, inner: BinaryIO, limit: int | None = None, sink: int | None = None) -> None:
        super().__init__()
        self._inner = inner
        self._sink = sink  # fd that receives a copy of every byte (the store's blob copy)
        self._hash = hashlib.sha256()
        self.count = 0
        self._limit = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buf).cast("B")
        want = len(view)
        if self._limit is not None:
            # Read one byte beyond the limit at most, so an over-long blob is detected.
            want = min(want, self._limit + 1 - self.count)
            if want <= 0:
                raise DigestError(f"blob is longer than its descriptor's size {self._limit}")
        data = self._inner.read(want)
        n = len(data)
        view[:n] = data
        self._hash.update(data)
        if self._sink is not None and n:
            _write_all(self._sink, data)
        self.count += n
        if self._limit is not None and self.count > self._limit:
            raise DigestError(f"blob is longer than its descriptor's size {self._limit}")
        return n

    def read_all(self, chunk: int = 1 << 20) -> None:
        """Consume the rest of the stream (tar padding, trailing blocks) so the hash is total."""
        buf = bytearray(chunk)
        while self.readinto(buf):
            pass

    def digest(self) -> str:
        """The ``sha256:HEX`` of everything read so far."""
        return "sha256:" + self._hash.hexdigest()

    def check(self, expected: str, what: str, size: int | None = None) -> None:
        """Raise DigestError unless everything read matches ``expected`` (and ``size``)."""
        if size is not None and self.count != size:
            raise DigestError(
                f"{what}: size {self.count} does not match the descriptor's {size} "
                "(truncated or padded blob)"
            )
        got = self.digest()
        if got != expected:
            raise DigestError(f"{what}: digest mismatch: expected {expected}, got {got}")


class HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts every byte on its way to ``inner``."""

    def __init__(self, inner: BinaryIO) -> None:
        super().__init__()
        self._inner = inner
        self._hash = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._hash.update(data)
        self._inner.write(data)
        n = len(data)
        self.count += n
        return n

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def copy_verified(
    src: BinaryIO,
    dst_path: str,
    digest: str,
    size: int,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Copy ``src`` to a new file ``dst_path``, refusing it unless it is exactly ``size``
    bytes with sha256 ``digest`` (an over-long source is cut off at size + 1 bytes)."""
    fd = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        reader = HashingReader(src, limit=size, sink=fd)
        buf = bytearray(1 << 20)
        while reader.readinto(buf):
            if progress is not None:
                progress(reader.count)
        reader.check(digest, f"blob {digest}", size)
    finally:
        os.close(fd)


def sha256_file(path: str, chunk: int = 1 << 20) -> tuple[str, int]:
    """Return (``sha256:HEX``, size) of the file at ``path``."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
            n += len(data)
    return "sha256:" + h.hexdigest(), n
