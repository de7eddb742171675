"""Write an OCI image layout by hand, with layers whose tars carry OCI whiteouts.

The layout (oci-layout, index.json, blobs/sha256/...) follows the OCI image-spec: uncompressed
layer blobs (``application/vnd.oci.image.layer.v1.tar``, so digest = diffID), one manifest, one
config. ``podman pull oci:DIR:REF`` reads it without any registry.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Fixed mtime keeps the layer digests reproducible from run to run.
MTIME = 1_600_000_000

GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}


@dataclass(frozen=True)
class Entry:
    """One tar member: a dir (content None, not a link), a file, or a symlink."""

    name: str
    content: bytes | None = None
    mode: int = 0o755
    symlink: str | None = None


def d(name: str, mode: int = 0o755) -> Entry:
    return Entry(name, None, mode)


def f(name: str, content: str | bytes = b"", mode: int = 0o644) -> Entry:
    return Entry(name, content.encode() if isinstance(content, str) else content, mode)


def wh(parent: str, name: str) -> Entry:
    """OCI whiteout: hides ``parent/name`` in the layers below."""
    return f(f"{parent}/.wh.{name}".lstrip("/"), b"", 0o644)


def opq(parent: str) -> Entry:
    """OCI opaque marker: ``parent`` hides everything the layers below have in it."""
    return f(f"{parent}/.wh..wh..opq", b"", 0o644)


def layer_tar(entries: Sequence[Entry], rootfs: Path | None = None) -> bytes:
    """A tar of ``rootfs`` (all of it, numeric owner root) followed by ``entries``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if rootfs is not None:
            add_tree(tar, rootfs)
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mode, info.mtime, info.uid, info.gid = e.mode, MTIME, 0, 0
            if e.symlink is not None:
                info.type, info.linkname = tarfile.SYMTYPE, e.symlink
                tar.addfile(info)
            elif e.content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(e.content)
                tar.addfile(info, io.BytesIO(e.content))
    return buf.getvalue()


def add_tree(tar: tarfile.TarFile, root: Path) -> None:
    """Everything under ``root`` as members, numeric owner root, mtime MTIME."""
    for p in sorted(root.rglob("*")):
        info = tar.gettarinfo(str(p), arcname=str(p.relative_to(root)))
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = MTIME
        if info.isfile():
            with p.open("rb") as fh:
                tar.addfile(info, fh)
        else:
            tar.addfile(info)


def _blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest.split(":")[1]).write_bytes(data)
    return digest, len(data)


def write_layout(layout: Path, layers: Sequence[bytes], ref: str) -> None:
    """An OCI layout at ``layout``: one image tagged ``ref``, ``layers`` bottom first."""
    (layout / "blobs/sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    layer_descs = []
    for tar in layers:
        digest, size = _blob(layout, tar)
        layer_descs.append(
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size}
        )
    config = {
        "architecture": GOARCH.get(platform.machine(), platform.machine()),
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [x["digest"] for x in layer_descs]},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
    }
    cdigest, csize = _blob(layout, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": cdigest,
            "size": csize,
        },
        "layers": layer_descs,
    }
    mdigest, msize = _blob(layout, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": mdigest,
                "size": msize,
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))


def oci_archive(layout: Path, archive: Path, name: str) -> Path:
    """``layout`` as an OCI archive that ``ctr image import`` names ``name`` (containerd reads
    the image name from the io.containerd.image.name annotation, not the ref name)."""
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["annotations"]["io.containerd.image.name"] = name
    (layout / "index.json").write_text(json.dumps(index))
    with tarfile.open(archive, "w") as tar:
        for p in sorted(layout.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(layout)), recursive=False)
    return archive
