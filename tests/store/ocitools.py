"""Test helpers: build OCI image layouts and layer tars from declarative entries, and snapshot
trees for comparison. Written independently of layerfs.store so the tests do not check the
store against itself."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_MT = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
MTIME_NS = 1_600_000_000_123_456_789


@dataclass
class E:
    """One tar entry. kind: f file, d dir, l symlink, h hard link, c/b device, p fifo."""

    name: str
    kind: str = "f"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = MTIME_NS
    link: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    dev: tuple[int, int] = (0, 0)


_TYPES = {
    "f": tarfile.REGTYPE,
    "d": tarfile.DIRTYPE,
    "l": tarfile.SYMTYPE,
    "h": tarfile.LNKTYPE,
    "c": tarfile.CHRTYPE,
    "b": tarfile.BLKTYPE,
    "p": tarfile.FIFOTYPE,
}


def make_tar(entries: list[E]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = _TYPES[e.kind]
            ti.mode, ti.uid, ti.gid = e.mode, e.uid, e.gid
            ti.mtime = e.mtime_ns // 10**9
            ti.pax_headers = {"mtime": f"{e.mtime_ns // 10**9}.{e.mtime_ns % 10**9:09d}"}
            for k, v in e.xattrs.items():
                ti.pax_headers["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
            ti.linkname = e.link
            ti.devmajor, ti.devminor = e.dev
            if e.kind == "f":
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    return data


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put_blob(layout: Path, data: bytes) -> str:
    d = sha(data)
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / d[7:]).write_bytes(data)
    return d


def _init(layout: Path) -> None:
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    if not (layout / "index.json").exists():
        (layout / "index.json").write_text('{"schemaVersion": 2, "manifests": []}')


def add_index_entry(layout: Path, desc: dict[str, object], tag: str | None) -> None:
    index = json.loads((layout / "index.json").read_text())
    entry = dict(desc)
    if tag:
        entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
    index["manifests"].append(entry)
    (layout / "index.json").write_text(json.dumps(index))


def write_image(
    layout: Path,
    layers: Sequence[list[E] | bytes],
    *,
    tag: str | None = "latest",
    compression: str = "gzip",
    arch: str = "amd64",
    diff_ids: list[str] | None = None,
    layer_media_type: str | None = None,
    manifest_media_type: str = MT_MANIFEST,
    config_media_type: str = MT_CONFIG,
) -> dict[str, object]:
    """Write an image (layers as entry lists or raw tar bytes); return its manifest descriptor.

    With ``tag`` None the image is not added to index.json (for building an index of it).
    """
    _init(layout)
    descs, ids = [], []
    for layer in layers:
        tar = layer if isinstance(layer, bytes) else make_tar(layer)
        blob = compress(tar, compression)
        descs.append(
            {
                "mediaType": layer_media_type or LAYER_MT[compression],
                "digest": put_blob(layout, blob),
                "size": len(blob),
            }
        )
        ids.append(sha(tar))
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids or ids},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
    }
    cbytes = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_media_type,
        "config": {
            "mediaType": config_media_type,
            "digest": put_blob(layout, cbytes),
            "size": len(cbytes),
        },
        "layers": descs,
    }
    mbytes = json.dumps(manifest).encode()
    desc: dict[str, object] = {
        "mediaType": manifest_media_type,
        "digest": put_blob(layout, mbytes),
        "size": len(mbytes),
    }
    if tag is not None:
        add_index_entry(layout, desc, tag)
    return desc


def write_platform_index(
    layout: Path, images: list[tuple[dict[str, object], dict[str, str]]], tag: str
) -> str:
    """Write an image index (manifest list) of (descriptor, platform) pairs under ``tag``."""
    _init(layout)
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [{**d, "platform": p} for d, p in images],
    }
    ibytes = json.dumps(index).encode()
    digest = put_blob(layout, ibytes)
    add_index_entry(layout, {"mediaType": MT_INDEX, "digest": digest, "size": len(ibytes)}, tag)
    return digest


def snapshot(root: str | Path, *, times: bool = True) -> dict[str, tuple[object, ...]]:
    """path -> (type, mode, uid, gid, size, content-or-target digest, rdev, mtime for non-dirs)
    for every object below ``root``, never following symlinks."""
    out: dict[str, tuple[object, ...]] = {}
    root = str(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            digest = ""
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    digest = xxhash.xxh3_128_hexdigest(f.read())
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(p)
            mtime = 0 if stat.S_ISDIR(st.st_mode) or not times else st.st_mtime_ns
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            out[rel] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                size,
                digest,
                st.st_rdev,
                mtime,
            )
    return out


def disk_usage(root: str | Path) -> int:
    """Bytes allocated below ``root``, each inode counted once (like ``du``)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total
