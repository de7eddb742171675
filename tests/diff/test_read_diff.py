"""Read path, differentially: layerfs (or the stand-in) vs kernel overlayfs on identical stacks.

Every scenario is mounted with an upper (empty) and as a read-only stack; OCI and xattr dialects
are converted to kernel form for the reference mount.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.diff import (
    Pair,
    check_lookups,
    check_merged,
    expect_quirks,
    explore_only_layerfs,
    stack_options_for,
)
from support.layerspec import (
    CAP_NET_BIND_SERVICE,
    Device,
    Fifo,
    HardLink,
    LayerSpec,
    Node,
    d,
    f,
    layer_stacks,
    sym,
    wh,
)
from support.mounts import Subject

pytestmark = [pytest.mark.fuse, pytest.mark.kernel_overlay]


def _dialect_stack(style: str) -> LayerSpec:
    """Three layers whose top hides a file, a dir and a symlink with one whiteout dialect."""
    return LayerSpec(
        [
            d(
                {
                    b"etc": d({b"passwd": wh(style), b"hosts": f(b"top\n")}),
                    b"var": wh(style),
                    b"link": wh(style),
                }
            ),
            d({b"etc": d({b"group": f(b"mid\n"), b"passwd": f(b"mid\n")}), b"var": d({b"x": f()})}),
            d(
                {
                    b"etc": d({b"passwd": f(b"root:x:0:0\n"), b"shadow": f(b"s", mode=0o600)}),
                    b"var": d({b"log": d({b"syslog": f(b"log")})}),
                    b"link": sym(b"etc/passwd"),
                }
            ),
        ]
    )


def _opaque_stack(style: str) -> LayerSpec:
    return LayerSpec(
        [
            d({b"usr": d({b"lib": d({b"new": f(b"n")}, opaque=style)})}),
            d({b"usr": d({b"lib": d({b"mid": f(b"m")}), b"bin": d({b"sh": f(b"#!")})})}),
            d({b"usr": d({b"lib": d({b"old": f(b"o"), b"sub": d({b"deep": f()})})})}),
        ]
    )


SCENARIOS: dict[str, tuple[LayerSpec, set[str]]] = {
    **{
        f"whiteout-{s}": (_dialect_stack(s), {f"whiteout:{s}"})
        for s in ("char", "oci", "xattr", "user_xattr")
    },
    **{f"opaque-{s}": (_opaque_stack(s), {f"opaque:{s}"}) for s in ("trusted", "user", "oci")},
    "replace-kinds": (
        LayerSpec(
            [
                d(
                    {
                        b"a": f(b"file over dir"),
                        b"b": d({b"in": f()}),
                        b"c": sym(b"a"),
                        b"e": Fifo(),
                    }
                ),
                d({b"a": d({b"x": f()}), b"b": f(b"file under dir"), b"c": d(), b"e": f(b"e")}),
            ]
        ),
        set(),
    ),
    "dir-over-whiteout": (
        LayerSpec(
            [
                d({b"d": d({b"new": f(b"top")})}),
                d({b"d": wh()}),
                d({b"d": d({b"old": f(b"must stay hidden")})}),
            ]
        ),
        set(),
    ),
    "whiteouts-hiding-nothing": (
        LayerSpec(
            [
                d({b"gone": wh(), b"oci": wh("oci"), b"keep": f(b"k")}),
                d({b"bottom-wh": wh(), b"x": f()}),
            ]
        ),
        set(),
    ),
    "metadata": (
        LayerSpec(
            [
                d(
                    {
                        b"suid": f(b"\x7fELF", mode=0o4755, uid=1000, gid=1000),
                        b"sgid": f(b"g", mode=0o2711, gid=50),
                        b"cap": f(
                            b"ping",
                            mode=0o755,
                            xattrs={b"security.capability": CAP_NET_BIND_SERVICE},
                        ),
                        b"x": f(
                            b"x", xattrs={b"user.mime": b"text/plain", b"trusted.t": b"\x00\x01"}
                        ),
                        b"tmp": d(mode=0o1777, xattrs={b"user.dir": b"1"}),
                        b"ro": f(b"r", mode=0o444, mtime_ns=1),
                        b"nobody": sym(b"/nonexistent", uid=65534, gid=65534),
                    }
                ),
                d({b"x": f(b"lower x", xattrs={b"user.lower": b"hidden"})}),
            ]
        ),
        set(),
    ),
    "hardlinks": (
        LayerSpec(
            [
                d({b"top": f(b"t"), b"top2": HardLink(b"top")}),
                d(
                    {
                        b"a": f(b"shared", mode=0o640),
                        b"dir": d({b"b": HardLink(b"a")}),
                        b"c": HardLink(b"a"),
                        b"top": f(b"hidden by top"),
                    }
                ),
            ]
        ),
        set(),
    ),
    "symlinks-outside": (
        LayerSpec(
            [
                d(
                    {
                        b"abs": sym(b"/etc/passwd"),
                        b"up": sym(b"../../.."),
                        b"dangling": sym(b"nope"),
                        b"loop": sym(b"loop"),
                        b"dir": d({b"rel": sym(b"../abs")}),
                    }
                ),
                d({b"abs": f(b"hidden")}),
            ]
        ),
        set(),
    ),
    "specials": (
        LayerSpec(
            [
                d({b"fifo": Fifo(), b"null": Device("c", 1, 3), b"loop": Device("b", 7, 200)}),
                d({b"fifo": f(b"under")}),
            ]
        ),
        set(),
    ),
    "odd-names": (
        LayerSpec(
            [
                d(
                    {
                        b"\xff\xfe": f(b"latin"),
                        b"n" * 255: f(b"long"),
                        b"new\nline": d({b"x": f()}),
                        b" lead": f(),
                        b"-dash": f(),
                        b"caf\xc3\xa9": wh("oci"),
                    }
                ),
                d(
                    {
                        b"caf\xc3\xa9": f(b"hidden"),
                        b"n" * 255: f(b"lower long"),
                        b"new\nline": d({b"y": f()}),
                    }
                ),
            ]
        ),
        set(),
    ),
    "opaque-x-is-not-opaque": (
        LayerSpec(
            [
                d({b"dir": d({b"gone": wh("xattr"), b"top": f()})}),
                d({b"dir": d({b"gone": f(b"g"), b"still": f(b"s")})}),
            ]
        ),
        {"whiteout:xattr"},
    ),
    "xattr-whiteout-in-opaque-y-dir": (
        LayerSpec(
            [
                d({b"a": d({b"b": wh("user_xattr"), b"t": f()}, opaque="user")}),
                d({b"a": d({b"b": f(b"lower"), b"k": f(b"hidden by opaque")})}),
            ]
        ),
        {"whiteout:user_xattr", "xwhiteout-ghost"},
    ),
    "opaque-lower-root": (
        LayerSpec(
            [
                d({b"top": f()}),
                d({b"mid": f()}, opaque="trusted"),
                d({b"bottom": f(b"kernel shows me")}),
            ]
        ),
        {"opaque:root"},
    ),
    "deep-merge": (
        LayerSpec(
            [
                d({b"a": d({b"b": d({b"c": d({b"1": f(b"1")})})})}),
                d({b"a": d({b"b": d({b"c": d({b"2": f(b"2")}), b"x": wh()})})}),
                d({b"a": d({b"b": d({b"c": d({b"3": f(b"3")}), b"x": d({b"gone": f()})})})}),
                d({b"a": d({b"b": d({b"c": d({b"4": f(b"4")})})}, mode=0o700)}),
            ]
        ),
        set(),
    ),
}


@pytest.mark.parametrize("upper", [True, False], ids=["upper", "readonly"])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario(
    tmp_path: Path, subject: Subject, request: pytest.FixtureRequest, name: str, upper: bool
) -> None:
    spec, needs = SCENARIOS[name]
    expect_quirks(request, subject, needs)
    pair = Pair.create(tmp_path, subject, spec, upper=upper)
    with pair.mounted() as (s, k):
        check_lookups(pair, s, k, what=name)
        check_merged(s, k, what=name)


def _check_stack(tmp_path: Path, subject: Subject, spec: LayerSpec, upper: bool, what: str) -> None:
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    try:
        pair = Pair.create(work, subject, spec, upper=upper)
        with pair.mounted() as (s, k):
            check_lookups(pair, s, k, what=what)
            check_merged(s, k, what=what)
    finally:
        shutil.rmtree(work)


@pytest.mark.slow
def test_random_stacks(tmp_path: Path, subject: Subject) -> None:
    explore_only_layerfs(subject)

    @given(spec=layer_stacks(stack_options_for(subject)), upper=st.booleans())
    def run(spec: LayerSpec, upper: bool) -> None:
        _check_stack(tmp_path, subject, spec, upper, "random stack")

    run()


@pytest.mark.slow
def test_random_deep_stacks(tmp_path: Path, subject: Subject) -> None:
    """Stacks of 8 to 12 lowers: lookups then start from a per-directory index of where each
    name first appears (layers.LowerIndexes) instead of asking every layer."""
    explore_only_layerfs(subject)
    opts = dataclasses.replace(stack_options_for(subject), min_layers=8, max_layers=12)

    @settings(max_examples=15)
    @given(spec=layer_stacks(opts), upper=st.booleans())
    def run(spec: LayerSpec, upper: bool) -> None:
        _check_stack(tmp_path, subject, spec, upper, "deep random stack")

    run()


# --- readdir offsets ----------------------------------------------------------------------


class _Dirent(ctypes.Structure):
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir.restype = ctypes.POINTER(_Dirent)
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.telldir.restype = ctypes.c_long
_libc.telldir.argtypes = [ctypes.c_void_p]
_libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
_libc.closedir.argtypes = [ctypes.c_void_p]


def _listing_with_offsets(path: bytes) -> list[tuple[bytes, int]]:
    """Every (name, telldir after reading it) of one opendir stream."""
    dirp = _libc.opendir(path)
    assert dirp, os.strerror(ctypes.get_errno())
    out = []
    try:
        while ent := _libc.readdir(dirp):
            out.append((ent.contents.d_name, _libc.telldir(dirp)))
    finally:
        _libc.closedir(dirp)
    return out


def _rest_after_seek(path: bytes, pos: int) -> list[bytes]:
    dirp = _libc.opendir(path)
    assert dirp
    try:
        _libc.seekdir(dirp, pos)
        out = []
        while ent := _libc.readdir(dirp):
            out.append(ent.contents.d_name)
        return out
    finally:
        _libc.closedir(dirp)


def _big_spec(n: int) -> LayerSpec:
    top: dict[bytes, Node] = {b"t%05d" % i: f() for i in range(0, n, 3)}
    top |= {b"m%05d" % i: wh() for i in range(0, n, 7)}
    return LayerSpec(
        [
            d({b"big": d(top)}),
            d({b"big": d({b"m%05d" % i: f(b"m") for i in range(n)})}),
        ]
    )


@pytest.mark.slow
def test_readdir_offsets_big_dir(tmp_path: Path, subject: Subject) -> None:
    pair = Pair.create(tmp_path, subject, _big_spec(5000))
    with pair.mounted() as (s, k):
        sb, kb = os.fsencode(s.mnt / "big"), os.fsencode(k.mnt / "big")
        full = _listing_with_offsets(sb)
        names = [n for n, _ in full]
        assert len(names) == len(set(names)), "duplicate names in one readdir stream"
        assert set(names) == {n for n, _ in _listing_with_offsets(kb)}
        # seekdir to offsets taken by telldir must resume exactly after that entry.
        for i in (0, 1, 99, len(full) // 2, len(full) - 2, len(full) - 1):
            assert _rest_after_seek(sb, full[i][1]) == names[i + 1 :], f"seek after entry {i}"
        # Partial scandir then reopen, twice at once: each stream complete on its own.
        it1, it2 = os.scandir(sb), os.scandir(sb)
        try:
            part1 = [next(it1).name for _ in range(1000)]
            part2 = [next(it2).name for _ in range(10)]
            with os.scandir(sb) as it3:
                partial = [next(it3).name for _ in range(2500)]
            part1 += [e.name for e in it1]
            part2 += [e.name for e in it2]
        finally:
            it1.close()
            it2.close()
        assert sorted(part1) == sorted(part2) == sorted(n for n in names if n not in (b".", b".."))
        assert set(partial) <= set(names)
        check_merged(s, k, what="big dir")
