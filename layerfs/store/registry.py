"""A client of the OCI distribution API (Docker Registry HTTP API v2), over httpx.

What a pull and a push need, and only that: manifests by tag or digest, blobs (HEAD, GET
streamed and verified, upload monolithic or in chunks, cross-repository mount), and the
manifest upload. HTTPS with the system's CAs; plain HTTP only for a registry on localhost
(``localhost``, ``127.0.0.1``, ``::1``) or with ``insecure`` (which also skips certificate
checks), tried after HTTPS fails to connect. Requests are retried with exponential back-off
on 5xx, 429 and dropped connections; a blob download cut off mid-way resumes with a Range
request where the registry honours it, and is verified against its digest and size as it
streams. Downloads that share a ``Cancel`` end together, at once: one that fails stops the
others even when they wait on a registry that sends nothing.

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urljoin

import httpx

from layerfs.errors import LayerfsError
from layerfs.store import oci
from layerfs.store.auth import AuthError, RegistryAuth, credentials
from layerfs.store.digest import DigestError

ACCEPT = ", ".join(
    [oci.MT_OCI_INDEX, oci.MT_OCI_MANIFEST, oci.MT_DOCKER_LIST, oci.MT_DOCKER_MANIFEST]
)
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
CHUNK = 1 << 20


class RegistryError(LayerfsError):
    """A registry that refused or failed a request."""


class Cancelled(RegistryError):
    """A download ended because its ``Cancel`` was set (another one failed, or Ctrl-C)."""


class Cancel:
    """A stop shared by several downloads. ``set()`` ends each of them at once: the sockets
    they read are shut down, which wakes a read blocked on a registry that sends nothing
    (where waiting for the next chunk would wait up to the read timeout, and closing the
    socket from another thread would not wake it), and each then raises ``Cancelled``
    instead of retrying. Sockets are learnt from httpx: the ``trace`` extension names each
    new connection's stream as it is made, the ``network_stream`` extension a response's."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._streams: list[object] = []

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def set(self) -> None:
        with self._lock:
            self._event.set()
            streams, self._streams = self._streams, []
        for stream in streams:
            _shutdown(stream)

    def watch(self, stream: object) -> None:
        """Shut ``stream`` down when the cancel is set (now, if it is already)."""
        if stream is None:
            return
        with self._lock:
            if not self._event.is_set():
                self._streams.append(stream)
                return
        _shutdown(stream)

    def trace(self, event: str, info: dict[str, Any]) -> None:
        """httpx's ``trace`` request extension: watch each connection as it is made (a read
        of the answer's headers can block too)."""
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            self.watch(info.get("return_value"))


def _shutdown(stream: object) -> None:
    get = getattr(stream, "get_extra_info", None)  # httpcore's network streams
    sock = get("socket") if get is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            # The plain socket call, also for TLS (SSLSocket.shutdown would unwrap first).
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def plain_http_allowed(host: str, insecure: bool) -> bool:
    """Plain HTTP only for localhost, or when asked for (``--insecure``)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    return insecure or name in LOCAL_HOSTS


class Registry:
    """One registry host; use as a context manager (it holds a connection pool)."""

    def __init__(
        self,
        host: str,
        *,
        insecure: bool = False,
        scopes: tuple[str, ...] = (),
        retries: int = 5,
        backoff: float = 0.5,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``transport``: httpx's, for tests that play a registry's part in-process."""
        self.host = host
        self.retries = retries
        self.backoff = backoff
        self.plain_ok = plain_http_allowed(host, insecure)
        verify: ssl.SSLContext | bool = False if insecure else ssl.create_default_context()
        self.auth = RegistryAuth(credentials(host), scopes)
        self.client = httpx.Client(
            auth=self.auth,
            follow_redirects=True,
            verify=verify,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            headers={"User-Agent": "layerfs"},
            transport=transport,
        )
        self._base: str | None = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    # -- plumbing --------------------------------------------------------------------------

    @property
    def base(self) -> str:
        """``https://HOST`` (or ``http://HOST`` where allowed and HTTPS does not connect)."""
        if self._base is None:
            base = f"https://{self.host}"
            try:
                self._request("GET", base + "/v2/", ok=(200, 401), retry=False)
                self._base = base
            except (httpx.ConnectError, RegistryError) as e:
                if not self.plain_ok:
                    raise RegistryError(
                        f"{self.host}: HTTPS failed ({_why(e)}); plain HTTP is used only "
                        "for localhost or with --insecure"
                    ) from None
                self._base = f"http://{self.host}"
        return self._base

    def url(self, path: str) -> str:
        return urljoin(self.base + "/", path)

    def _request(
        self,
        method: str,
        path: str,
        *,
        ok: tuple[int, ...] = (200,),
        retry: bool = True,
        **kw: Any,
    ) -> httpx.Response:
        """One request with retries; raise RegistryError unless the status is in ``ok``."""
        url = path if path.startswith(("http://", "https://")) else self.url(path)
        attempt = 0
        while True:
            try:
                response = self.client.request(method, url, **kw)
            except httpx.TransportError as e:
                if not retry or attempt >= self.retries:
                    if isinstance(e, httpx.ConnectError) and not retry:
                        raise
                    raise RegistryError(f"{method} {url}: {_why(e)}") from None
            else:
                if response.status_code in ok:
                    return response
                if not (retry and response.status_code in RETRY_STATUS) or (
                    attempt >= self.retries
                ):
                    raise self._error(response, method, url)
            self._sleep(attempt)
            attempt += 1

    def _delay(self, attempt: int) -> float:
        return float(min(self.backoff * 2.0**attempt, 8.0))

    def _sleep(self, attempt: int) -> None:
        time.sleep(self._delay(attempt))

    def _error(self, r: httpx.Response, method: str, url: str) -> LayerfsError:
        detail = ""
        try:
            errors = r.json().get("errors") or []
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        except (ValueError, AttributeError):
            pass
        if r.status_code == 401:
            hint = (
                "the credentials were refused"
                if self.auth.creds is not None
                else "credentials needed (podman login, or an auth.json / ~/.docker/config.json)"
            )
            return AuthError(f"{self.host}: {hint}" + (f" ({detail})" if detail else ""))
        what = detail or r.reason_phrase
        return RegistryError(f"{method} {url}: HTTP {r.status_code} {what}")

    # -- reading ---------------------------------------------------------------------------

    def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str]:
        """The manifest (or index) ``ref`` (tag or digest) of ``repo``: bytes, media type."""
        r = self._request(
            "GET", f"/v2/{repo}/manifests/{ref}", ok=(200, 404), headers={"Accept": ACCEPT}
        )
        if r.status_code == 404:
            raise RegistryError(f"{self.host}/{repo}: no manifest {ref!r} (not found)")
        if len(r.content) > oci.MAX_JSON:
            raise RegistryError(f"{self.host}/{repo}:{ref}: manifest is implausibly large")
        return r.content, r.headers.get("Content-Type", "").split(";")[0].strip()

    def get_small_blob(self, repo: str, desc: oci.Descriptor, what: str) -> bytes:
        """A config (or other JSON blob), checked against its descriptor."""
        if desc.size > oci.MAX_JSON:
            raise RegistryError(f"{what} {desc.digest}: size {desc.size} is implausibly large")
        data = self._request("GET", f"/v2/{repo}/blobs/{desc.digest}").content
        if len(data) != desc.size or _sha256(data) != desc.digest:
            raise DigestError(f"{what} {desc.digest} from {self.host}: digest or size mismatch")
        return data

    def has_blob(self, repo: str, digest: str) -> bool:
        r = self._request("HEAD", f"/v2/{repo}/blobs/{digest}", ok=(200, 404))
        return r.status_code == 200

    def download_blob(
        self,
        repo: str,
        desc: oci.Descriptor,
        path: str,
        progress: Callable[[int], None] | None = None,
        cancel: Cancel | None = None,
    ) -> None:
        """Stream blob ``desc`` into a new file ``path``, verified against its digest and size
        as it arrives (a longer stream is cut off at once). A connection lost mid-way is
        resumed with ``Range`` (or restarted, if the registry ignores it), ``retries`` times.
        ``cancel``: once set, the download ends at once with ``Cancelled``."""
        url = self.url(f"/v2/{repo}/blobs/{desc.digest}")
        h = hashlib.sha256()
        done = 0
        attempt = 0
        extensions = {"trace": cancel.trace} if cancel is not None else {}
        with open(path, "wb") as f:
            while True:
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"layer {desc.digest}: download stopped")
                headers = {"Range": f"bytes={done}-"} if done else {}
                try:
                    with self.client.stream(
                        "GET", url, headers=headers, extensions=extensions
                    ) as r:
                        if cancel is not None:
                            cancel.watch(r.extensions.get("network_stream"))
                        if r.status_code == 200 and done:
                            h, done = hashlib.sha256(), 0  # Range ignored: from the start
                            f.seek(0)
                            f.truncate()
                        elif r.status_code not in (200, 206):
                            r.read()
                            if r.status_code not in RETRY_STATUS or attempt >= self.retries:
                                raise self._error(r, "GET", url)
                            raise _Retry
                        for chunk in r.iter_bytes(CHUNK):
                            if done + len(chunk) > desc.size:
                                raise DigestError(
                                    f"blob {desc.digest} from {self.host} is longer than its "
                                    f"descriptor's {desc.size} bytes"
                                )
                            f.write(chunk)
                            h.update(chunk)
                            done += len(chunk)
                            if progress is not None:
                                progress(done)
                    if done == desc.size:
                        break
                    if attempt >= self.retries:
                        raise RegistryError(f"GET {url}: stream ended at {done}/{desc.size}")
                except (httpx.TransportError, _Retry) as e:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(f"layer {desc.digest}: download stopped") from None
                    if attempt >= self.retries:
                        raise RegistryError(f"GET {url}: {_why(e)}") from None
                if cancel is not None:
                    cancel.wait(self._delay(attempt))  # the back-off ends with the pull
                else:
                    self._sleep(attempt)
                attempt += 1
            f.flush()
            os.fsync(f.fileno())
        if "sha256:" + h.hexdigest() != desc.digest:
            raise DigestError(f"blob {desc.digest} from {self.host}: digest mismatch")

    # -- writing ---------------------------------------------------------------------------

    def upload_blob(
        self,
        repo: str,
        desc: oci.Descriptor,
        path: str,
        *,
        mount_from: str | None = None,
        chunk_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> str:
        """Make blob ``desc`` (file ``path``) exist in ``repo``: "exists" (HEAD found it),
        "mounted" (cross-repository mount from ``mount_from``) or "uploaded" (in one PUT, or
        in ``chunk_size`` PATCHes when the blob is larger)."""
        if self.has_blob(repo, desc.digest):
            return "exists"
        attempt = 0
        while True:
            try:
                return self._upload_once(repo, desc, path, mount_from, chunk_size, progress)
            except (RegistryError, httpx.TransportError) as e:
                # A failed upload session cannot be trusted: start a new one.
                if isinstance(e, AuthError) or attempt >= self.retries:
                    raise
                self._sleep(attempt)
                attempt += 1

    def _upload_once(
        self,
        repo: str,
        desc: oci.Descriptor,
        path: str,
        mount_from: str | None,
        chunk_size: int | None,
        progress: Callable[[int], None] | None,
    ) -> str:
        params = {"mount": desc.digest, "from": mount_from} if mount_from else None
        r = self._request("POST", f"/v2/{repo}/blobs/uploads/", ok=(201, 202), params=params)
        if r.status_code == 201:
            return "mounted"
        location = self.url(r.headers["Location"])
        octet = {"Content-Type": "application/octet-stream"}
        with open(path, "rb") as f:
            if chunk_size is None or desc.size <= chunk_size:
                body = _FileBody(f, desc.size, progress)
                headers = {**octet, "Content-Length": str(desc.size)}
                self._request(
                    "PUT",
                    _with_digest(location, desc.digest),
                    ok=(201,),
                    retry=False,
                    content=body,
                    headers=headers,
                )
                return "uploaded"
            offset = 0
            while offset < desc.size:
                data = f.read(min(chunk_size, desc.size - offset))
                headers = {
                    **octet,
                    "Content-Range": f"{offset}-{offset + len(data) - 1}",
                    "Content-Length": str(len(data)),
                }
                r = self._request(
                    "PATCH", location, ok=(202,), retry=False, content=data, headers=headers
                )
                location = self.url(r.headers["Location"])
                offset += len(data)
                if progress is not None:
                    progress(offset)
        self._request("PUT", _with_digest(location, desc.digest), ok=(201,), retry=False)
        return "uploaded"

    def put_manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> str:
        """Upload a manifest under tag (or digest) ``ref``; return its digest."""
        self._request(
            "PUT",
            f"/v2/{repo}/manifests/{ref}",
            ok=(201,),
            content=data,
            headers={"Content-Type": media_type},
        )
        return _sha256(data)


class _Retry(Exception):
    """A retryable status seen inside a streamed download."""


class _FileBody:
    """An upload body read from a file in chunks (httpx streams an iterable)."""

    def __init__(self, f: Any, size: int, progress: Callable[[int], None] | None) -> None:
        self.f, self.size, self.progress = f, size, progress

    def __iter__(self) -> Iterator[bytes]:
        self.f.seek(0)
        done = 0
        while data := self.f.read(CHUNK):
            done += len(data)
            if self.progress is not None:
                self.progress(done)
            yield data


def _with_digest(location: str, digest: str) -> str:
    # The upload URL carries the registry's own state (``_state=...``): keep it, add digest.
    # (httpx's ``params=`` would replace the query, not extend it.)
    return str(httpx.URL(location).copy_merge_params({"digest": digest}))


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _why(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0] if text else type(e).__name__
