"""Image references as registries name them: ``[REGISTRY/]REPO[:TAG|@sha256:DIGEST]``.

The rules are docker's (distribution/reference ``ParseNormalizedNamed``): the first component
names a registry when it holds a ``.`` or a ``:`` or is ``localhost``; otherwise the registry is
Docker Hub (``docker.io``), where a one-component name lives under ``library/``. No tag and no
digest means ``latest``.

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from layerfs.errors import LayerfsError
from layerfs.store.digest import parse_digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")


class ReferenceError(LayerfsError):
    """A name that is not an image reference."""


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed reference: ``registry`` (host[:port]), ``repository``, and a tag or digest."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str, *, default_tag: str | None = "latest") -> Reference:
        name, digest = text, None
        if "@" in text:
            name, _, digest = text.partition("@")
            try:
                parse_digest(digest)
            except LayerfsError:
                raise ReferenceError(f"{text!r}: bad digest {digest!r}") from None
        tag = None
        last = name.rsplit("/", 1)[-1]
        if ":" in last:
            name, _, tag = name.rpartition(":")
            if not _TAG.fullmatch(tag):
                raise ReferenceError(f"{text!r}: bad tag {tag!r}")
        first, sep, rest = name.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            registry, repo = first, rest
        else:
            registry, repo = DOCKER_HUB, name
        if registry == "index.docker.io":
            registry = DOCKER_HUB  # Docker's own alias of the Hub, whatever the name's depth
        if registry == DOCKER_HUB and "/" not in repo:
            repo = "library/" + repo
        if not repo or not all(_COMPONENT.fullmatch(c) for c in repo.split("/")):
            raise ReferenceError(f"{text!r}: bad repository {repo!r} (a-z, 0-9, '._-' inside)")
        if tag is None and digest is None:
            tag = default_tag
        return cls(registry, repo, tag, digest)

    @property
    def name(self) -> str:
        """``registry/repository``, as the store tags it."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """Where the registry's API answers (Docker Hub's is not ``docker.io``)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What to ask the manifests endpoint for: the digest if given, else the tag."""
        ref = self.digest or self.tag
        assert ref is not None
        return ref

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += ":" + self.tag
        if self.digest:
            out += "@" + self.digest
        return out
