"""Registry authentication: credentials from the files podman and docker keep, and the
challenge flow registries use (anonymous, ``Basic``, and ``Bearer`` tokens).

Credentials are looked up, first match wins, in ``$REGISTRY_AUTH_FILE``,
``$XDG_RUNTIME_DIR/containers/auth.json``, ``~/.config/containers/auth.json`` (podman,
skopeo, buildah) and ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json`` (docker). An
entry is ``"auths": {"HOST": {"auth": base64("user:password")}}``; HOST may also be written as
a URL (``https://HOST/v1/``, as docker writes Docker Hub's). Credential helpers
(``credHelpers``, ``credsStore``) are not run.

The flow: a request goes out without credentials; a 401 carries ``WWW-Authenticate``. For
``Basic`` the request is repeated with the credentials; for ``Bearer realm=...,service=...,
scope=...`` a token is fetched from the realm (with the credentials as Basic, if any, else
anonymously) and the request repeated with it. Tokens are kept per realm, service and scope.

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
from collections.abc import Generator
from urllib.parse import urlsplit

import httpx

from layerfs.errors import LayerfsError


class AuthError(LayerfsError):
    """Credentials refused, or a challenge that cannot be answered."""


def auth_files() -> list[str]:
    """The credential files, in the order they are searched."""
    home = os.path.expanduser("~")
    files = []
    if env := os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(env)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        files.append(os.path.join(xdg, "containers", "auth.json"))
    files.append(os.path.join(home, ".config", "containers", "auth.json"))
    docker = os.environ.get("DOCKER_CONFIG") or os.path.join(home, ".docker")
    files.append(os.path.join(docker, "config.json"))
    return files


def _entry_host(key: str) -> str:
    if "://" in key:
        key = urlsplit(key).netloc
    return key.split("/", 1)[0]


def credentials(registry: str) -> tuple[str, str] | None:
    """(user, password) for ``registry`` (host[:port]) from the first file that has it."""
    wanted = {registry}
    if registry in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        wanted |= {"docker.io", "registry-1.docker.io", "index.docker.io"}
    for path in auth_files():
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        auths = data.get("auths") if isinstance(data, dict) else None
        if not isinstance(auths, dict):
            continue
        for key, entry in auths.items():
            if _entry_host(str(key)) not in wanted or not isinstance(entry, dict):
                continue
            token = entry.get("auth")
            if not isinstance(token, str) or not token:
                continue
            try:
                user, sep, password = base64.b64decode(token).decode().partition(":")
            except ValueError:
                raise AuthError(f"{path}: entry {key} is not base64 user:password") from None
            if sep:
                return user, password
    return None


_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y"`` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) or m.group(3) for m in _PARAM.finditer(rest)}
    return scheme.lower(), params


class RegistryAuth(httpx.Auth):
    """An httpx auth flow for one registry: answers Basic and Bearer challenges.

    ``scopes`` are added to every token request (e.g. ``repository:a/b:pull,push`` for a push,
    plus ``repository:c/d:pull`` for a cross-repository mount), beside the challenge's own.
    Thread-safe: pulls fetch blobs from several threads through one client.
    """

    # Only the token answer is read here (below): a blob's body must stream, not be read whole.
    requires_response_body = False

    def __init__(self, creds: tuple[str, str] | None, scopes: tuple[str, ...] = ()) -> None:
        self.creds = creds
        self.scopes = scopes
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str], str] = {}
        self._scheme: tuple[str, dict[str, str]] | None = None  # the last challenge seen

    def _basic(self) -> str:
        assert self.creds is not None
        raw = f"{self.creds[0]}:{self.creds[1]}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _authorize(self, request: httpx.Request) -> bool:
        """Add what the last challenge asked for, if it is known; True if something was."""
        with self._lock:
            scheme = self._scheme
            if scheme is None:
                return False
            if scheme[0] == "basic" and self.creds is not None:
                request.headers["Authorization"] = self._basic()
                return True
            if scheme[0] == "bearer":
                token = self._tokens.get(self._token_key(scheme[1]))
                if token is not None:
                    request.headers["Authorization"] = "Bearer " + token
                    return True
        return False

    def _token_key(self, params: dict[str, str]) -> tuple[str, str, str]:
        scopes = sorted({*self.scopes, *params.get("scope", "").split()} - {""})
        return params.get("realm", ""), params.get("service", ""), " ".join(scopes)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self._authorize(request)
        response = yield request
        if response.status_code != 401:
            return
        header = response.headers.get("WWW-Authenticate", "")
        scheme, params = parse_challenge(header)
        if scheme == "basic":
            if self.creds is None:
                return  # the 401 stands: the caller says "credentials needed"
            with self._lock:
                self._scheme = (scheme, params)
            request.headers["Authorization"] = self._basic()
            yield request
            return
        if scheme != "bearer" or "realm" not in params:
            return
        key = self._token_key(params)
        query: list[tuple[str, str | int | float | bool | None]] = []
        if key[1]:
            query.append(("service", key[1]))
        query += [("scope", s) for s in key[2].split()]
        token_request = httpx.Request("GET", params["realm"], params=query)
        if self.creds is not None:
            token_request.headers["Authorization"] = self._basic()
        token_response = yield token_request
        token_response.read()
        if token_response.status_code != 200:
            raise AuthError(
                f"token request to {params['realm']} refused: HTTP {token_response.status_code}"
                + (" (check the credentials)" if self.creds is not None else "")
            )
        try:
            body = json.loads(token_response.content)
            token = str(body.get("token") or body["access_token"])
        except (ValueError, KeyError, AttributeError):
            raise AuthError(f"token answer from {params['realm']} holds no token") from None
        with self._lock:
            self._tokens[key] = token
            self._scheme = (scheme, params)
        request.headers["Authorization"] = "Bearer " + token
        yield request
