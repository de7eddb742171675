"""The request loop's own CPU per request, without FUSE: ``python -m benchmarks.loopcost``.

A client process sends one byte over a socketpair and waits for the answer, N times, as a
process waiting on a FUSE request does. The server answers with a plain blocking loop
(``recv``, ``send``), or in pyfuse3's loop shape (pyfuse3 3.5, ``_session_loop`` and
``_wait_fuse_readable``: two reader tasks passing a ``trio.Lock``, ``wait_readable`` before
each read, the handler an awaited coroutine). The difference in the server's CPU per round
trip is what trio's scheduling costs each request, apart from the filesystem's own work and
from the kernel's side of /dev/fuse (docs/benchmarks.md, session 9 loop). CPU time, so the
machine's load moves it less than wall time; the load average is printed with it.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import trio


def _client(sock: socket.socket, n: int) -> None:
    for _ in range(n):
        sock.send(b"x")
        sock.recv(64)
    sock.send(b"q")


def _plain(sock: socket.socket, n: int) -> None:
    for _ in range(n):
        sock.recv(64)
        sock.send(b"y")
    sock.recv(64)


def _pyfuse3_shape(sock: socket.socket) -> None:
    lock = trio.Lock()
    fd = sock.fileno()

    async def handler() -> None:
        return None

    async def reader(nursery: trio.Nursery) -> None:
        while True:
            async with lock:
                await trio.lowlevel.wait_readable(fd)
            if sock.recv(64) == b"q":
                nursery.cancel_scope.cancel()
                return
            await handler()
            sock.send(b"y")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, nursery)
            nursery.start_soon(reader, nursery)

    trio.run(main)


def server_cpu(kind: str, n: int) -> float:
    """Seconds of this process's CPU per round trip served the KIND way."""
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close()
        try:
            _client(b, n)
        finally:
            os._exit(0)
    b.close()
    t0 = time.process_time()
    if kind == "plain":
        _plain(a, n)
    else:
        _pyfuse3_shape(a)
    cpu = time.process_time() - t0
    os.waitpid(pid, 0)
    a.close()
    return cpu / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    for _ in range(args.rounds):
        for kind in ("plain", "pyfuse3-shape"):
            us = server_cpu(kind, args.requests) * 1e6
            print(f"{kind:14} {us:6.1f} us server CPU per round trip", flush=True)
    print("load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
