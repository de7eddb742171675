"""``layerfs image push IMAGE [REGISTRY/]REPO:TAG``: an image from the store to a registry.

The manifest is pushed as the store holds it (same bytes, same digest). Each blob the
registry already has in the repository is skipped (HEAD); one the image was pulled with from
another repository of the same registry is mounted from there (cross-repository mount);
the others are uploaded, in one request or in chunks when larger than ``chunk_size``. The
config goes up with the layers, the manifest last, so a registry never holds a manifest whose
blobs are missing.

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from layerfs.store import oci
from layerfs.store.progress import LayerLines
from layerfs.store.reference import Reference, ReferenceError
from layerfs.store.registry import Registry
from layerfs.store.store import Store

JOBS = 4
CHUNK_SIZE = 64 << 20  # larger blobs go up in PATCH chunks of this size


def push(
    store: Store,
    image: str,
    dest: str,
    *,
    insecure: bool = False,
    lines: LayerLines | None = None,
    jobs: int = JOBS,
    chunk_size: int | None = CHUNK_SIZE,
    registry: Registry | None = None,
) -> str:
    """Push store image ``image`` to ``dest``; return the manifest digest."""
    ref = Reference.parse(dest)
    if ref.digest is not None:
        raise ReferenceError(f"{dest!r}: push to a tag, not a digest")
    assert ref.tag is not None
    rec = store.resolve(image)
    lines = lines if lines is not None else LayerLines()
    # A blob the store pulled from another repository of the same registry can be mounted
    # from there instead of uploaded (a commit's base layers, typically).
    sources: dict[str, str] = {}
    for other in store.images():
        if not other.repository:
            continue
        there = Reference.parse(other.repository + ":x")
        if there.registry == ref.registry and there.repository != ref.repository:
            for x in other.layers:
                sources.setdefault(x.digest, there.repository)
    scopes = [f"repository:{ref.repository}:pull,push"]
    scopes += [f"repository:{r}:pull" for r in sorted(set(sources.values()))]
    blobs: dict[str, oci.Descriptor] = {}
    for x in rec.layers:
        blobs.setdefault(x.digest, x.descriptor())
    config_desc = oci.Descriptor(
        oci.MT_OCI_CONFIG, rec.config_digest, len(store.read_blob(rec.config_digest))
    )
    blobs.setdefault(rec.config_digest, config_desc)
    reg = registry or Registry(ref.api_host, insecure=insecure, scopes=tuple(scopes))
    with reg:

        def put(d: oci.Descriptor) -> None:
            def tick(done: int) -> None:
                lines.bytes(d.digest, "Pushing", done, d.size)

            lines.status(d.digest, "Preparing")
            how = reg.upload_blob(
                ref.repository,
                d,
                store.blob_path(d.digest),
                mount_from=sources.get(d.digest),
                chunk_size=chunk_size,
                progress=tick,
            )
            done = {
                "exists": "Layer already exists",
                "mounted": f"Mounted from {sources.get(d.digest)}",
            }
            lines.status(d.digest, done.get(how, "Pushed"))

        with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="push") as pool:
            list(pool.map(put, blobs.values()))
        data = store.read_blob(rec.manifest_digest)
        return reg.put_manifest(ref.repository, ref.tag, data, rec.manifest_media_type)
