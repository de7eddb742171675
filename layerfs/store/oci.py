"""OCI image layouts: index, manifest and config parsing, media types, platform matching.

Reads an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/*``) and follows a
reference to one image manifest, through nested indexes (manifest lists), choosing the entry
whose platform matches. Every JSON blob read here is checked against the digest and size of
the descriptor that led to it. Docker schema-2 media types are accepted beside OCI ones,
since ``podman save``/``skopeo copy`` may emit either.

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import json
import os
import platform as _platform
from dataclasses import dataclass

from layerfs.errors import LayerfsError
from layerfs.store.digest import DigestError, parse_digest, sha256_bytes

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

INDEX_TYPES = frozenset({MT_OCI_INDEX, MT_DOCKER_LIST})
MANIFEST_TYPES = frozenset({MT_OCI_MANIFEST, MT_DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({MT_OCI_CONFIG, MT_DOCKER_CONFIG})

# Layer media type -> compression ("none", "gzip", "zstd").
LAYER_TYPES: dict[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
LAYER_MEDIA_TYPE = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
REF_NAME = "org.opencontainers.image.ref.name"
MAX_JSON = 16 << 20  # manifests and configs are small; refuse absurd descriptors


class OciError(LayerfsError):
    """A layout, index, manifest or config that cannot be used."""


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, its digest and its size."""

    media_type: str
    digest: str
    size: int

    @classmethod
    def parse(cls, obj: object, what: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise OciError(f"{what}: descriptor is not an object")
        mt, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        if not isinstance(mt, str) or not isinstance(size, int) or size < 0:
            raise OciError(f"{what}: descriptor lacks mediaType or size")
        parse_digest(str(digest))
        return cls(mt, str(digest), size)

    def to_json(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True, slots=True)
class Platform:
    """``os/architecture[/variant]``, as in an index entry's ``platform``."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise OciError(f"bad platform {text!r}: want os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> Platform:
        machine = _platform.machine().lower()
        arch, variant = _ARCH.get(machine, (machine, None))
        return cls("linux", arch, variant)

    def matches(self, obj: object) -> bool:
        """Whether an index entry's ``platform`` object fits this platform.

        With no variant requested any variant fits; a requested variant must be named by
        the entry (arm64's implicit v8 aside).
        """
        if not isinstance(obj, dict):
            return False
        if obj.get("os") != self.os or obj.get("architecture") != self.architecture:
            return False
        their = obj.get("variant")
        if self.variant is None:
            return True
        if their is None:
            # arm64 images rarely name their (only) variant v8.
            return self.architecture == "arm64" and self.variant == "v8"
        return bool(their == self.variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


_ARCH: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i686": ("386", None),
    "i386": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    """One image manifest found in a layout, with its parsed manifest and config."""

    manifest_desc: Descriptor
    manifest_bytes: bytes
    manifest: dict[str, object]
    config_desc: Descriptor
    config_bytes: bytes
    config: dict[str, object]
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]


def split_layout_ref(arg: str) -> tuple[str, str | None]:
    """Split ``[oci:|oci-archive:|docker-archive:]PATH[:TAG]`` into (PATH, TAG); PATH is a
    layout directory, a tar of one, or a docker archive. A colon is a tag separator only when
    the part before it exists and the whole does not (paths may contain colons)."""
    for prefix in ("oci:", "oci-archive:", "docker-archive:"):
        arg = arg.removeprefix(prefix)
    if os.path.exists(arg):
        return arg, None
    head, sep, tag = arg.partition(":")
    if sep and os.path.exists(head):
        return head, tag or None
    raise OciError(f"{arg}: no such OCI layout directory or archive")


class Layout:
    """Read access to one OCI image layout directory."""

    def __init__(self, path: str) -> None:
        self.path = path
        marker = os.path.join(path, "oci-layout")
        try:
            with open(marker, "rb") as f:
                info = json.loads(f.read(MAX_JSON))
        except FileNotFoundError:
            raise OciError(f"{path}: no oci-layout file (not an OCI image layout)") from None
        except ValueError as e:
            raise OciError(f"{marker}: invalid JSON: {e}") from None
        if not isinstance(info, dict) or "imageLayoutVersion" not in info:
            raise OciError(f"{marker}: missing imageLayoutVersion")

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.path, "blobs", "sha256", parse_digest(digest))

    def read_json_blob(self, desc: Descriptor, what: str) -> tuple[bytes, dict[str, object]]:
        """Read a small JSON blob, verify size and digest, parse it."""
        if desc.size > MAX_JSON:
            raise OciError(f"{what} {desc.digest}: size {desc.size} is implausibly large")
        try:
            with open(self.blob_path(desc.digest), "rb") as f:
                data = f.read(desc.size + 1)
        except FileNotFoundError:
            raise OciError(f"{what} blob {desc.digest} is missing from {self.path}") from None
        if len(data) != desc.size:
            raise DigestError(f"{what} {desc.digest}: size {len(data)} != descriptor {desc.size}")
        if sha256_bytes(data) != desc.digest:
            raise DigestError(f"{what} {desc.digest}: digest mismatch (blob was modified)")
        return data, parse_json(data, what)

    def index(self) -> dict[str, object]:
        try:
            with open(os.path.join(self.path, "index.json"), "rb") as f:
                return parse_json(f.read(MAX_JSON), "index.json")
        except FileNotFoundError:
            raise OciError(f"{self.path}: no index.json") from None

    def resolve(self, tag: str | None, platform: Platform) -> ResolvedImage:
        """Follow ``tag`` (or the only image) through indexes to one image manifest."""
        entries = _manifests(self.index(), "index.json")
        if tag is not None:
            chosen = [e for e in entries if _annotations(e).get(REF_NAME) == tag]
            if not chosen:
                names = sorted({str(_annotations(e).get(REF_NAME)) for e in entries})
                raise OciError(f"{self.path}: no tag {tag!r} (tags: {', '.join(names)})")
        else:
            chosen = entries
        desc = self._pick(chosen, platform, "index.json")
        for _depth in range(8):
            if desc.media_type in MANIFEST_TYPES:
                return self._image(desc)
            if desc.media_type not in INDEX_TYPES:
                raise OciError(f"unknown manifest media type {desc.media_type!r}")
            _, idx = self.read_json_blob(desc, "index")
            desc = self._pick(_manifests(idx, desc.digest), platform, desc.digest)
        raise OciError("indexes nested too deeply")

    def _pick(self, entries: list[dict[str, object]], platform: Platform, what: str) -> Descriptor:
        return pick_manifest(entries, platform, what)

    def _image(self, desc: Descriptor) -> ResolvedImage:
        mbytes, manifest = self.read_json_blob(desc, "manifest")
        config_desc = Descriptor.parse(manifest.get("config"), "manifest config")
        if config_desc.media_type not in CONFIG_TYPES:
            raise OciError(f"unknown config media type {config_desc.media_type!r}")
        raw_layers = manifest.get("layers")
        if not isinstance(raw_layers, list):
            raise OciError(f"manifest {desc.digest}: no layers list")
        layers = tuple(Descriptor.parse(d, "manifest layer") for d in raw_layers)
        for layer in layers:
            if layer.media_type not in LAYER_TYPES:
                raise OciError(f"layer {layer.digest}: unknown media type {layer.media_type!r}")
        cbytes, config = self.read_json_blob(config_desc, "config")
        diff_ids = config_diff_ids(config)
        if len(diff_ids) != len(layers):
            raise OciError(
                f"config lists {len(diff_ids)} diff_ids for {len(layers)} manifest layers"
            )
        return ResolvedImage(desc, mbytes, manifest, config_desc, cbytes, config, layers, diff_ids)


def pick_manifest(entries: list[dict[str, object]], platform: Platform, what: str) -> Descriptor:
    """The entry of an index for ``platform``; the error lists the platforms there are."""
    if not entries:
        raise OciError(f"{what}: no manifests")
    with_platform = [e for e in entries if "platform" in e]
    if len(entries) == 1 and not with_platform:
        return Descriptor.parse(entries[0], what)
    matching = [e for e in entries if platform.matches(e.get("platform"))]
    if not matching:
        if not with_platform:
            raise OciError(f"{what}: {len(entries)} images and no tag given; name a tag")
        have = sorted(_platform_str(e.get("platform")) for e in with_platform)
        raise OciError(f"{what}: no manifest for platform {platform} (has: {', '.join(have)})")
    if len(matching) > 1:
        # Prefer an exact variant match over an entry with no variant.
        exact = [e for e in matching if _variant(e) == platform.variant]
        matching = exact or matching
    return Descriptor.parse(matching[0], what)


def index_entries(index: dict[str, object], what: str) -> list[dict[str, object]]:
    """The ``manifests`` of an image index (manifest list)."""
    return _manifests(index, what)


def config_diff_ids(config: dict[str, object]) -> tuple[str, ...]:
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise OciError("config has no rootfs of type 'layers'")
    ids = rootfs.get("diff_ids")
    if not isinstance(ids, list):
        raise OciError("config rootfs has no diff_ids")
    for d in ids:
        parse_digest(str(d))
    return tuple(str(d) for d in ids)


def parse_json(data: bytes, what: str) -> dict[str, object]:
    """``data`` as a JSON object, or an OciError naming ``what``."""
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise OciError(f"{what}: invalid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise OciError(f"{what}: not a JSON object")
    return obj


def _manifests(index: dict[str, object], what: str) -> list[dict[str, object]]:
    entries = index.get("manifests")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise OciError(f"{what}: no manifests list")
    return entries


def _annotations(entry: dict[str, object]) -> dict[str, object]:
    ann = entry.get("annotations")
    return ann if isinstance(ann, dict) else {}


def _variant(entry: dict[str, object]) -> object:
    p = entry.get("platform")
    return p.get("variant") if isinstance(p, dict) else None


def _platform_str(p: object) -> str:
    if not isinstance(p, dict):
        return "?"
    return "/".join(str(p[k]) for k in ("os", "architecture", "variant") if p.get(k))


def canonical_json(obj: object) -> bytes:
    """Serialise a manifest or config the way it is stored and hashed (compact, sorted)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
