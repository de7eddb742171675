"""KeyedLock: one trio lock per key, created on demand and dropped when nobody holds it.

Copy-up takes the node's key so that concurrent opens for write copy a file up exactly once
(the kernel's ovl_copy_up_start/_end).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager

import trio


class KeyedLock:
    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[trio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = trio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def busy(self, key: Hashable) -> bool:
        """True while someone holds or waits for KEY."""
        return key in self._locks

    async def wait_idle(self, key: Hashable) -> None:
        """Wait until whoever holds KEY lets go (returns at once when nobody does)."""
        if key in self._locks:
            async with self.hold(key):
                pass

    def statistics(self) -> dict[str, int]:
        return {"keys": len(self._locks)}
