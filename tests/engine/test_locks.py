"""KeyedLock: one holder per key, waiters served in order, nothing kept once free."""

from __future__ import annotations

import trio
import trio.testing

from layerfs.locks import KeyedLock


async def test_holders_of_one_key_take_turns_in_order() -> None:
    locks = KeyedLock()
    order: list[str] = []

    async def user(name: str) -> None:
        async with locks.hold("k"):
            order.append(f"{name} in")
            await trio.sleep(0.01)  # others arrive and wait meanwhile
            order.append(f"{name} out")

    async with trio.open_nursery() as nursery:
        for name in "abc":
            nursery.start_soon(user, name)
            await trio.testing.wait_all_tasks_blocked()
    assert order == ["a in", "a out", "b in", "b out", "c in", "c out"]
    assert locks.statistics() == {"keys": 0}


async def test_other_keys_do_not_wait() -> None:
    locks = KeyedLock()
    async with locks.hold("a"):
        with trio.fail_after(1):
            async with locks.hold("b"):
                assert locks.busy("a") and locks.busy("b")
    assert not locks.busy("a") and not locks.busy("b")


async def test_a_free_key_is_taken_without_a_schedule_point() -> None:
    """The common case (nobody else copies this node up) costs no pass through trio."""
    locks = KeyedLock()
    with trio.testing.assert_no_checkpoints():
        async with locks.hold("k"):
            pass


async def test_a_waiter_cancelled_leaves_the_key_to_the_others() -> None:
    locks = KeyedLock()
    got: list[str] = []

    async def waiter(name: str, scope: trio.CancelScope | None = None) -> None:
        with scope or trio.CancelScope():
            async with locks.hold("k"):
                got.append(name)

    async with trio.open_nursery() as nursery:
        await locks.acquire("k")
        cancelled = trio.CancelScope()
        nursery.start_soon(waiter, "cancelled", cancelled)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter, "next")
        await trio.testing.wait_all_tasks_blocked()
        cancelled.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert locks.busy("k")
        locks.release("k")
    assert got == ["next"]
    assert locks.statistics() == {"keys": 0}


async def test_wait_idle_returns_when_the_holder_lets_go() -> None:
    locks = KeyedLock()
    done: list[str] = []

    async def holder() -> None:
        async with locks.hold("k"):
            await trio.sleep(0.01)
            done.append("holder")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        await locks.wait_idle("k")
        done.append("idle")
    assert done == ["holder", "idle"]
    await locks.wait_idle("k")  # nobody holds it: at once
