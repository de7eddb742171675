"""KeyedLock: one lock per key, created on demand and dropped when nobody holds it.

Copy-up takes the node's key so that concurrent opens for write copy a file up exactly once
(the kernel's ovl_copy_up_start/_end).

A free key is taken at once, without a checkpoint, and needs no trio.Lock: nearly every
copy-up finds its key free, and the asynccontextmanager and trio.Lock it paid for were an
eighth of a chmod's copy-up in Python (session 10's py-spy). A second taker parks until the
holder lets go, which hands the key to the first in line.
"""

from __future__ import annotations

from collections.abc import Hashable
from types import TracebackType

import trio


class _Key:
    """A held key: how many hold or wait for it, and where the waiters park."""

    __slots__ = ("lot", "users")

    def __init__(self) -> None:
        self.users = 1
        self.lot: trio.lowlevel.ParkingLot | None = None


class KeyedLock:
    def __init__(self) -> None:
        self._locks: dict[Hashable, _Key] = {}

    def hold(self, key: Hashable) -> _Hold:
        """``async with locks.hold(key):`` the holder of KEY, alone, in the body."""
        return _Hold(self, key)

    async def acquire(self, key: Hashable) -> None:
        entry = self._locks.get(key)
        if entry is None:
            self._locks[key] = _Key()
            return
        entry.users += 1
        if entry.lot is None:
            entry.lot = trio.lowlevel.ParkingLot()
        try:
            await entry.lot.park()  # returns once release() handed the key over
        except BaseException:
            entry.users -= 1  # cancelled while waiting: never handed the key
            raise

    def release(self, key: Hashable) -> None:
        entry = self._locks[key]
        entry.users -= 1
        if entry.users == 0:
            del self._locks[key]
        else:
            assert entry.lot is not None
            entry.lot.unpark()  # the first waiter holds it now

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


class _Hold:
    __slots__ = ("key", "locks")

    def __init__(self, locks: KeyedLock, key: Hashable) -> None:
        self.locks = locks
        self.key = key

    async def __aenter__(self) -> None:
        await self.locks.acquire(self.key)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.locks.release(self.key)
