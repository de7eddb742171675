"""Fixtures for the layer store tests: a store and a layout directory under tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerfs.store.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    return tmp_path / "layout"


def store_is_empty(store: Store) -> bool:
    """No layer, blob, image, tag or staging debris: what a refused import must leave."""
    root = Path(store.root)
    for sub in ("layers", "blobs/sha256", "images", "tmp"):
        d = root / sub
        if d.exists() and any(d.iterdir()):
            return False
    tags = root / "tags.json"
    return not tags.exists() or tags.read_text().strip() in ("{}", "")
