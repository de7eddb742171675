"""_sys.umask reads the process' umask without setting it: in a process serving several
mounts (layerfs.share) a new mount's Namespace reads it while other mounts' threads create
files, which a mask set for a moment would cut."""

from __future__ import annotations

import os

import pytest

from layerfs import _sys


@pytest.mark.parametrize("mask", [0, 0o022, 0o077])
def test_umask_is_read_without_being_set(mask: int, monkeypatch: pytest.MonkeyPatch) -> None:
    old = os.umask(mask)
    try:

        def no_set(value: int) -> int:
            raise AssertionError(f"umask set to {value:o} while other threads may create")

        monkeypatch.setattr(os, "umask", no_set)
        assert _sys.umask() == mask
    finally:
        monkeypatch.undo()
        os.umask(old)
