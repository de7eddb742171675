"""Copy-up: the first write to a big lower file (append of one byte), a metadata-only change
of it (chmod), chmod of 10,000 small lower files, and ``rm -rf`` of a large lower tree (one
whiteout per entry). The lower data is read into the page cache first, through the layers and
not through the mount, so the copy mechanism is timed and not the disk."""

from __future__ import annotations

import os

from benchmarks.dataset import Dataset
from benchmarks.model import Scenario
from benchmarks.scenarios._util import (
    Measurement,
    Mounted,
    lower_paths,
    time_call,
    timed,
    warm_lower,
)


def prepare(dataset: Dataset) -> None:
    pass


def append_big(mnt: Mounted) -> list[Measurement]:
    warm_lower(mnt, mnt.dataset.big_rel)
    path = mnt.path / mnt.dataset.big_rel

    def append() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)

    return [Measurement("copy-up big (append 1 byte)", [time_call(append)])]


def chmod_big(mnt: Mounted) -> list[Measurement]:
    warm_lower(mnt, mnt.dataset.big_rel)
    path = mnt.path / mnt.dataset.big_rel
    return [Measurement("chmod big lower file", [time_call(lambda: os.chmod(path, 0o600))])]


def chmod_10k(mnt: Mounted) -> list[Measurement]:
    warm_lower(mnt, "dir10k")
    return [
        Measurement(
            "chmod 10k lower files", [timed(["chmod", "-R", "g+w", str(mnt.path / "dir10k")])]
        )
    ]


def rm_tree(mnt: Mounted) -> list[Measurement]:
    rel = mnt.dataset.rm_tree
    for p in lower_paths(mnt, rel):
        timed(["find", str(p), "-printf", r"%s\n"])  # lower metadata into the cache
    return [Measurement(f"rm -rf {rel}", [timed(["rm", "-rf", str(mnt.path / rel)])])]


SCENARIOS = [
    Scenario(
        "copyup-append",
        "open O_APPEND + write 1 byte to the big lower file",
        append_big,
        writable=True,
        native_copy=("big",),
    ),
    Scenario(
        "copyup-chmod-big",
        "chmod of the big lower file (metadata-only change)",
        chmod_big,
        writable=True,
        native_copy=("big",),
    ),
    Scenario(
        "chmod-10k",
        "chmod -R g+w of the 10k-entry lower directory",
        chmod_10k,
        writable=True,
        native_copy=("dir10k",),
    ),
    Scenario(
        "rm-rf",
        "rm -rf of a large lower tree (usr/share)",
        rm_tree,
        writable=True,
        native_copy=("usr",),
    ),
]
