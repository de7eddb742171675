"""The command-line shapes and the option-string splitting of mount.layerfs (no mounts)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mount_helper.argv import (
    UsageError,
    called_as_mount_helper,
    decode_value,
    escape_path,
    parse_argv,
    split_options,
    split_path_list,
)

# --- argv shapes ---------------------------------------------------------------------------


def test_containers_storage_shape() -> None:
    # drivers/overlay/overlay.go: exec.Command(mountProgram, "-o", label, target)
    inv = parse_argv(["-o", "lowerdir=l/A:l/B,upperdir=ID/diff,workdir=ID/work", "ID/merged"])
    assert inv.action == "mount"
    assert inv.mountpoint == "ID/merged"
    assert inv.source is None
    assert inv.option_strings == ("lowerdir=l/A:l/B,upperdir=ID/diff,workdir=ID/work",)
    assert not inv.foreground and not inv.fake


def test_mount_fuse3_shape() -> None:
    # util/mount.fuse.c: TYPE SOURCE MOUNTPOINT -o OPTS (dev,suid appended by mount.fuse3)
    inv = parse_argv(["overlay", "/mnt/x", "-o", "rw,lowerdir=/a,dev,suid"])
    assert (inv.source, inv.mountpoint) == ("overlay", "/mnt/x")
    assert inv.option_strings == ("rw,lowerdir=/a,dev,suid",)


def test_mount8_helper_shape_with_all_flags() -> None:
    # libmount exec_helper: helper SOURCE TARGET [-s] [-f] [-n] [-v] [-o OPTS] [-t TYPE]
    argv = ["overlay", "/mnt/x", "-s", "-f", "-n", "-v", "-o", "lowerdir=/a", "-t", "fuse.layerfs"]
    inv = parse_argv(argv, prog="/sbin/mount.fuse.layerfs")
    assert inv.fake and not inv.foreground
    assert inv.fstype == "fuse.layerfs"
    assert inv.mountpoint == "/mnt/x"


def test_f_means_foreground_outside_mount8() -> None:
    inv = parse_argv(["-f", "-o", "lowerdir=/a", "/m"], prog="/usr/bin/mount.layerfs")
    assert inv.foreground and not inv.fake


@pytest.mark.parametrize("flag", ["-d", "--debug"])
def test_debug_implies_foreground(flag: str) -> None:
    inv = parse_argv([flag, "-o", "lowerdir=/a", "/m"])
    assert inv.debug and inv.foreground


def test_repeated_and_glued_o() -> None:
    inv = parse_argv(["-olowerdir=/a", "-o", "upperdir=/u", "/m", "-o", "workdir=/w"])
    assert inv.option_strings == ("lowerdir=/a", "upperdir=/u", "workdir=/w")


def test_r_and_w_flags_become_options() -> None:
    assert parse_argv(["-r", "-o", "x", "/m"]).option_strings == ("ro", "x")
    assert parse_argv(["/m", "-w"]).option_strings == ("rw",)


def test_double_dash_ends_flags() -> None:
    inv = parse_argv(["-o", "lowerdir=/a", "--", "-weird-dir"])
    assert inv.mountpoint == "-weird-dir"


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(flag: str) -> None:
    assert parse_argv([flag]).action == "version"
    assert parse_argv(["-o", "lowerdir=/a", flag, "/m"]).action == "version"


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help(flag: str) -> None:
    assert parse_argv([flag]).action == "help"


def test_install_flag() -> None:
    assert parse_argv(["--install-mount-helper"]).install_dir == "/sbin"
    inv = parse_argv(["--install-mount-helper=/x/y"])
    assert (inv.action, inv.install_dir) == ("install", "/x/y")


def test_unknown_flag_is_a_warning() -> None:
    inv = parse_argv(["--frobnicate", "-o", "lowerdir=/a", "/m"])
    assert inv.mountpoint == "/m"
    assert any("--frobnicate" in w for w in inv.warnings)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no mount point"),
        (["-o", "lowerdir=/a"], "no mount point"),
        (["a", "b", "c"], "too many"),
        (["/m", "-o"], "needs an argument"),
        (["/m", "-t"], "needs an argument"),
        (["src", "/m", "-N", "/proc/1/ns/mnt"], "namespace"),
        ([""], "empty mount point"),
    ],
)
def test_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_argv(argv)


def test_called_as_mount_helper() -> None:
    assert called_as_mount_helper("/sbin/mount.fuse.layerfs")
    assert called_as_mount_helper("mount.fuse3.layerfs")
    assert not called_as_mount_helper("/usr/bin/mount.layerfs")
    assert not called_as_mount_helper("layerfs")


# --- option strings ------------------------------------------------------------------------


def test_split_plain() -> None:
    assert split_options("a,b=1,,c,") == ["a", "b=1", "c"]


def test_split_keeps_quoted_commas() -> None:
    # label.FormatMountLabel appends context="..." with MCS categories separated by commas
    optstr = 'lowerdir=/a,context="system_u:object_r:container_file_t:s0:c1,c2",nodev'
    pieces = split_options(optstr)
    assert pieces == [
        "lowerdir=/a",
        'context="system_u:object_r:container_file_t:s0:c1,c2"',
        "nodev",
    ]
    assert (
        decode_value(pieces[1].partition("=")[2]) == "system_u:object_r:container_file_t:s0:c1,c2"
    )


def test_split_honours_backslash_comma() -> None:
    assert split_options(r"upperdir=/a\,b,workdir=/w") == [r"upperdir=/a\,b", "workdir=/w"]
    assert decode_value(r"/a\,b") == "/a,b"


def test_lowerdir_escaped_colon() -> None:
    assert split_path_list(r"/a\:b:/c") == ["/a:b", "/c"]
    assert split_path_list(r"/x\\:/y") == ["/x\\", "/y"]


def test_lowerdir_empty_entries_are_kept_for_the_caller() -> None:
    assert split_path_list("/a::/b") == ["/a", "", "/b"]
    assert split_path_list("") == [""]


def test_trailing_backslash_is_literal() -> None:
    assert decode_value("/a\\") == "/a\\"


# Paths as the kernel and podman see them: any character but NUL, including the separators,
# quotes, backslashes, '=' and undecodable bytes (surrogate-escaped, as Python decodes argv).
_path_chars = st.one_of(
    st.characters(blacklist_characters="\x00", codec="utf-8"),
    st.sampled_from([",", ":", "\\", '"', "=", " ", os.fsdecode(b"\xff")]),
)
_paths = st.text(_path_chars, min_size=1, max_size=20).map(lambda s: "/" + s)


@given(st.lists(_paths, min_size=1, max_size=5), _paths, _paths)
def test_escape_round_trip(lowers: list[str], upper: str, work: str) -> None:
    optstr = (
        "lowerdir=" + ":".join(escape_path(p) for p in lowers)
        + ",upperdir=" + escape_path(upper)
        + ",workdir=" + escape_path(work)
        + ',context="a,b:c"'
    )  # fmt: skip
    pieces = split_options(optstr)
    assert len(pieces) == 4
    named = {p.partition("=")[0]: p.partition("=")[2] for p in pieces}
    assert split_path_list(named["lowerdir"]) == lowers
    assert decode_value(named["upperdir"]) == upper
    assert decode_value(named["workdir"]) == work
    assert decode_value(named["context"]) == "a,b:c"


_plain = st.text(st.characters(blacklist_characters='\x00,"\\=', codec="utf-8"), min_size=1)


@given(st.lists(st.tuples(_plain, st.text(st.characters(blacklist_characters='\x00"\\')))))
def test_quoted_values_never_split(options: list[tuple[str, str]]) -> None:
    optstr = ",".join(f'{name}="{value}"' for name, value in options)
    pieces = split_options(optstr)
    assert [(p.partition("=")[0], decode_value(p.partition("=")[2])) for p in pieces] == options
