"""Docker archives (``docker save``, ``podman save --format docker-archive``), read as skopeo
reads them: ``manifest.json`` lists, per image, its config file, its layer tars (bottom first)
and its ``RepoTags``.

The archive has no manifest of its own, so one is made here (OCI, canonical JSON) for the
config and layers as they are: the config keeps its bytes and digest (docker names it by
that digest, which is checked where the name says it), each layer is described by the sha256
and size of its file (a plain tar, whose digest is then its diffID, or gzip/zstd as the file's
magic says), and the import then checks every layer against the config's diffIDs while it
extracts, as for a layout.

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from layerfs.store import oci
from layerfs.store.digest import sha256_bytes, sha256_file

MANIFEST = "manifest.json"
_HEX = re.compile(r"(?:^|/)([0-9a-f]{64})(?:\.json)?$")


@dataclass(frozen=True, slots=True)
class ArchiveImage:
    """One image of a docker archive: the image as a layout would resolve it, where each
    layer's file is, and the archive's tags for it."""

    image: oci.ResolvedImage
    blob_paths: dict[str, str]
    repo_tags: tuple[str, ...]


def is_docker_archive(path: str) -> bool:
    """A directory with ``manifest.json`` and no ``oci-layout`` (docker 25+ writes both: its
    archives are OCI layouts too, and are read as such)."""
    return os.path.isfile(os.path.join(path, MANIFEST)) and not os.path.exists(
        os.path.join(path, "oci-layout")
    )


def _inside(root: str, name: object, what: str) -> str:
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/"):
        raise oci.OciError(f"docker archive: bad {what} path {name!r}")
    path = os.path.join(root, name)
    if not os.path.isfile(path) or os.path.islink(path):
        raise oci.OciError(f"docker archive: {what} {name!r} is missing")
    return path


def _compression(path: str) -> str:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    if magic == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


def read(root: str, tag: str | None, source: str) -> ArchiveImage:
    """The image named ``tag`` (one of its RepoTags, or the only image when None) in the
    unpacked docker archive at ``root``; ``source`` names the archive in messages."""
    try:
        with open(os.path.join(root, MANIFEST), "rb") as f:
            entries = json.loads(f.read(oci.MAX_JSON))
    except ValueError as e:
        raise oci.OciError(f"{source}: {MANIFEST}: invalid JSON: {e}") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise oci.OciError(f"{source}: {MANIFEST} is not a list of images")
    if tag is not None:
        found = [e for e in entries if tag in (e.get("RepoTags") or [])]
        if not found:
            found = [
                e
                for e in entries
                if any(str(t).endswith("/" + tag) for t in e.get("RepoTags") or [])
            ]
    else:
        found = entries if len(entries) == 1 else []
    if len(found) != 1:
        names = sorted(str(t) for e in entries for t in e.get("RepoTags") or [])
        want = f"no image {tag!r}" if tag is not None else f"{len(entries)} images, name one"
        raise oci.OciError(f"{source}: {want} (has: {', '.join(names) or 'no tags'})")
    entry = found[0]

    config_path = _inside(root, entry.get("Config"), "config")
    with open(config_path, "rb") as f:
        config_bytes = f.read(oci.MAX_JSON + 1)
    if len(config_bytes) > oci.MAX_JSON:
        raise oci.OciError(f"{source}: config is implausibly large")
    config_digest = sha256_bytes(config_bytes)
    named = _HEX.search(str(entry["Config"]))
    if named is not None and "sha256:" + named.group(1) != config_digest:
        raise oci.OciError(f"{source}: config {entry['Config']} does not match its name")
    config = oci.parse_json(config_bytes, f"{source}: config")
    diff_ids = oci.config_diff_ids(config)
    names = entry.get("Layers")
    if not isinstance(names, list) or len(names) != len(diff_ids):
        raise oci.OciError(f"{source}: the image lists other layers than its config's diff_ids")

    layers, paths = [], {}
    for name in names:
        path = _inside(root, name, "layer")
        digest, size = sha256_file(path)
        media_type = oci.LAYER_MEDIA_TYPE[_compression(path)]
        layers.append(oci.Descriptor(media_type, digest, size))
        paths[digest] = path
    config_desc = oci.Descriptor(oci.MT_OCI_CONFIG, config_digest, len(config_bytes))
    manifest: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": oci.MT_OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [d.to_json() for d in layers],
    }
    mbytes = oci.canonical_json(manifest)
    mdesc = oci.Descriptor(oci.MT_OCI_MANIFEST, sha256_bytes(mbytes), len(mbytes))
    image = oci.ResolvedImage(
        mdesc, mbytes, manifest, config_desc, config_bytes, config, tuple(layers), diff_ids
    )
    tags = tuple(str(t) for t in entry.get("RepoTags") or [])
    return ArchiveImage(image, paths, tags)
