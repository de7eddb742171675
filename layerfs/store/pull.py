"""``layerfs image pull``: an image from a registry into the store, as an engine pulls it.

Resolve the reference (a tag, or a digest the manifest is checked against); an index or
Docker manifest list picks the platform (the host's, or the one asked for) and says which
exist when none fits; then the config and every layer blob the store does not hold are
fetched, several at once, each verified against its digest while it streams. The image is
then ingested like an import (each layer checked against its diffID while it is extracted)
and recorded with its repository, tag and the digest pulled.

Downloads land in ``STORE/downloads/HEX`` (a ``.part`` while in flight), renamed there only
once verified, under a per-blob lock (``HEX.lock``, flock): two pulls that share a layer
fetch it once, the second waiting for the first. An interrupted pull (Ctrl-C, kill, a full
disk) leaves the store's images, layers and tags as they were; the verified downloads stay,
and the next pull goes on from them. A completed pull deletes the downloads it used (the
import's last step does, so that one killed there is finished by the store's recovery).

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO

from layerfs.store import oci
from layerfs.store.digest import DigestError, parse_digest, sha256_bytes
from layerfs.store.progress import LayerLines
from layerfs.store.reference import Reference
from layerfs.store.registry import Cancel, Registry, RegistryError
from layerfs.store.store import ImageRecord, StagedLayer, Store

JOBS = 4
# How long the downloads still running when one failed get to end (each is cancelled at once,
# its socket shut down): one that does not (a read of an answer's headers on a reused
# connection is not interrupted) is abandoned as Ctrl-C abandons it.
GRACE = 5.0


class Downloads:
    """Verified blobs fetched for the store but not yet in it, with a lock per blob."""

    def __init__(self, store: Store) -> None:
        self.dir = os.path.join(store.root, "downloads")
        os.makedirs(self.dir, exist_ok=True)

    def path(self, digest: str) -> str:
        return os.path.join(self.dir, parse_digest(digest))

    @contextlib.contextmanager
    def locked(self, digest: str) -> Iterator[str]:
        """Hold blob ``digest``'s lock; yield the path where its verified copy lives."""
        final = self.path(digest)
        fd = os.open(final + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield final
        finally:
            os.close(fd)


def pull(
    store: Store,
    ref_text: str,
    *,
    platform: oci.Platform | None = None,
    insecure: bool = False,
    tags: tuple[str, ...] | None = None,
    lines: LayerLines | None = None,
    jobs: int = JOBS,
    max_size: int | None = None,
    registry: Registry | None = None,
) -> ImageRecord:
    """Pull ``ref_text`` (``[REGISTRY/]REPO[:TAG|@DIGEST]``) into ``store``.

    Tags default to ``REGISTRY/REPO:TAG`` (none for a pull by digest alone).
    """
    ref = Reference.parse(ref_text)
    lines = lines if lines is not None else LayerLines()
    scope = f"repository:{ref.repository}:pull"
    reg = registry or Registry(ref.api_host, insecure=insecure, scopes=(scope,))
    store.recover()  # an earlier pull's import a crash interrupted: not fetched again
    with reg:
        top_bytes, top_type = reg.get_manifest(ref.repository, ref.reference)
        top_digest = sha256_bytes(top_bytes)
        if ref.digest is not None and top_digest != ref.digest:
            raise DigestError(f"{ref}: the registry's manifest has digest {top_digest}")
        top = oci.parse_json(top_bytes, f"{ref}: manifest")
        media_type = str(top.get("mediaType") or top_type)
        if media_type in oci.INDEX_TYPES:
            want = platform or oci.Platform.host()
            desc = oci.pick_manifest(oci.index_entries(top, str(ref)), want, str(ref))
            mbytes, _ = reg.get_manifest(ref.repository, desc.digest)
            if len(mbytes) != desc.size or sha256_bytes(mbytes) != desc.digest:
                raise DigestError(f"{ref}: manifest {desc.digest} does not match the index")
            manifest_desc = oci.Descriptor(desc.media_type, desc.digest, desc.size)
        else:
            mbytes = top_bytes
            manifest_desc = oci.Descriptor(media_type, top_digest, len(top_bytes))
        if manifest_desc.media_type not in oci.MANIFEST_TYPES:
            raise oci.OciError(
                f"{ref}: manifest media type {manifest_desc.media_type!r} is not supported "
                "(OCI or Docker schema 2 only)"
            )
        manifest = oci.parse_json(mbytes, f"{ref}: manifest")
        config_desc = oci.Descriptor.parse(manifest.get("config"), "manifest config")
        if config_desc.media_type not in oci.CONFIG_TYPES:
            raise oci.OciError(f"unknown config media type {config_desc.media_type!r}")
        raw_layers = manifest.get("layers")
        if not isinstance(raw_layers, list):
            raise oci.OciError(f"manifest {manifest_desc.digest}: no layers list")
        layers = [oci.Descriptor.parse(d, "manifest layer") for d in raw_layers]
        for layer in layers:
            if layer.media_type not in oci.LAYER_TYPES:
                raise oci.OciError(f"layer {layer.digest}: unknown media type {layer.media_type!r}")
        cbytes = reg.get_small_blob(ref.repository, config_desc, "config")
        config = oci.parse_json(cbytes, "config")
        diff_ids = oci.config_diff_ids(config)
        if len(diff_ids) != len(layers):
            raise oci.OciError(
                f"config lists {len(diff_ids)} diff_ids for {len(layers)} manifest layers"
            )

        downloads = Downloads(store)
        if tags is None:
            tags = (f"{ref.name}:{ref.tag}",) if ref.tag else ()
        fetch: dict[str, oci.Descriptor] = {}
        while True:
            # What the store has is decided without the lock (downloads take long), so it is
            # decided again under it: an image rm meanwhile may have freed a layer not fetched
            # (or one a concurrent pull ingested from our download), fetched on the next pass
            todo: dict[str, oci.Descriptor] = {}
            for d, _ in _missing(store, layers, diff_ids, fetch, downloads):
                if d.digest not in todo:
                    todo[d.digest] = d
                    lines.status(d.digest, "Pulling fs layer")
            if not fetch:
                for d in layers:
                    if d.digest not in todo:
                        lines.status(d.digest, "Already exists")
            fetch.update(todo)
            cancel = Cancel()
            _run_downloads(
                [
                    functools.partial(_fetch_blob, reg, ref.repository, d, downloads, lines, cancel)
                    for d in todo.values()
                ],
                jobs,
                cancel,
            )
            with store.locked():
                gone = _missing(store, layers, diff_ids, fetch, downloads)
                if not gone:
                    record = _ingest(
                        store, layers, diff_ids, fetch, downloads, lines, manifest_desc,
                        mbytes, config_desc, cbytes, config, ref, tags, max_size, top_digest,
                    )  # fmt: skip
                    break
    for d in fetch.values():
        lines.status(d.digest, "Pull complete")
    return record


def _missing(
    store: Store,
    layers: Sequence[oci.Descriptor],
    diff_ids: Sequence[str],
    fetch: dict[str, oci.Descriptor],
    downloads: Downloads,
) -> list[tuple[oci.Descriptor, str]]:
    """The layers an ingest could not take now: neither in the store, nor (fetched) in its
    blobs or downloaded."""
    known = store.blob_diff_ids()
    out = []
    for d, diff_id in zip(layers, diff_ids, strict=True):
        if known.get(d.digest) == diff_id and store.has_layer(diff_id):
            continue
        if d.digest in fetch and (
            store.has_blob(d.digest) or os.path.exists(downloads.path(d.digest))
        ):
            continue
        out.append((d, diff_id))
    return out


def _ingest(
    store: Store,
    layers: Sequence[oci.Descriptor],
    diff_ids: Sequence[str],
    fetch: dict[str, oci.Descriptor],
    downloads: Downloads,
    lines: LayerLines,
    manifest_desc: oci.Descriptor,
    mbytes: bytes,
    config_desc: oci.Descriptor,
    cbytes: bytes,
    config: dict[str, object],
    ref: Reference,
    tags: tuple[str, ...],
    max_size: int | None,
    top_digest: str,
) -> ImageRecord:
    """The pull's last step, the store's lock held: every layer fetched or in the store."""
    staged = [
        StagedLayer(
            d,
            diff_id,
            _opener(store, downloads, d.digest),
            downloads.path(d.digest) if d.digest in fetch else None,
        )
        for d, diff_id in zip(layers, diff_ids, strict=True)
    ]
    for d in fetch.values():
        lines.status(d.digest, "Extracting")
    return store.ingest(
        staged,
        manifest=(manifest_desc, mbytes),
        config=(config_desc.digest, cbytes, config),
        source=str(ref),
        tags=tags,
        max_size=max_size,
        repository=ref.name,
        repo_digest=top_digest,
        consumed=tuple(downloads.path(d.digest) for d in fetch.values()),
    )


class PullStopped(RegistryError):
    """A download given up because another one failed or the pull was interrupted."""


def _run_downloads(tasks: list[Callable[[], None]], jobs: int, cancel: Cancel) -> None:
    """Run ``tasks`` on ``jobs`` threads; raise the first error once all have ended.

    The first error cancels the others at once (``cancel``: their sockets are shut down, so
    one blocked on a registry that sends nothing ends too, instead of waiting for the read
    timeout, 60 s, then again for each retry); those that have not ended within ``GRACE``
    are abandoned. Ctrl-C (KeyboardInterrupt in the main thread) raises at once, without
    waiting for the downloads. The threads are daemons, so the process ends without them;
    they leave what a kill leaves (a ``.part``, a verified download)."""
    todo: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
    for task in tasks:
        todo.put(task)
    errors: list[BaseException] = []

    def work() -> None:
        while not cancel.is_set():
            try:
                task = todo.get_nowait()
            except queue.Empty:
                return
            try:
                task()
            except BaseException as e:  # handed to the main thread
                errors.append(e)  # before the cancel: the first error is the cause
                cancel.set()

    threads = [
        threading.Thread(target=work, name=f"pull-{i}", daemon=True)
        for i in range(min(max(1, jobs), len(tasks)))
    ]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive() and not cancel.is_set():
                t.join(0.2)
        deadline = time.monotonic() + GRACE
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
    except BaseException:
        cancel.set()
        raise
    if errors:
        raise errors[0]
    if cancel.is_set():
        raise PullStopped("the downloads were stopped")


def _fetch_blob(
    reg: Registry,
    repo: str,
    d: oci.Descriptor,
    downloads: Downloads,
    lines: LayerLines,
    cancel: Cancel,
) -> None:
    with downloads.locked(d.digest) as final:
        if os.path.exists(final):
            # Verified by an earlier (or a concurrent) pull that did not ingest it yet.
            lines.status(d.digest, "Download complete (already downloaded)")
            return

        def tick(done: int) -> None:
            if cancel.is_set():
                raise PullStopped(f"layer {d.digest}: download stopped")
            lines.bytes(d.digest, "Downloading", done, d.size)

        part = final + ".part"
        try:
            reg.download_blob(repo, d, part, tick, cancel)
        except OSError as e:
            raise RegistryError(f"layer {d.digest}: writing the download: {e}") from None
        os.rename(part, final)
        if cancel.is_set():
            # The pull is over (and may be exiting: a daemon thread must not be writing then).
            raise PullStopped(f"layer {d.digest}: download stopped")
        lines.status(d.digest, "Download complete")


def _opener(store: Store, downloads: Downloads, digest: str) -> Callable[[], BinaryIO]:
    def open_blob() -> BinaryIO:
        path = store.blob_path(digest) if store.has_blob(digest) else downloads.path(digest)
        return open(path, "rb")

    return open_blob
