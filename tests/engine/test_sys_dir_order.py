"""_sys.dir_order: a directory's names in its readdir order, ``.`` and ``..`` included.

The kernel's merged listing puts the bottom layer's entries first, in that order, and where
``.`` and ``..`` fall decides whether a failing lookup fails a getdents (Overlay.
_check_impure_merged); os.scandir leaves them out. The order is the filesystem's, so it is
compared with os.scandir's (the same getdents), over more than one 32 KiB read.
"""

from __future__ import annotations

import os
from pathlib import Path

from layerfs import _sys


def test_every_name_in_scandirs_order_with_the_dots(tmp_path: Path) -> None:
    names = [f"n{i}" for i in range(3000)] + ["\udcff\udcfe", "a b", "x" * 255]
    for n in names:
        (tmp_path / n).touch()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        order = _sys.dir_order(fd)
        with os.scandir(fd) as it:
            scanned = [os.fsencode(e.name) for e in it]
    finally:
        os.close(fd)
    assert sorted(order) == sorted([b".", b"..", *(os.fsencode(n) for n in names)])
    assert [n for n in order if n not in (b".", b"..")] == scanned


def test_an_empty_directory_has_the_dots_alone(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert sorted(_sys.dir_order(fd)) == [b".", b".."]
    finally:
        os.close(fd)
