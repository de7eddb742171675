"""Extraction against GNU tar as the oracle: random trees (dirs, files, symlinks, hard links,
odd names, modes, owners, nanosecond times, xattrs) in a PAX tar come out of the store's
extractor exactly as ``tar --xattrs --same-owner -xpf`` extracts them."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from layerfs.store.extract import extract_blob
from store.ocitools import E, make_tar, sha, snapshot

pytestmark = pytest.mark.external

NAME = st.one_of(
    st.sampled_from(["a", "b", "dir", "file.txt", "x y", "ünï", ".hidden"]),
    st.binary(min_size=1, max_size=8)
    .filter(
        lambda b: (
            b"/" not in b
            and b"\0" not in b
            and b not in (b".", b"..")
            and not b.startswith(b".wh.")
        )
    )
    .map(lambda b: b.decode("utf-8", "surrogateescape")),
)


@st.composite
def trees(draw: st.DrawFn) -> list[E]:
    entries: list[E] = []
    dirs = [""]
    files: list[str] = []
    for _ in range(draw(st.integers(1, 25))):
        parent = draw(st.sampled_from(dirs))
        name = (parent + "/" if parent else "") + draw(NAME)
        if any(e.name == name for e in entries) or any(d == name for d in dirs):
            continue
        kind = draw(st.sampled_from("ffffddlh" if files else "ffffddl"))
        mode = draw(st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2750, 0o1777, 0o000]))
        owner = draw(st.sampled_from([0, 1, 1000, 65534]))
        mtime = draw(st.integers(0, 2_000_000_000)) * 10**9 + draw(st.integers(0, 10**9 - 1))
        xattrs = draw(st.sampled_from([{}, {"user.k": b"v"}, {"user.bin": b"\x00\xff\x80"}]))
        if kind == "d":
            # GNU tar keeps a setgid bit a directory inherits from its parent (coreutils'
            # convention) where OCI tools set the header's mode: keep the oracle out of that.
            mode &= ~0o2000
            entries.append(
                E(name, "d", mode=mode | 0o700, uid=owner, gid=owner, mtime_ns=mtime, xattrs=xattrs)
            )
            dirs.append(name)
        elif kind == "f":
            data = draw(st.binary(max_size=3000))
            entries.append(
                E(
                    name,
                    "f",
                    data=data,
                    mode=mode,
                    uid=owner,
                    gid=owner,
                    mtime_ns=mtime,
                    xattrs=xattrs,
                )
            )
            files.append(name)
        elif kind == "l":
            target = draw(st.sampled_from(["/etc/passwd", "../x", "a", "."]))
            entries.append(E(name, "l", link=target, uid=owner, gid=owner, mtime_ns=mtime))
        else:
            entries.append(E(name, "h", link=draw(st.sampled_from(files))))
    return entries


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@given(trees())
def test_extraction_matches_gnu_tar(entries: list[E]) -> None:
    tar = make_tar(entries)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "tar.tar").write_bytes(tar)
        ours, theirs = tmp / "ours", tmp / "theirs"
        ours.mkdir()
        theirs.mkdir()
        subprocess.run(
            [
                "tar",
                "--xattrs",
                "--xattrs-include=*",
                "--same-owner",
                "--numeric-owner",
                "-xpf",
                str(tmp / "tar.tar"),
                "-C",
                str(theirs),
            ],
            check=True,
            capture_output=True,
        )
        with open(tmp / "tar.tar", "rb") as f:
            extract_blob(
                f, "none", digest=sha(tar), size=len(tar), diff_id=sha(tar), dest=str(ours)
            )
        assert snapshot(ours, times=True) == snapshot(theirs, times=True)
        for dirpath, dirnames, filenames in os.walk(theirs):
            for n in [*dirnames, *filenames]:
                p = os.path.join(dirpath, n)
                q = os.path.join(ours, os.path.relpath(p, theirs))
                want = {
                    x: os.getxattr(p, x, follow_symlinks=False)
                    for x in os.listxattr(p, follow_symlinks=False)
                }
                got = {
                    x: os.getxattr(q, x, follow_symlinks=False)
                    for x in os.listxattr(q, follow_symlinks=False)
                }
                assert got == want, p
