"""A private local registry for the tests: Debian's ``docker-registry`` (distribution 2.8) on
127.0.0.1 with a free port and its own storage, optionally behind htpasswd (bcrypt) auth, and
skopeo to fill it from OCI layouts built by ``ocitools``. Its log is kept: the tests read it
to count which blobs were fetched."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from store.token_server import ISSUER, SERVICE, TokenServer

START_TIMEOUT = 30.0


def registry_binary() -> str | None:
    return shutil.which("docker-registry") or shutil.which("registry")


@dataclass
class LocalRegistry:
    host: str  # 127.0.0.1:PORT
    root: Path
    log: Path
    user: str | None = None
    password: str | None = None

    def skopeo_copy(
        self, src: str, repo_tag: str, *, all_images: bool = False, docker_v2s2: bool = False
    ) -> None:
        """``skopeo copy SRC docker://HOST/REPO:TAG`` (plain HTTP; ``docker_v2s2``: as a
        Docker schema 2 manifest; else the layout's digests are kept)."""
        cmd = ["skopeo", "copy", "--dest-tls-verify=false"]
        # Same bytes in the registry as in the layout (skopeo would gzip a plain layer).
        cmd += ["--format", "v2s2"] if docker_v2s2 else ["--preserve-digests"]
        if self.user is not None:
            cmd.append(f"--dest-creds={self.user}:{self.password}")
        if all_images:
            cmd.append("--all")
        cmd += [src, f"docker://{self.host}/{repo_tag}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{cmd}: {r.stderr}"

    def blob_gets(self, digest: str) -> int:
        """How many GETs of blob ``digest`` the registry has answered with data."""
        n = 0
        for line in self.log.read_text(errors="replace").splitlines():
            if f"/blobs/{digest}" in line and '"GET ' in line and '" 200 ' in line:
                n += 1
        return n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _htpasswd(path: Path, user: str, password: str) -> None:
    if shutil.which("htpasswd") is not None:
        subprocess.run(
            ["htpasswd", "-Bbc", str(path), user, password], check=True, capture_output=True
        )
        return
    import bcrypt  # type: ignore[import-not-found]

    digest = bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
    path.write_text(f"{user}:{digest}\n")


@contextlib.contextmanager
def local_registry(
    root: Path, *, auth: bool = False, port: int | None = None, token: TokenServer | None = None
) -> Iterator[LocalRegistry]:
    """Run a registry under ``root`` until the context ends (on ``port``, else a free one;
    the same ``root`` and port again: the same registry, restarted). ``auth``: htpasswd;
    ``token``: bearer tokens from that token server."""
    binary = registry_binary()
    assert binary is not None
    port = port or _free_port()
    root.mkdir(parents=True, exist_ok=True)
    storage = root / "storage"
    storage.mkdir(exist_ok=True)
    config = [
        "version: 0.1",
        "log:",
        "  level: info",
        "  accesslog:",
        "    disabled: false",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {storage}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: 127.0.0.1:{port}",
    ]
    user = password = None
    if token is not None:
        user, password = token.user, token.password
        config += [
            "auth:",
            "  token:",
            f"    realm: {token.url}",
            f"    service: {SERVICE}",
            f"    issuer: {ISSUER}",
            f"    rootcertbundle: {token.cert}",
        ]
    if auth:
        user, password = "layerfs-registry", "s3cret-registry"
        _htpasswd(root / "htpasswd", user, password)
        config += [
            "auth:",
            "  htpasswd:",
            "    realm: layerfs-test",
            f"    path: {root / 'htpasswd'}",
        ]
    (root / "config.yml").write_text("\n".join(config) + "\n")
    log = root / "registry.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [binary, "serve", str(root / "config.yml")],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    reg = LocalRegistry(f"127.0.0.1:{port}", root, log, user, password)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                urllib.request.urlopen(f"http://{reg.host}/v2/", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # 401: up, and asking for credentials
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"registry did not start: {log.read_text(errors='replace')[-2000:]}"
                    ) from None
                time.sleep(0.1)
        yield reg
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def auth_file(path: Path, host: str, user: str, password: str) -> Path:
    """Write a podman-style auth.json for ``host``."""
    import base64
    import json

    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    os.chmod(path, 0o600)
    return path
