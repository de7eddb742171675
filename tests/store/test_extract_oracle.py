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


def _gnu_tar_x(tar: Path, dest: Path) -> None:
    opts = ["--xattrs", "--xattrs-include=*", "--same-owner", "--numeric-owner"]
    subprocess.run(
        ["tar", *opts, "-xpf", str(tar), "-C", str(dest)],
        check=True,
        capture_output=True,
    )


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@given(trees(), st.data())
def test_implied_parents_match_extraction_onto_the_layer_below(
    base: list[E], data: st.DataObject
) -> None:
    """A second layer whose tar holds files deep in the first layer's directories and none
    of those directories (as umoci repack writes it): each directory it only implies has, in
    its own layer, the mode, owner and xattrs GNU tar leaves on it when the second tar is
    extracted onto the first (umoci unpack's way), and the first layer's mtime."""
    dirs = [e.name for e in base if e.kind == "d"]
    taken = {e.name for e in base}
    top = []
    for parent in data.draw(st.lists(st.sampled_from(dirs), max_size=4) if dirs else st.just([])):
        name = f"{parent}/new-{len(top)}"
        if name not in taken:
            top.append(E(name, data=b"top"))
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        base_tar, top_tar = make_tar(base), make_tar(top)
        (tmp / "base.tar").write_bytes(base_tar)
        (tmp / "top.tar").write_bytes(top_tar)
        theirs, low, up = tmp / "theirs", tmp / "low", tmp / "up"
        for d in (theirs, low, up):
            d.mkdir()
        _gnu_tar_x(tmp / "base.tar", theirs)
        _gnu_tar_x(tmp / "top.tar", theirs)
        for tar, dest, lowers in ((base_tar, low, None), (top_tar, up, [str(low)])):
            with open(tmp / ("base.tar" if dest == low else "top.tar"), "rb") as f:
                extract_blob(
                    f,
                    "none",
                    digest=sha(tar),
                    size=len(tar),
                    diff_id=sha(tar),
                    dest=str(dest),
                    lowers=lowers,
                )
        for dirpath, dirnames, _files in os.walk(up):
            for n in dirnames:
                rel = os.path.relpath(os.path.join(dirpath, n), up)
                mine, want, below = (os.lstat(r / rel) for r in (up, theirs, low))
                assert (mine.st_mode, mine.st_uid, mine.st_gid) == (
                    want.st_mode,
                    want.st_uid,
                    want.st_gid,
                ), rel
                assert mine.st_mtime_ns == below.st_mtime_ns, rel
                assert sorted(os.listxattr(up / rel)) == sorted(os.listxattr(theirs / rel)), rel
