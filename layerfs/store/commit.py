"""Commit: turn an upper directory into a new OCI layer, config and manifest.

The upper is already the diff (kernel overlayfs format), so a commit walks the upper alone:
its cost is proportional to the changes, not to the image. The upper's forms become OCI's:
character device 0/0 (or an xattr whiteout) -> empty file ``.wh.NAME``; an opaque directory ->
the directory plus ``.wh..wh..opq``; ``.wh.*`` files already in the upper (the fallback form)
pass through unchanged. Overlay-private xattrs are not exported. The tar is PAX with
nanosecond mtimes and ``SCHILY.xattr.*``; hard links within the upper stay hard links.

A directory renamed in the container (overlay ``redirect`` xattr) is written whole under its
new name, from the image's lowers, since a tar has no "rename". Caveat: an upper written with
overlayfs' metacopy feature holds files whose data lives in a lower; it is refused rather
than committed wrongly.

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, BinaryIO, cast

from layerfs._sys import copy_data, proc_path
from layerfs.errors import LayerfsError
from layerfs.store import oci
from layerfs.store.diff import OPAQUE_XATTRS, WHITEOUT_XATTRS, LowerStack, redirect_target
from layerfs.store.digest import HashingWriter, parse_digest, sha256_bytes, sha256_file
from layerfs.store.extract import PRIVATE_XATTR_PREFIXES
from layerfs.store.pgzip import ParallelGzipWriter
from layerfs.store.progress import Progress
from layerfs.store.store import ImageRecord, StagedLayer, Store
from layerfs.whiteout import OPQ_MARKER, WH_PREFIX
from layerfs.xattrs import METACOPY

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
UNSUPPORTED_XATTRS = tuple(x.decode() for x in METACOPY)


class CommitError(LayerfsError):
    """An upper that cannot be committed."""


@dataclass(frozen=True, slots=True)
class LayerBlob:
    """A layer written by ``write_layer_blob``."""

    path: str
    media_type: str
    digest: str
    size: int
    diff_id: str
    tar_size: int
    entries: int


def write_layer_blob(
    upper: str,
    out_path: str,
    compression: str = "gzip",
    progress: Callable[[int], None] | None = None,
    lowers: list[str] | None = None,
) -> LayerBlob:
    """Write the upper at ``upper`` as a (compressed) OCI layer tar at ``out_path``.

    ``lowers`` (topmost first) are needed only when the upper holds renamed directories.
    """
    if compression not in oci.LAYER_MEDIA_TYPE:
        raise CommitError(f"unknown compression {compression!r} (gzip, zstd, none)")
    with open(out_path, "xb") as raw:
        outer = HashingWriter(cast(BinaryIO, raw))
        comp: IO[bytes]
        if compression == "gzip":
            # Threads deflate blocks in parallel (zlib drops the GIL); one standard member.
            comp = cast(IO[bytes], ParallelGzipWriter(cast(BinaryIO, outer), level=6))
        elif compression == "zstd":
            import zstandard

            cctx = zstandard.ZstdCompressor(level=3)
            comp = cast(IO[bytes], cctx.stream_writer(cast(IO[bytes], outer), closefd=False))
        else:
            comp = cast(IO[bytes], outer)
        inner = HashingWriter(cast(BinaryIO, comp))
        buffered = io.BufferedWriter(cast(io.RawIOBase, inner), buffer_size=1 << 20)
        with (
            tarfile.open(
                fileobj=buffered, mode="w|", format=tarfile.PAX_FORMAT, errors="surrogateescape"
            ) as tf,
            LowerStack(lowers or []) as low,
        ):
            walker = _UpperWalker(tf, progress, low if lowers is not None else None)
            walker.run(upper)
        buffered.flush()
        if compression != "none":
            comp.close()
        raw.flush()
        os.fsync(raw.fileno())
    return LayerBlob(
        out_path,
        oci.LAYER_MEDIA_TYPE[compression],
        outer.digest(),
        outer.count,
        inner.digest(),
        inner.count,
        walker.entries,
    )


class _UpperWalker:
    """Walks an upper with directory fds (never following symlinks) and writes tar entries.

    A directory renamed in the container carries an overlay redirect: its lower part lives
    under another name. A tar cannot say "moved", so such a directory is written whole: marked
    opaque, with the merged contents of its lower part (``lowers``) under the new name, and
    the upper's changes applied; every directory below it is written merged too.
    """

    def __init__(
        self,
        tf: tarfile.TarFile,
        progress: Callable[[int], None] | None,
        lowers: LowerStack | None,
    ) -> None:
        self.tf = tf
        self.progress = progress
        self.lowers = lowers
        self.entries = 0
        self.bytes = 0
        self.links: dict[tuple[int, int], str] = {}

    def run(self, upper: str) -> None:
        fd = os.open(upper, _DIR_FLAGS)
        try:
            self._dir(fd, b"", [], materialize=False)
        finally:
            os.close(fd)

    def _dir(
        self, dfd: int, prefix: bytes, lower: list[bytes] | None, *, materialize: bool
    ) -> None:
        """Write upper directory ``dfd`` (tar path ``prefix``); ``lower`` is where its lower
        part lives; with ``materialize`` the lower part is written too (see the class doc)."""
        names = sorted(os.fsencode(n) for n in os.listdir(dfd))
        covered: set[bytes] = set()
        for name in names:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            path = prefix + name
            xattrs = _xattrs(dfd, name)
            bad = [x for x in xattrs if x in UNSUPPORTED_XATTRS]
            if bad:
                raise CommitError(
                    f"{os.fsdecode(path)}: has {bad[0]} (metacopy uppers are not supported)"
                )
            if name == OPQ_MARKER or name.startswith(WH_PREFIX):
                # Already OCI form (fuse-overlayfs' fallback); below an opaque materialised
                # directory a whiteout has nothing left to hide.
                covered.add(name[len(WH_PREFIX) :] if name != OPQ_MARKER else name)
                if not materialize:
                    self._upper_entry(dfd, name, path, st, {})
                continue
            covered.add(name)
            if _is_whiteout(st, xattrs):
                if not materialize:
                    ti = self._info(prefix + WH_PREFIX + name, st, {})
                    ti.type, ti.size, ti.mode = tarfile.REGTYPE, 0, 0o644
                    self._add(ti)
                continue
            public = {k: v for k, v in xattrs.items() if not k.startswith(PRIVATE_XATTR_PREFIXES)}
            if not stat.S_ISDIR(st.st_mode):
                self._upper_entry(dfd, name, path, st, public)
                continue
            ti = self._info(path, st, public)
            ti.type = tarfile.DIRTYPE
            self._add(ti)
            opaque = any(xattrs.get(k) == b"y" for k in OPAQUE_XATTRS)
            redirect = None if opaque else redirect_target(dfd, name, lower)
            if redirect is not None and self.lowers is None:
                raise CommitError(f"{os.fsdecode(path)}: a renamed directory needs the lowers")
            child_lower = (
                None if opaque else redirect or (None if lower is None else [*lower, name])
            )
            cfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
            try:
                if (
                    (opaque or redirect is not None)
                    and not materialize
                    and not _exists(cfd, OPQ_MARKER)
                ):
                    op = self._info(path + b"/" + OPQ_MARKER, st, {})
                    op.type, op.size, op.mode = tarfile.REGTYPE, 0, 0o644
                    self._add(op)
                self._dir(
                    cfd, path + b"/", child_lower, materialize=materialize or redirect is not None
                )
            finally:
                os.close(cfd)
        if materialize and lower is not None and self.lowers is not None:
            for name in self.lowers.children(lower):
                if name not in covered:
                    self._lower_entry([*lower, name], prefix + name)

    def _lower_entry(self, parts: list[bytes], path: bytes) -> None:
        """Write the lower stack's object at ``parts`` (a whole merged subtree) as ``path``."""
        assert self.lowers is not None
        found = self.lowers.locate(parts)
        if found is None:
            return
        index, st = found
        pfd = self.lowers.open_dir(index, parts[:-1])
        try:
            name = parts[-1]
            xattrs = _xattrs(pfd, name)
            public = {k: v for k, v in xattrs.items() if not k.startswith(PRIVATE_XATTR_PREFIXES)}
            if not stat.S_ISDIR(st.st_mode):
                self._upper_entry(pfd, name, path, st, public)
                return
        finally:
            os.close(pfd)
        ti = self._info(path, st, public)
        ti.type = tarfile.DIRTYPE
        self._add(ti)
        for child in self.lowers.children(parts):
            self._lower_entry([*parts, child], path + b"/" + child)

    def _upper_entry(
        self, dfd: int, name: bytes, path: bytes, st: os.stat_result, xattrs: dict[str, bytes]
    ) -> None:
        """Write one non-directory found at ``name`` in directory ``dfd``."""
        ti = self._info(path, st, xattrs)
        if stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.links:
                ti.type, ti.size, ti.linkname = tarfile.LNKTYPE, 0, self.links[key]
                self._add(ti)
                return
            if st.st_nlink > 1:
                self.links[key] = ti.name
            ti.type, ti.size = tarfile.REGTYPE, st.st_size
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            with os.fdopen(fd, "rb") as f:
                self._add(ti, f)
            self.bytes += st.st_size
        elif stat.S_ISLNK(st.st_mode):
            ti.type, ti.linkname = tarfile.SYMTYPE, os.fsdecode(os.readlink(name, dir_fd=dfd))
            self._add(ti)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            ti.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            self._add(ti)
        elif stat.S_ISFIFO(st.st_mode):
            ti.type = tarfile.FIFOTYPE
            self._add(ti)
        # Sockets are not representable in a tar; like tar itself, skip them.

    def _info(self, path: bytes, st: os.stat_result, xattrs: dict[str, bytes]) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(os.fsdecode(path))
        ti.mode = stat.S_IMODE(st.st_mode)
        ti.uid, ti.gid = st.st_uid, st.st_gid
        ti.uname = ti.gname = ""
        pax: dict[str, str] = {}
        ti.pax_headers = pax
        ti.mtime = st.st_mtime_ns // 1_000_000_000
        frac = st.st_mtime_ns % 1_000_000_000
        if frac:
            # tarfile would format a float and lose nanoseconds: give the exact decimal.
            pax["mtime"] = f"{ti.mtime}.{frac:09d}"
        for k, v in xattrs.items():
            pax["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
        return ti

    def _add(self, ti: tarfile.TarInfo, f: IO[bytes] | None = None) -> None:
        self.tf.addfile(ti, f)
        self.entries += 1
        if self.progress is not None:
            self.progress(self.bytes)


def _xattrs(dfd: int, name: bytes) -> dict[str, bytes]:
    path = proc_path(dfd, name)
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for x in names:
        try:
            out[x] = os.getxattr(path, x, follow_symlinks=False)
        except OSError:
            continue
    return out


def _is_whiteout(st: os.stat_result, xattrs: dict[str, bytes]) -> bool:
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return True
    return (
        stat.S_ISREG(st.st_mode) and st.st_size == 0 and any(k in xattrs for k in WHITEOUT_XATTRS)
    )


def _exists(dfd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


# -- images -------------------------------------------------------------------------------

_OCI_FOR_DOCKER = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": (
        "application/vnd.oci.image.layer.v1.tar+gzip"
    ),
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": (
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    ),
}


def commit(
    store: Store,
    upper: str,
    base_ref: str,
    tags: tuple[str, ...],
    *,
    into: str | None = None,
    compression: str = "gzip",
    message: str | None = None,
    author: str | None = None,
    progress: Progress | None = None,
) -> ImageRecord:
    """Commit ``upper`` on top of image ``base_ref`` as a new image tagged ``tags``.

    The new layer is written, then ingested like any imported layer (digests re-verified,
    extracted into the store with its xxh3 manifest), so the new image mounts at once.
    With ``into``, the image is also written to that OCI layout under the first tag.
    """
    if not os.path.isdir(upper):
        raise CommitError(f"upper {upper} is not a directory")
    with store.locked():
        base = store.resolve(base_ref)
        base_config = json.loads(store.read_blob(base.config_digest))
        with store.staging() as st:
            if progress is not None:
                progress.start("commit: writing layer")
            blob = write_layer_blob(
                upper,
                os.path.join(st, "layer.blob"),
                compression,
                progress.update if progress is not None else None,
                lowers=store.lowers(base_ref),
            )
            if progress is not None:
                progress.finish()
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            config = copy.deepcopy(base_config)
            config["created"] = now
            if author:
                config["author"] = author
            config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
            config["rootfs"]["diff_ids"] = [*base.diff_ids, blob.diff_id]
            entry = {"created": now, "created_by": "layerfs commit"}
            if message:
                entry["comment"] = message
            config["history"] = [*config.get("history", []), entry]
            config_bytes = oci.canonical_json(config)
            config_desc = oci.Descriptor(
                oci.MT_OCI_CONFIG, sha256_bytes(config_bytes), len(config_bytes)
            )
            base_layers = [
                oci.Descriptor(_OCI_FOR_DOCKER.get(x.media_type, x.media_type), x.digest, x.size)
                for x in base.layers
            ]
            new_desc = oci.Descriptor(blob.media_type, blob.digest, blob.size)
            manifest = {
                "schemaVersion": 2,
                "mediaType": oci.MT_OCI_MANIFEST,
                "config": config_desc.to_json(),
                "layers": [d.to_json() for d in (*base_layers, new_desc)],
            }
            manifest_bytes = oci.canonical_json(manifest)
            manifest_desc = oci.Descriptor(
                oci.MT_OCI_MANIFEST, sha256_bytes(manifest_bytes), len(manifest_bytes)
            )
            layers = [
                StagedLayer(d, diff_id, _opener(store.blob_path(d.digest)))
                for d, diff_id in zip(base_layers, base.diff_ids, strict=True)
            ]
            layers.append(StagedLayer(new_desc, blob.diff_id, _opener(blob.path)))
            record = store.ingest(
                layers,
                manifest=(manifest_desc, manifest_bytes),
                config=(config_desc.digest, config_bytes, config),
                source=f"commit of {os.path.abspath(upper)} on {base.manifest_digest}",
                tags=tags,
                progress=progress,
            )
    if into is not None:
        export_layout(store, record, into, tags[0] if tags else None)
    return record


def _opener(path: str) -> Callable[[], BinaryIO]:
    def open_blob() -> BinaryIO:
        return open(path, "rb")

    return open_blob


def export_layout(store: Store, record: ImageRecord, layout_dir: str, tag: str | None) -> None:
    """Write an image from the store into an OCI image layout (created if missing).

    Blobs are copied (reflinked where the filesystem can), never hard-linked: an edit of the
    layout must not reach the store. Each blob is verified against its digest as it is
    shipped, a blob already in the layout too (a damaged one is replaced). The index entry for
    ``tag`` is replaced; index.json is replaced atomically, last.
    """
    blobs = os.path.join(layout_dir, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    marker = os.path.join(layout_dir, "oci-layout")
    if not os.path.exists(marker):
        _atomic_write(marker, json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
    digests = [record.manifest_digest, record.config_digest, *(x.digest for x in record.layers)]
    for digest in digests:
        dst = os.path.join(blobs, parse_digest(digest))
        if os.path.exists(dst) and sha256_file(dst)[0] == digest:
            continue
        tmp = dst + ".tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        src_fd = os.open(store.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                copy_data(src_fd, dst_fd, os.fstat(src_fd).st_size)
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
        got = sha256_file(tmp)[0]
        if got != digest:
            os.unlink(tmp)
            raise CommitError(f"store blob {digest} is damaged (its sha256 is {got})")
        os.replace(tmp, dst)
    index_path = os.path.join(layout_dir, "index.json")
    try:
        with open(index_path, "rb") as f:
            index = json.loads(f.read())
    except FileNotFoundError:
        index = {"schemaVersion": 2, "manifests": []}
    entry: dict[str, object] = {
        "mediaType": record.manifest_media_type,
        "digest": record.manifest_digest,
        "size": record.manifest_size,
    }
    if tag:
        entry["annotations"] = {oci.REF_NAME: tag}
        index["manifests"] = [
            m
            for m in index.get("manifests", [])
            if m.get("annotations", {}).get(oci.REF_NAME) != tag
        ]
    index["manifests"].append(entry)
    _atomic_write(index_path, json.dumps(index).encode())


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
