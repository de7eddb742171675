"""The content-addressed layer store: OCI images in, extracted layers out, containers back in.

Layers are extracted once, keyed by diffID, into the form layerfs (and kernel overlayfs) reads
as lowers; images are records that list layers; commits turn an upper into a new OCI layer.
The engine knows nothing of this package; this package never imports pyfuse3.
"""

from __future__ import annotations

import os

DEFAULT_STORE = "/var/lib/layerfs"


def default_store() -> str:
    """The store directory when no ``--store`` is given: $LAYERFS_STORE, else the default."""
    return os.environ.get("LAYERFS_STORE") or DEFAULT_STORE
