"""A one-lower stack on fresh directories, and the engine over it (no FUSE)."""

from __future__ import annotations

from pathlib import Path

from layerfs.config import MountConfig
from layerfs.overlay import Overlay


def make_stack(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    low, up, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (low, up, work, mnt):
        d.mkdir()
    return low, up, work, mnt


def overlay(low: Path, up: Path, work: Path, mnt: Path) -> Overlay:
    cfg = MountConfig(lowers=(str(low),), upper=str(up), workdir=str(work), mountpoint=str(mnt))
    return Overlay(cfg.validate())
