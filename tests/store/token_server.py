"""A token server for the local registry's bearer auth (distribution's ``auth: token``), as
Docker Hub's auth.docker.io plays it: ``GET /token?service=S&scope=repository:R:pull,push``
with Basic credentials answers ``{"token": JWT}``, the JWT signed RS256 by a self-signed
certificate the registry trusts (``rootcertbundle``), carried in the header's ``x5c``.
Signing is openssl's (``openssl dgst -sha256 -sign``). Every request is recorded."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ISSUER = "layerfs-test-issuer"
SERVICE = "layerfs-test-registry"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    url: str  # the realm
    cert: Path
    user: str
    password: str
    requests: list[dict[str, object]] = field(default_factory=list)


def _keypair(root: Path) -> tuple[Path, Path, str]:
    key, cert = root / "token.key", root / "token.crt"
    req = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key)]
    subprocess.run(
        [*req, "-out", str(cert), "-days", "2", "-subj", "/CN=layerfs-token"],
        check=True,
        capture_output=True,
    )
    der = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-outform", "DER"], check=True, capture_output=True
    ).stdout
    return key, cert, base64.b64encode(der).decode()


def _sign(key: Path, data: bytes) -> bytes:
    return subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", str(key)],
        input=data,
        check=True,
        capture_output=True,
    ).stdout


@contextlib.contextmanager
def token_server(root: Path, user: str, password: str) -> Iterator[TokenServer]:
    root.mkdir(parents=True, exist_ok=True)
    key, cert, x5c = _keypair(root)
    basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            query = parse_qs(urlsplit(self.path).query)
            authed = self.headers.get("Authorization") == basic
            scopes = query.get("scope", [])
            server.requests.append(
                {"service": query.get("service"), "scope": scopes, "authed": authed}
            )
            if self.headers.get("Authorization") and not authed:
                self.send_response(401)
                self.end_headers()
                return
            access = []
            for scope in scopes:
                kind, _, rest = scope.partition(":")
                name, _, actions = rest.rpartition(":")
                # Anonymous: nothing; authenticated: what was asked for.
                access.append(
                    {"type": kind, "name": name, "actions": actions.split(",") if authed else []}
                )
            now = int(time.time())
            claims = {
                "iss": ISSUER,
                "sub": user if authed else "",
                "aud": SERVICE,
                "exp": now + 300,
                "nbf": now - 60,
                "iat": now,
                "jti": uuid.uuid4().hex,
                "access": access,
            }
            header = {"typ": "JWT", "alg": "RS256", "x5c": [x5c]}
            signing = (
                f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
            )
            token = f"{signing}.{_b64url(_sign(key, signing.encode()))}"
            body = json.dumps({"token": token, "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server = TokenServer(f"http://127.0.0.1:{httpd.server_address[1]}/token", cert, user, password)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
