"""Parallel gzip compression, pigz-style: one ordinary gzip member, deflated by several threads.

The stream is cut into blocks; each block is deflated on its own (zlib releases the GIL while
it compresses) with the previous block's last 32 KiB as preset dictionary, and ends with a sync
flush so the raw deflate pieces concatenate into one valid stream (pigz does the same). The
result is a single standard gzip member, byte-for-byte deterministic for a given input, level
and block size, whatever the thread timing; the CRC-32 and length trailer cover the whole.

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import collections
import os
import struct
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

BLOCK = 1 << 20
WINDOW = 32 << 10
# gzip header: magic, deflate, no flags, mtime 0 (reproducible), no extra flags, OS unknown.
_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


def _deflate(block: bytes, dictionary: bytes, level: int, last: bool) -> bytes:
    if dictionary:
        c = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, dictionary)
    else:
        c = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY)
    return c.compress(block) + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


class ParallelGzipWriter:
    """A write-only gzip stream onto ``raw``, compressed by ``workers`` threads."""

    def __init__(
        self, raw: BinaryIO, level: int = 6, workers: int | None = None, block: int = BLOCK
    ) -> None:
        self._raw = raw
        self._level = level
        self._block = block
        self._workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="pgzip")
        self._pending: collections.deque[Future[bytes]] = collections.deque()
        self._buf = bytearray()
        self._dict = b""
        self._crc = 0
        self._size = 0
        self._closed = False
        self._raw.write(_HEADER)

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError("write to a closed ParallelGzipWriter")
        self._crc = zlib.crc32(data, self._crc)
        n = len(data)
        self._size += n
        self._buf += data
        while len(self._buf) >= self._block:
            self._submit(bytes(self._buf[: self._block]), last=False)
            del self._buf[: self._block]
        return n

    def _submit(self, block: bytes, *, last: bool) -> None:
        self._pending.append(self._pool.submit(_deflate, block, self._dict, self._level, last))
        self._dict = block[-WINDOW:]
        # Bound memory: keep at most two blocks per worker in flight.
        while len(self._pending) > 2 * self._workers:
            self._raw.write(self._pending.popleft().result())

    def flush(self) -> None:
        """Nothing to do before close(): blocks are written as they complete."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._submit(bytes(self._buf), last=True)
            self._buf = bytearray()
            while self._pending:
                self._raw.write(self._pending.popleft().result())
            self._raw.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ParallelGzipWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
