"""A TCP proxy on 127.0.0.1 in front of the test registry that passes every byte through,
except the answer to the first ``GET`` of one blob: its headers and the first ``head`` bytes
of its body go through, then the rest waits until the test calls ``release()`` (or
``timeout`` passes, so a broken pull cannot hang the suite). A test that signals a pull while
it is ``holding`` knows the download is in flight, however loaded the machine is. With
``then``, the requests for a second blob wait until the first is held: whatever happens to
that one (a failure) happens while the first download is in flight.

HTTP/1.1 without pipelining (httpx's): on a connection, the bytes the registry sends after a
request went through are that request's answer, so the proxy needs no HTTP parsing beyond
finding the request line and the end of the answer's headers."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

BUF = 1 << 16


@dataclass
class BlobHold:
    host: str  # 127.0.0.1:PORT, the registry's stand-in
    holding: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


def _shut(*socks: socket.socket) -> None:
    # shutdown, not close: it wakes the other direction's thread blocked in recv.
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


class _Connection:
    def __init__(
        self,
        client: socket.socket,
        upstream: str,
        request: re.Pattern[bytes],
        hold: BlobHold,
        then: re.Pattern[bytes] | None,
    ) -> None:
        self.client = client
        self.then = then
        host, port = upstream.rsplit(":", 1)
        self.server = socket.create_connection((host, int(port)), timeout=None)
        self.request = request
        self.hold = hold
        self.armed = threading.Event()  # the blob's GET went through on this connection

    def to_server(self, claim: Callable[[], bool], timeout: float) -> None:
        tail = b""
        try:
            while data := self.client.recv(BUF):
                seen = tail + data
                if not self.armed.is_set() and self.request.search(seen) and claim():
                    self.armed.set()  # before the request goes out: its answer comes after
                if self.then is not None and self.then.search(seen):
                    self.hold.holding.wait(timeout)
                tail = seen[-512:]
                self.server.sendall(data)
        except OSError:
            pass
        finally:
            _shut(self.client, self.server)

    def to_client(self, head: int, timeout: float) -> None:
        pending = b""
        try:
            while data := self.server.recv(BUF):
                if not self.armed.is_set() or self.hold.released.is_set():
                    self.client.sendall(data)
                    continue
                pending += data
                end = pending.find(b"\r\n\r\n")
                if end >= 0 and not pending.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 206 ")):
                    self.hold.release()  # an error or a redirect: nothing to hold
                    self.client.sendall(pending)
                    continue
                if end < 0 or len(pending) < end + 4 + head:
                    continue
                self.client.sendall(pending[: end + 4 + head])
                self.hold.holding.set()
                self.hold.released.wait(timeout)
                self.hold.released.set()  # timed out: stop holding anything
                self.client.sendall(pending[end + 4 + head :])
                pending = b""
        except OSError:
            pass
        finally:
            _shut(self.client, self.server)


@contextlib.contextmanager
def blob_hold(
    upstream: str,
    digest: str,
    *,
    head: int = 64 << 10,
    timeout: float = 60.0,
    then: str | None = None,
) -> Iterator[BlobHold]:
    """Proxy ``upstream`` (HOST:PORT) until the context ends, holding the first ``GET`` of
    blob ``digest`` after ``head`` bytes of its body. The blob must be larger than ``head``.
    ``then``: a blob whose ``GET``s go to the registry only once ``digest`` is held."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    hold = BlobHold(f"127.0.0.1:{listener.getsockname()[1]}")

    def get(d: str) -> re.Pattern[bytes]:
        return re.compile(rb"(?:^|\n)GET /v2/\S+/blobs/" + re.escape(d.encode()) + rb" ")

    request = get(digest)
    gate = get(then) if then is not None else None
    lock = threading.Lock()
    claimed = False

    def claim() -> bool:
        """The first GET of the blob is the one held."""
        nonlocal claimed
        with lock:
            first, claimed = not claimed, True
        return first

    done = threading.Event()
    threads: list[threading.Thread] = []
    conns: list[_Connection] = []

    def serve() -> None:
        while not done.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            try:
                c = _Connection(client, upstream, request, hold, gate)
            except OSError:
                client.close()
                continue
            conns.append(c)
            for target, args in ((c.to_server, (claim, timeout)), (c.to_client, (head, timeout))):
                t = threading.Thread(target=target, args=args, daemon=True)
                t.start()
                threads.append(t)

    acceptor = threading.Thread(target=serve, daemon=True, name="blob-hold")
    acceptor.start()
    try:
        yield hold
    finally:
        hold.release()
        done.set()
        acceptor.join()
        listener.close()
        for c in conns:
            _shut(c.client, c.server)
        for t in threads:
            t.join(timeout=10)
        for c in conns:
            c.client.close()
            c.server.close()
