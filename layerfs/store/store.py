"""The layer store: a directory of extracted layers (by diffID), blobs, image records and tags.

Layout (STORE defaults to $LAYERFS_STORE or /var/lib/layerfs)::

    STORE/lock                      flock: one writer at a time
    STORE/blobs/sha256/HEX          manifests, configs, compressed layer blobs, as received
    STORE/layers/HEX/diff/          the extracted layer (HEX = diffID), an overlay lower
    STORE/layers/HEX/layer.json     diffID, tar size, entry count, creation time
    STORE/layers/HEX/files.jsonl    per-file xxh3 manifest (see verify.py)
    STORE/images/HEX.json           image record (HEX = manifest digest): layers, platform
    STORE/tags.json                 tag -> manifest digest
    STORE/tmp/                      staging: everything is built here, then renamed in
    STORE/tmp/NAME/intent.json      an import or rm past its point of no return (see below)

Invariants:
- A layer or blob is visible under layers/ or blobs/ only once verified: imports build in a
  staging directory inside the store and rename into place; failures remove the staging dir.
- Reference counts are derived from the image records (a layer's count = records naming it),
  never a record that names a missing layer.
- An import's last step is a redo log (and so is ``rm``: tags, record, then the layers and
  blobs no record names): once everything is verified and flushed, the staging
  directory gets an ``intent.json`` (the record and tags to write, the downloads it consumes),
  and only then are blobs and layers renamed in, the record and tags written. A writer killed
  anywhere in that step leaves a staging directory with its intent, which the next writer to
  take the lock (or a reader that finds it free) rolls forward, idempotently; one killed
  before the intent leaves staging debris, swept (with any half-written record or tags
  file). So a crash leaves the image whole or absent and no layer or blob no record names.
- Writers hold the lock; readers (ls, inspect, lowers) rely on atomic renames only.

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from layerfs.errors import LayerfsError
from layerfs.store import default_store, dockerarchive, oci, verify
from layerfs.store.digest import DigestError, copy_verified, parse_digest
from layerfs.store.extract import extract_blob
from layerfs.store.progress import Progress

if TYPE_CHECKING:
    import tarfile


INTENT = "intent.json"  # in a staging directory: the import is past its point of no return
_TMP_MARK = ".tmp-"  # _write_file's temporaries: NAME.tmp-RANDOM, renamed onto NAME


class StoreError(LayerfsError):
    """A store operation that cannot be done (unknown reference, ambiguous prefix, ...)."""


@dataclass(frozen=True, slots=True)
class LayerRef:
    """One layer of an image: its compressed blob and the diffID it decompresses to."""

    digest: str
    media_type: str
    size: int
    diff_id: str

    def descriptor(self) -> oci.Descriptor:
        return oci.Descriptor(self.media_type, self.digest, self.size)


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """An image in the store: its manifest, config and layers (bottom first)."""

    manifest_digest: str
    manifest_size: int
    manifest_media_type: str
    config_digest: str
    layers: tuple[LayerRef, ...]
    platform: str
    created: str
    source: str
    # Set by a pull: the registry/repository, and the digest pulled (an index's, for a
    # multi-platform image), as ``image ls --digests`` shows them.
    repository: str = ""
    repo_digest: str = ""

    def to_json(self) -> dict[str, object]:
        extra = {"repository": self.repository, "repo_digest": self.repo_digest}
        return {
            **{k: v for k, v in extra.items() if v},
            "manifest_digest": self.manifest_digest,
            "manifest_size": self.manifest_size,
            "manifest_media_type": self.manifest_media_type,
            "config_digest": self.config_digest,
            "layers": [
                {
                    "digest": x.digest,
                    "mediaType": x.media_type,
                    "size": x.size,
                    "diff_id": x.diff_id,
                }
                for x in self.layers
            ],
            "platform": self.platform,
            "created": self.created,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> ImageRecord:
        layers = obj["layers"]
        assert isinstance(layers, list)
        return cls(
            manifest_digest=str(obj["manifest_digest"]),
            manifest_size=int(str(obj["manifest_size"])),
            manifest_media_type=str(obj["manifest_media_type"]),
            config_digest=str(obj["config_digest"]),
            layers=tuple(
                LayerRef(str(x["digest"]), str(x["mediaType"]), int(x["size"]), str(x["diff_id"]))
                for x in layers
            ),
            platform=str(obj["platform"]),
            created=str(obj["created"]),
            source=str(obj["source"]),
            repository=str(obj.get("repository", "")),
            repo_digest=str(obj.get("repo_digest", "")),
        )

    @property
    def diff_ids(self) -> tuple[str, ...]:
        return tuple(x.diff_id for x in self.layers)


@dataclass(frozen=True, slots=True)
class StagedLayer:
    """A layer to ingest: its descriptor, diffID, and how to open its blob."""

    desc: oci.Descriptor
    diff_id: str
    open_blob: Callable[[], BinaryIO]
    # A file inside the store (a pull's download) already checked against desc: linked into
    # staging instead of copied. Extraction checks both digests again before anything is kept.
    verified_path: str | None = None


class Store:
    """One layer store directory. Create it with ``Store(path)`` (directories made on demand)."""

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root or default_store())
        self.blobs_dir = os.path.join(self.root, "blobs", "sha256")
        self.layers_dir = os.path.join(self.root, "layers")
        self.images_dir = os.path.join(self.root, "images")
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.tags_path = os.path.join(self.root, "tags.json")
        self.uppers_dir = os.path.join(self.root, "uppers")
        # (tag, digest it named before) for each tag the last import or commit moved.
        self.moved_tags: list[tuple[str, str]] = []

    # -- paths -----------------------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.blobs_dir, parse_digest(digest))

    def layer_path(self, diff_id: str) -> str:
        return os.path.join(self.layers_dir, parse_digest(diff_id))

    def layer_root(self, diff_id: str) -> str:
        """The extracted tree of a layer: the directory to use as an overlay lower."""
        return os.path.join(self.layer_path(diff_id), "diff")

    def has_layer(self, diff_id: str) -> bool:
        return os.path.isdir(self.layer_root(diff_id))

    def has_blob(self, digest: str) -> bool:
        return os.path.isfile(self.blob_path(digest))

    def read_blob(self, digest: str) -> bytes:
        with open(self.blob_path(digest), "rb") as f:
            return f.read()

    # -- locking and staging ---------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's writer lock; on entry, finish the imports a crash interrupted in
        their last step and sweep the rest of the staging crashed writers left."""
        for d in (self.blobs_dir, self.layers_dir, self.images_dir, self.tmp_dir):
            os.makedirs(d, exist_ok=True)
        fd = self._lock_fd()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._sweep()
            yield
        finally:
            os.close(fd)

    def _lock_fd(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        return os.open(os.path.join(self.root, "lock"), flags, 0o600)

    def _sweep(self) -> None:
        """Holding the lock means no other writer is live: all of tmp/ is a crashed writer's,
        either an import or removal past its intent (rolled forward) or debris (removed)."""
        for name in os.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, name)
            if os.path.exists(os.path.join(path, INTENT)):
                sys.audit("layerfs.store.recover", path)  # a crash-point sweep arms here
                self._carry_out(path)
            _remove(path)
        # A writer killed inside _write_file leaves its temporary beside the record or tags.
        for d in (self.images_dir, self.root):
            for name in os.listdir(d):
                if _TMP_MARK in name:
                    _remove(os.path.join(d, name))

    def recover(self) -> None:
        """For readers: do what a writer does on taking the lock (finish an import a crash
        interrupted past its intent, sweep staging debris) when ``tmp/`` holds anything and
        the lock is free (a live writer's staging is its own) and this process may take it.
        A reader never waits, and never fails for it: without recovery it sees the store as
        it was before the interrupted import."""
        try:
            if not os.listdir(self.tmp_dir):
                return
            fd = self._lock_fd()
        except OSError:
            return  # no tmp/ yet; or a read-only store, or one this user may not write
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: a writer is live
            self._sweep()
        except OSError:
            pass  # a full disk, say: the next writer (which does fail then) finishes it
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def staging(self) -> Iterator[str]:
        """A fresh directory inside the store (same filesystem, so renames are atomic).

        Removed on the way out, unless it holds an intent that was not carried out (an error
        or Ctrl-C in the last step): the next writer rolls that forward."""
        path = os.path.join(self.tmp_dir, f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
        os.makedirs(os.path.join(path, "blobs"))
        os.makedirs(os.path.join(path, "layers"))
        try:
            yield path
        finally:
            if not os.path.exists(os.path.join(path, INTENT)):
                _remove(path)

    # -- import ----------------------------------------------------------------------------

    def import_layout(
        self,
        layout_ref: str,
        *,
        platform: oci.Platform | None = None,
        tags: tuple[str, ...] | None = None,
        progress: Progress | None = None,
        max_size: int | None = None,
    ) -> ImageRecord:
        """Import one image from an OCI layout (``DIR[:TAG]``), a tar of one, or a docker
        archive (``FILE[:NAME:TAG]``), verifying every digest.

        Tags default to the layout's ref name (the archive's RepoTags). Nothing is left behind
        on failure.
        """
        path, tag = oci.split_layout_ref(layout_ref)
        with self.locked(), self.staging() as scratch:
            layout_dir = path
            if not os.path.isdir(path):
                layout_dir = os.path.join(scratch, "archive")
                _unpack_archive(path, layout_dir)
            if dockerarchive.is_docker_archive(layout_dir):
                archive = dockerarchive.read(layout_dir, tag, path)
                img = archive.image
                if tags is None:
                    tags = (tag,) if tag else archive.repo_tags

                def blob_path(digest: str) -> str:
                    return archive.blob_paths[digest]

            else:
                layout = oci.Layout(layout_dir)
                img = layout.resolve(tag, platform or oci.Platform.host())
                if tags is None:
                    tags = (tag,) if tag else _ref_names(layout, img.manifest_desc.digest)
                blob_path = layout.blob_path

            def opener(d: oci.Descriptor) -> Callable[[], BinaryIO]:
                def open_blob() -> BinaryIO:
                    try:
                        return open(blob_path(d.digest), "rb")
                    except FileNotFoundError:
                        raise oci.OciError(
                            f"layer blob {d.digest} is missing from {path}"
                        ) from None

                return open_blob

            staged = [
                StagedLayer(d, diff_id, opener(d))
                for d, diff_id in zip(img.layers, img.diff_ids, strict=True)
            ]
            return self.ingest(
                staged,
                manifest=(img.manifest_desc, img.manifest_bytes),
                config=(img.config_desc.digest, img.config_bytes, img.config),
                source=os.path.abspath(path) + (f":{tag}" if tag else ""),
                tags=tags,
                progress=progress,
                max_size=max_size,
            )

    def ingest(
        self,
        layers: list[StagedLayer],
        *,
        manifest: tuple[oci.Descriptor, bytes],
        config: tuple[str, bytes, dict[str, object]],
        source: str,
        tags: tuple[str, ...],
        progress: Progress | None = None,
        max_size: int | None = None,
        repository: str = "",
        repo_digest: str = "",
        consumed: tuple[str, ...] = (),
    ) -> ImageRecord:
        """Verify and extract ``layers``, then publish blobs, layers, record and tags.

        The caller holds the lock. ``manifest`` and ``config`` bytes are already verified
        against their digests by the caller (they were read through a descriptor or built).
        ``consumed``: files inside the store (a pull's verified downloads) to delete once the
        record naming their blobs is written.
        """
        known = self.blob_diff_ids()
        manifest_desc, manifest_bytes = manifest
        config_digest, config_bytes, config_obj = config
        with self.staging() as st:
            staged_layers: set[str] = set()
            for i, layer in enumerate(layers):
                # The layers below, topmost first: a directory this layer's tar only implies
                # takes their metadata. Each is in the store or staged by now.
                below = [
                    self.layer_root(x.diff_id)
                    if self.has_layer(x.diff_id)
                    else os.path.join(st, "layers", parse_digest(x.diff_id), "diff")
                    for x in reversed(layers[:i])
                ]
                self._stage_layer(
                    st, layer, known, staged_layers, i, len(layers), progress, below, max_size
                )
            for digest, data in (
                (manifest_desc.digest, manifest_bytes),
                (config_digest, config_bytes),
            ):
                if not self.has_blob(digest):
                    _write_file(os.path.join(st, "blobs", parse_digest(digest)), data)
            # The last step: from here on, a crash must leave the image whole or absent.
            sys.audit("layerfs.store.publish", st)  # a crash-point sweep arms here
            _syncfs(st)  # everything staged is durable before the intent says "use it"
            record = ImageRecord(
                manifest_digest=manifest_desc.digest,
                manifest_size=manifest_desc.size,
                manifest_media_type=manifest_desc.media_type,
                config_digest=config_digest,
                layers=tuple(
                    LayerRef(x.desc.digest, x.desc.media_type, x.desc.size, x.diff_id)
                    for x in layers
                ),
                platform=_config_platform(config_obj),
                created=_now(),
                source=source,
                repository=repository,
                repo_digest=repo_digest,
            )
            current = self.tags()
            self.moved_tags = [
                (t, current[t])
                for t in tags
                if current.get(t, record.manifest_digest) != record.manifest_digest
            ]
            discard = [os.path.relpath(p, self.root) for p in consumed]
            # The point of no return: written (and fsynced) before anything is renamed in.
            _write_json(
                os.path.join(st, INTENT),
                {"record": record.to_json(), "tags": list(tags), "discard": discard},
            )
            record = self._publish(st)
        return record

    def _carry_out(self, st: str) -> None:
        """Finish what staging directory ``st``'s intent says: an import or a removal."""
        with open(os.path.join(st, INTENT), encoding="utf-8") as f:
            op = json.load(f).get("op", "import")
        if op == "remove":
            self._finish_remove(st)
        else:
            self._publish(st)

    def _publish(self, st: str) -> ImageRecord:
        """Carry out staging directory ``st``'s intent: rename its blobs and layers into
        place, write the image record, then the tags, delete the downloads it consumed, and
        drop the intent. Every step is skipped or repeated harmlessly when done already, so
        a crash anywhere in here is finished by running it again. The caller holds the lock.
        """
        with open(os.path.join(st, INTENT), encoding="utf-8") as f:
            intent = json.load(f)
        record = ImageRecord.from_json(intent["record"])
        # Blobs and layers first, the record that names them last.
        for name in sorted(os.listdir(os.path.join(st, "blobs"))):
            os.replace(os.path.join(st, "blobs", name), os.path.join(self.blobs_dir, name))
        for name in sorted(os.listdir(os.path.join(st, "layers"))):
            dst = os.path.join(self.layers_dir, name)
            if not os.path.exists(dst):
                os.rename(os.path.join(st, "layers", name), dst)
        # The renames must be durable before a record names what they moved.
        _fsync_dir(self.blobs_dir)
        _fsync_dir(self.layers_dir)
        rec_path = os.path.join(self.images_dir, parse_digest(record.manifest_digest) + ".json")
        if os.path.exists(rec_path):
            old = self._load_record(rec_path)  # re-import: keep the first record,
            if record.repository and (old.repository, old.repo_digest) != (
                record.repository,
                record.repo_digest,
            ):
                old = dataclasses.replace(  # noting where it was pulled from last
                    old, repository=record.repository, repo_digest=record.repo_digest
                )
                _write_json(rec_path, old.to_json())
            record = old
        else:
            _write_json(rec_path, record.to_json())
        current = self.tags()
        current.update(dict.fromkeys(intent["tags"], record.manifest_digest))
        _write_json(self.tags_path, current)
        for rel in intent["discard"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.root, rel))
        os.unlink(os.path.join(st, INTENT))  # what is left in st is debris
        return record

    def _stage_layer(
        self,
        st: str,
        layer: StagedLayer,
        known: dict[str, str],
        staged_layers: set[str],
        index: int,
        count: int,
        progress: Progress | None,
        below: list[str],
        max_size: int | None,
    ) -> None:
        desc, diff_id = layer.desc, layer.diff_id
        compression = oci.LAYER_TYPES.get(desc.media_type)
        if compression is None:
            raise oci.OciError(f"layer {desc.digest}: unknown media type {desc.media_type!r}")
        if desc.digest in known:
            if known[desc.digest] != diff_id:
                raise DigestError(
                    f"layer {desc.digest}: the config says diffID {diff_id}, but this blob's "
                    f"diffID is {known[desc.digest]}"
                )
            if self.has_layer(diff_id) or diff_id in staged_layers:
                return
        have_layer = self.has_layer(diff_id) or diff_id in staged_layers
        staged_blob = os.path.join(st, "blobs", parse_digest(desc.digest))
        tick = progress.update if progress is not None else None
        if self.has_blob(desc.digest):
            source = self.blob_path(desc.digest)
        elif os.path.exists(staged_blob):
            source = staged_blob  # verified earlier in this import (a layer listed twice)
        elif layer.verified_path is not None:
            os.link(layer.verified_path, staged_blob)
            source = staged_blob
        else:
            # Verify before parsing: the blob is copied into staging and must match its
            # digest and size before anything reads it as gzip or tar.
            if progress is not None:
                progress.start(f"layer {index + 1}/{count} {desc.digest[7:19]} copy", desc.size)
            with layer.open_blob() as src:
                try:
                    copy_verified(src, staged_blob, desc.digest, desc.size, tick)
                except OSError as e:
                    raise StoreError(f"layer {desc.digest}: copying the blob: {e}") from None
            source = staged_blob
        layer_dir = os.path.join(st, "layers", parse_digest(diff_id))
        dest = None if have_layer else os.path.join(layer_dir, "diff")
        if dest is not None:
            os.makedirs(dest)
        if progress is not None:
            progress.start(f"layer {index + 1}/{count} {desc.digest[7:19]} extract", desc.size)
        with open(source, "rb") as blob:
            stats = extract_blob(
                blob,
                compression,
                digest=desc.digest,
                size=desc.size,
                diff_id=diff_id,
                dest=dest,
                progress=tick,
                lowers=below,
                max_size=max_size,
            )
        known[desc.digest] = diff_id
        if dest is None:
            return
        if progress is not None:
            progress.start(f"layer {index + 1}/{count} manifest", stats.file_bytes)
        entries = verify.write_manifest(
            dest,
            os.path.join(layer_dir, "files.jsonl"),
            progress.update if progress is not None else None,
        )
        _write_json(
            os.path.join(layer_dir, "layer.json"),
            {
                "diff_id": diff_id,
                "tar_size": stats.tar_bytes,
                "file_bytes": stats.file_bytes,
                "entries": entries,
                "whiteouts": stats.whiteouts,
                "opaques": stats.opaques,
                "created": _now(),
            },
        )
        staged_layers.add(diff_id)
        if progress is not None:
            progress.finish()

    def blob_diff_ids(self) -> dict[str, str]:
        """Compressed-blob digest -> diffID, as proved by earlier imports."""
        out: dict[str, str] = {}
        for rec in self.images():
            for layer in rec.layers:
                out[layer.digest] = layer.diff_id
        return out

    # -- queries ---------------------------------------------------------------------------

    def tags(self) -> dict[str, str]:
        try:
            with open(self.tags_path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in data.items()}

    def images(self) -> list[ImageRecord]:
        try:
            names = sorted(os.listdir(self.images_dir))
        except FileNotFoundError:
            return []
        return [
            self._load_record(os.path.join(self.images_dir, n))
            for n in names
            if n.endswith(".json")
        ]

    def _load_record(self, path: str) -> ImageRecord:
        with open(path, encoding="utf-8") as f:
            return ImageRecord.from_json(json.load(f))

    def resolve(self, ref: str) -> ImageRecord:
        """Find an image by tag, ``NAME`` (meaning ``NAME:latest``), digest, digest prefix, or
        a registry reference as docker shortens it (``alpine`` for the tag
        ``docker.io/library/alpine:latest`` a pull gave)."""
        tags = self.tags()
        digest = tags.get(ref) or (
            tags.get(ref + ":latest") if ":" not in ref.rsplit("/", 1)[-1] else None
        )
        records = {r.manifest_digest: r for r in self.images()}
        if digest is not None and digest in records:
            return records[digest]
        prefix = ref.removeprefix("sha256:")
        if len(prefix) >= 4 and all(c in "0123456789abcdef" for c in prefix):
            found = [r for d, r in records.items() if d[7:].startswith(prefix)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise StoreError(f"image reference {ref!r} is ambiguous ({len(found)} images)")
        # A registry name as docker spells it short: "alpine" for the tag a pull gave it,
        # "docker.io/library/alpine:latest"; "repo@sha256:..." for that digest.
        from layerfs.store.reference import Reference, ReferenceError

        try:
            named = Reference.parse(ref)
        except ReferenceError:
            named = None
        if named is not None:
            digest = named.digest or tags.get(f"{named.name}:{named.tag}")
            if digest is not None and digest in records:
                return records[digest]
        raise StoreError(f"no image {ref!r} in store {self.root}")

    def tags_of(self, digest: str) -> list[str]:
        return sorted(t for t, d in self.tags().items() if d == digest)

    def lowers(self, ref: str) -> list[str]:
        """The layer directories of an image as overlay lowers, topmost first."""
        rec = self.resolve(ref)
        dirs = [self.layer_root(d) for d in reversed(rec.diff_ids)]
        for d in dirs:
            if not os.path.isdir(d):
                raise StoreError(f"image {ref!r}: layer directory {d} is missing")
        return dirs

    def layer_info(self, diff_id: str) -> dict[str, object]:
        with open(os.path.join(self.layer_path(diff_id), "layer.json"), encoding="utf-8") as f:
            info: dict[str, object] = json.load(f)
        return info

    def layer_users(self) -> dict[str, int]:
        """diffID -> number of images that use the layer (its reference count)."""
        counts: dict[str, int] = {}
        for rec in self.images():
            for d in set(rec.diff_ids):
                counts[d] = counts.get(d, 0) + 1
        return counts

    def verify(self, ref: str, progress: Progress | None = None) -> dict[str, list[verify.Problem]]:
        """Check every layer of an image against its xxh3 manifest; diffID -> problems."""
        rec = self.resolve(ref)
        out: dict[str, list[verify.Problem]] = {}
        for i, d in enumerate(dict.fromkeys(rec.diff_ids)):
            if progress is not None:
                progress.start(f"verify layer {i + 1}/{len(rec.layers)}", 0)
            manifest = os.path.join(self.layer_path(d), "files.jsonl")
            if not os.path.isfile(manifest):
                out[d] = [verify.Problem("missing", self.layer_path(d), "layer or manifest")]
                continue
            out[d] = verify.verify_tree(
                self.layer_root(d), manifest, progress.update if progress is not None else None
            )
            if progress is not None:
                progress.finish()
        return out

    # -- tags and removal ------------------------------------------------------------------

    def tag(self, ref: str, new_tag: str) -> None:
        with self.locked():
            rec = self.resolve(ref)
            tags = self.tags()
            tags[new_tag] = rec.manifest_digest
            _write_json(self.tags_path, tags)

    # -- uppers (containers) -----------------------------------------------------------------

    def _upper_record(self, upper: str) -> str:
        key = hashlib.sha256(os.fsencode(os.path.realpath(upper))).hexdigest()
        return os.path.join(self.uppers_dir, key + ".json")

    def record_upper(self, ref: str, upper: str, merged: str | None = None) -> None:
        """Note that ``upper`` sits on image ``ref`` (``layerfs mount --image`` calls this,
        with the mount point ``merged``): ``diff`` and ``commit`` then find the image alone,
        ``commit`` knows whether it is still mounted, and ``image rm`` refuses to remove an
        image an existing upper still sits on."""
        rec = self.resolve(ref)
        os.makedirs(self.uppers_dir, exist_ok=True)
        info = {"upper": os.path.realpath(upper), "image": rec.manifest_digest, "created": _now()}
        if merged is not None:
            info["merged"] = os.path.realpath(merged)
        _write_json(self._upper_record(upper), info)

    def _upper_info(self, upper: str) -> dict[str, object] | None:
        try:
            with open(self._upper_record(upper), encoding="utf-8") as f:
                info: dict[str, object] = json.load(f)
        except FileNotFoundError:
            return None
        return info

    def image_for_upper(self, upper: str) -> str | None:
        """The manifest digest of the image ``upper`` was recorded on, if any."""
        info = self._upper_info(upper)
        return None if info is None else str(info["image"])

    def merged_for_upper(self, upper: str) -> str | None:
        """The mount point recorded for ``upper`` by ``layerfs mount --image``, if any."""
        info = self._upper_info(upper)
        merged = None if info is None else info.get("merged")
        return str(merged) if merged else None

    def require(self) -> Store:
        """This store, for commands that only read it: refuse a directory that is not one;
        finish an import a crash interrupted in its last step (``recover``)."""
        if not os.path.isdir(self.root):
            raise StoreError(f"no layer store at {self.root}")
        self.recover()
        return self

    def uppers_on(self, digest: str) -> list[str]:
        """Existing upper directories recorded on image ``digest``; stale records are dropped."""
        out = []
        try:
            names = os.listdir(self.uppers_dir)
        except FileNotFoundError:
            return []
        for name in names:
            path = os.path.join(self.uppers_dir, name)
            try:
                with open(path, encoding="utf-8") as f:
                    info = json.load(f)
            except (OSError, ValueError):
                continue
            if not os.path.isdir(str(info.get("upper"))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # the container is gone
                continue
            if info.get("image") == digest:
                out.append(str(info["upper"]))
        return sorted(out)

    def remove(self, ref: str, *, force: bool = False) -> list[str]:
        """Remove an image (or just the tag, if the image has other tags); collect garbage.

        Refused while a recorded upper still sits on the image, unless ``force``. Returns the
        diffIDs of the layers freed.
        """
        with self.locked():
            rec = self.resolve(ref)
            tags = self.tags()
            mine = [t for t, d in tags.items() if d == rec.manifest_digest]
            if ref in mine and len(mine) > 1:
                del tags[ref]
                _write_json(self.tags_path, tags)
                return []
            users = self.uppers_on(rec.manifest_digest)
            if users and not force:
                raise StoreError(
                    f"image {ref!r} is in use by {len(users)} upper(s) ({users[0]}...); "
                    "remove them or use --force"
                )
            # A redo log as an import's: the tags, the record and the layers and blobs only it
            # named go together, or (a crash before the intent) not at all.
            sys.audit("layerfs.store.remove", rec.manifest_digest)  # a crash-point sweep arms here
            with self.staging() as st:
                _write_json(
                    os.path.join(st, INTENT), {"op": "remove", "digest": rec.manifest_digest}
                )
                return self._finish_remove(st)

    def _finish_remove(self, st: str) -> list[str]:
        """Carry out a removal's intent: drop the image's tags, then its record, then every
        layer and blob no record names. Repeatable, as ``_publish``. The caller holds the
        lock; returns the diffIDs of the layers freed (by this run)."""
        with open(os.path.join(st, INTENT), encoding="utf-8") as f:
            digest = str(json.load(f)["digest"])
        tags = self.tags()
        if digest in tags.values():
            _write_json(self.tags_path, {t: d for t, d in tags.items() if d != digest})
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.images_dir, parse_digest(digest) + ".json"))
        freed = self._collect()
        os.unlink(os.path.join(st, INTENT))
        return freed

    def _collect(self) -> list[str]:
        """Delete layers and blobs no image record names. The caller holds the lock."""
        used_layers: set[str] = set()
        used_blobs: set[str] = set()
        for rec in self.images():
            used_layers.update(parse_digest(d) for d in rec.diff_ids)
            used_blobs.update(parse_digest(x.digest) for x in rec.layers)
            used_blobs.add(parse_digest(rec.manifest_digest))
            used_blobs.add(parse_digest(rec.config_digest))
        freed = []
        for name in os.listdir(self.layers_dir):
            if name not in used_layers:
                # Rename first, so the layer disappears at once, then delete at leisure.
                doomed = os.path.join(self.tmp_dir, f"rm-{name}")
                os.rename(os.path.join(self.layers_dir, name), doomed)
                _remove(doomed)
                freed.append("sha256:" + name)
        for name in os.listdir(self.blobs_dir):
            if name not in used_blobs:
                os.unlink(os.path.join(self.blobs_dir, name))
        return sorted(freed)


def _unpack_archive(archive: str, dest: str) -> None:
    """Unpack an OCI layout tar (``podman save --format oci-archive``) into ``dest``.

    Only the layout's own files matter; the ``data`` filter refuses links, devices and paths
    that would leave ``dest``, so a hostile archive cannot write elsewhere.
    """
    import tarfile

    try:
        with tarfile.open(archive) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, filter="data")
            else:  # Python < 3.11.4 (Debian 12's 3.11.2): the same rules, checked here
                members = tf.getmembers()
                for m in members:
                    if not _data_member(m):
                        raise oci.OciError(f"{archive}: refusing archive member {m.name!r}")
                tf.extractall(dest, members=members)
    except (tarfile.TarError, OSError) as e:
        raise oci.OciError(f"{archive}: not a usable OCI layout archive: {e}") from None


def _data_member(m: tarfile.TarInfo) -> bool:
    """What tarfile's ``data`` filter lets through: files and directories, and links whose
    target stays inside (a docker-archive links each repeated layer.tar to the first), all
    under relative names without ``..``."""
    if not _inside(m.name):
        return False
    if m.isfile() or m.isdir():
        return True
    if m.issym():
        return _inside(posixpath.join(posixpath.dirname(m.name), m.linkname))
    return m.islnk() and _inside(m.linkname)


def _inside(name: str) -> bool:
    path = posixpath.normpath(name)
    return not (path.startswith(("/", "../")) or path == "..")


def _ref_names(layout: oci.Layout, manifest_digest: str) -> tuple[str, ...]:
    del manifest_digest  # the tag names the top-level entry, which may be an index
    names = []
    entries = layout.index().get("manifests")
    if isinstance(entries, list) and len(entries) == 1 and isinstance(entries[0], dict):
        ann = entries[0].get("annotations")
        if isinstance(ann, dict) and isinstance(ann.get(oci.REF_NAME), str):
            names.append(str(ann[oci.REF_NAME]))
    return tuple(names)


def _config_platform(config: dict[str, object]) -> str:
    parts = [config.get("os"), config.get("architecture"), config.get("variant")]
    return "/".join(str(p) for p in parts if p)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _write_file(path: str, data: bytes) -> None:
    tmp = f"{path}{_TMP_MARK}{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        sys.audit("layerfs.store.write", tmp)  # a crash point (crash_at)
        f.write(data)
        f.flush()
        sys.audit("layerfs.store.fsync", tmp)
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sys.audit("layerfs.store.fsync", path)  # a crash point (crash_at)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, obj: object) -> None:
    _write_file(path, json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(path: str) -> None:
    """Flush the store's filesystem once per import, rather than fsync per extracted file."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sys.audit("layerfs.store.fsync", path)  # a crash point (crash_at)
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


# Python audit events that change a filesystem (the opens that can create, truncate or write,
# renames, links, unlinks...), and this module's own for the calls Python does not audit.
_CHANGES = frozenset(
    {
        "os.chmod", "os.chown", "os.link", "os.mkdir", "os.remove", "os.rename", "os.rmdir",
        "os.setxattr", "os.removexattr", "os.symlink", "os.truncate", "os.utime",
        "layerfs.store.write", "layerfs.store.fsync",
    }
)  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def crash_at(spec: str) -> None:
    """Fault injection, tests only (``LAYERFS_STORE_CRASH_AT``, read by the CLI): SIGKILL this
    process just before its Nth change to a filesystem counted from the start of an import's
    last step (``N``), of a recovery (``recover:N``) or of an image's removal (``remove:N``).
    Counted are the audited calls that change something: renames, unlinks, rmdirs, links,
    opens that may write, and this module's writes, fsyncs and syncfs. The hook runs before
    the call, so call N never happens: the disk holds what a kill -9 between calls N-1 and N
    leaves (the store writes nothing through a userspace buffer it has not flushed by then)."""
    event, _, n = spec.rpartition(":")
    arm = f"layerfs.store.{event or 'publish'}"
    limit = int(n)
    count = -1  # not armed yet

    def hook(name: str, args: tuple[object, ...]) -> None:
        nonlocal count
        if name == arm and count < 0:
            count = 0
        if count < 0:
            return
        if name in _CHANGES or (
            name == "open" and isinstance(args[2], int) and args[2] & _WRITE_FLAGS
        ):
            count += 1
            if count >= limit:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
