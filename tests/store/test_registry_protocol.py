"""The registry client's protocol paths the local docker-registry does not exercise: the
token cache and the token server's refusal, 5xx answers, a blob stream cut off mid-way, a
tampered layer among several downloads. httpx's MockTransport plays the registry: no
filesystem is mocked."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from layerfs.store import oci
from layerfs.store.auth import AuthError, parse_challenge
from layerfs.store.digest import DigestError
from layerfs.store.progress import LayerLines
from layerfs.store.pull import pull
from layerfs.store.registry import Cancel, Cancelled, Registry
from layerfs.store.store import Store
from store.conftest import store_is_empty
from store.ocitools import E, write_image

BLOB = os.urandom(3 << 20)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
DESC = oci.Descriptor("application/vnd.oci.image.layer.v1.tar", DIGEST, len(BLOB))
TOKEN_URL = "https://auth.example/token"


class Registry401:
    """A registry behind a token server that wants user:pass for pull scope."""

    def __init__(self) -> None:
        self.token_requests: list[httpx.URL] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            self.token_requests.append(request.url)
            basic = "Basic " + base64.b64encode(b"user:pass").decode()
            if request.headers.get("Authorization") != basic:
                return httpx.Response(401)
            scope = request.url.params.get("scope")
            return httpx.Response(200, json={"token": f"tok:{scope}"})
        if request.headers.get("Authorization") != "Bearer tok:repository:a/b:pull":
            challenge = (
                f'Bearer realm="{TOKEN_URL}",service="reg.example",scope="repository:a/b:pull"'
            )
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        if request.url.path == "/v2/":
            return httpx.Response(200)
        return httpx.Response(200, content=BLOB)


def _auth_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, creds: bytes | None) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("XDG_RUNTIME_DIR", "DOCKER_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "auth.json"
    auths = {"reg.example": {"auth": base64.b64encode(creds).decode()}} if creds else {}
    path.write_text(json.dumps({"auths": auths}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(path))


def test_bearer_challenge_flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _auth_env(tmp_path, monkeypatch, b"user:pass")
    fake = Registry401()
    with Registry("reg.example", transport=httpx.MockTransport(fake), backoff=0) as reg:
        reg.download_blob("a/b", DESC, str(tmp_path / "blob"))
        reg.download_blob("a/b", DESC, str(tmp_path / "blob2"))
    assert (tmp_path / "blob").read_bytes() == BLOB
    # One token for both requests (kept per realm, service and scope), fetched with Basic.
    assert len(fake.token_requests) == 1
    assert fake.token_requests[0].params.get("service") == "reg.example"


def test_bearer_wrong_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _auth_env(tmp_path, monkeypatch, b"user:wrong")
    with (
        Registry("reg.example", transport=httpx.MockTransport(Registry401()), backoff=0) as reg,
        pytest.raises(AuthError, match="check the credentials"),
    ):
        reg.download_blob("a/b", DESC, str(tmp_path / "blob"))


def test_parse_challenge() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/alpine:pull",
    }


class _CutStream(httpx.SyncByteStream):
    def __init__(self, data: bytes, cut: int) -> None:
        self.data, self.cut = data, cut

    def __iter__(self) -> Iterator[bytes]:
        yield self.data[: self.cut]
        raise httpx.ReadError("connection reset by peer")


def test_retries_5xx_and_resumes_cut_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two 503s, then a stream cut at 1 MiB: the download retries and resumes with Range
    (the registry sees ``bytes=1048576-``), and the file is the blob, verified."""
    _auth_env(tmp_path, monkeypatch, None)
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        rng = request.headers.get("Range", "")
        seen.append(rng)
        if request.url.path == "/v2/":
            return httpx.Response(200)
        if len(seen) <= 3:
            return httpx.Response(503)
        if not rng:
            return httpx.Response(200, stream=_CutStream(BLOB, 1 << 20))
        start = int(rng.removeprefix("bytes=").rstrip("-"))
        return httpx.Response(206, content=BLOB[start:])

    with Registry("reg.example", transport=httpx.MockTransport(handler), backoff=0) as reg:
        reg.download_blob("a/b", DESC, str(tmp_path / "blob"))
    assert (tmp_path / "blob").read_bytes() == BLOB
    assert seen[-1] == f"bytes={1 << 20}-"


def test_tampered_blob_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _auth_env(tmp_path, monkeypatch, None)
    bad = bytearray(BLOB)
    bad[100] ^= 1

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, content=bytes(bad) + (b"x" if "long" in str(request.url) else b"")
        )

    with Registry("reg.example", transport=httpx.MockTransport(handler), backoff=0) as reg:
        with pytest.raises(DigestError, match="digest mismatch"):
            reg.download_blob("a/b", DESC, str(tmp_path / "blob"))
        with pytest.raises(DigestError, match="longer"):
            reg.download_blob("long/b", DESC, str(tmp_path / "blob"))


def test_pull_raises_the_refused_layers_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three layers downloaded at once, the second refused (a flipped byte): once the
    downloads have ended the pull raises that layer's digest error (not another download's
    "stopped"), and the store holds nothing."""
    _auth_env(tmp_path, monkeypatch, None)
    layout = tmp_path / "layout"
    layers = [[E(n, data=os.urandom(2 << 20))] for n in ("a", "b", "c")]
    write_image(layout, layers, tag="t", compression="none")
    blobs = layout / "blobs/sha256"
    top = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    manifest = (blobs / top[7:]).read_bytes()
    bad = json.loads(manifest)["layers"][1]["digest"]

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v2/":
            return httpx.Response(200)
        if "/manifests/" in path:
            return httpx.Response(200, content=manifest)
        digest = path.rsplit("/", 1)[1]
        data = (blobs / digest[7:]).read_bytes()
        if digest == bad:
            data = data[:-1] + bytes([data[-1] ^ 1])
        return httpx.Response(200, content=data)

    store = Store(str(tmp_path / "store"))
    out = io.StringIO()
    with (
        Registry("reg.example", transport=httpx.MockTransport(handler), backoff=0) as reg,
        pytest.raises(DigestError, match=f"blob {bad} .*digest mismatch"),
    ):
        pull(store, "reg.example/a/b:1", registry=reg, jobs=3, lines=LayerLines(out))
    assert store_is_empty(store)


def test_cancel_wakes_a_download_waiting_for_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry that accepts the connection and sends nothing, not even the answer's
    headers: setting the download's Cancel ends it at once (the socket, learnt from httpx's
    trace as the connection was made, is shut down), not at the read timeout."""
    _auth_env(tmp_path, monkeypatch, None)
    silent = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True).start()
    host = f"127.0.0.1:{silent.getsockname()[1]}"
    cancel = Cancel()
    try:
        with Registry(host, timeout=60.0) as reg:
            reg._base = f"http://{host}"  # no HTTPS probe: straight to the blob
            threading.Timer(0.5, cancel.set).start()
            start = time.monotonic()
            with pytest.raises(Cancelled):
                reg.download_blob("a/b", DESC, str(tmp_path / "blob"), cancel=cancel)
            assert time.monotonic() - start < 30  # not the read timeout's 60 s
    finally:
        for s in [silent, *held]:
            s.close()


def test_https_only_unless_local() -> None:
    from layerfs.store.registry import plain_http_allowed

    assert plain_http_allowed("localhost:5000", False)
    assert plain_http_allowed("127.0.0.1:5000", False)
    assert plain_http_allowed("[::1]:5000", False)
    assert not plain_http_allowed("registry.example:5000", False)
    assert not plain_http_allowed("10.0.0.1", False)
    assert plain_http_allowed("registry.example:5000", True)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("alpine", ("docker.io", "library/alpine", "latest", None)),
        ("user/app:1.2", ("docker.io", "user/app", "1.2", None)),
        ("localhost:5000/a/b", ("localhost:5000", "a/b", "latest", None)),
        ("127.0.0.1:5000/x:t", ("127.0.0.1:5000", "x", "t", None)),
        ("quay.io/org/img@sha256:" + "a" * 64, ("quay.io", "org/img", None, "sha256:" + "a" * 64)),
        ("localhost/img:v1", ("localhost", "img", "v1", None)),
        ("docker.io/alpine", ("docker.io", "library/alpine", "latest", None)),
        ("index.docker.io/alpine", ("docker.io", "library/alpine", "latest", None)),
        ("index.docker.io/foo/bar:2", ("docker.io", "foo/bar", "2", None)),
    ],
)
def test_reference_parse(text: str, want: tuple[str, str, str | None, str | None]) -> None:
    from layerfs.store.reference import Reference

    r = Reference.parse(text)
    assert (r.registry, r.repository, r.tag, r.digest) == want


@pytest.mark.parametrize("text", ["Upper/case", "a//b", "img:bad tag", "img@sha256:12"])
def test_reference_refused(text: str) -> None:
    from layerfs.store.reference import Reference, ReferenceError

    with pytest.raises(ReferenceError):
        Reference.parse(text)
