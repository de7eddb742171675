"""The option table: how each -o option lands in MountConfig (no mounts, no directory checks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from layerfs.attrs import Caller
from layerfs.cli import _mount_config, build_parser
from layerfs.config import IdMapping, MountConfig
from layerfs.errors import LayerfsError
from layerfs.idmap import IdMap
from mount_helper.argv import escape_path, parse_argv
from mount_helper.options import build_config

CWD = "/var/lib/containers/storage/overlay"


def cfg(*option_strings: str, mnt: str = "/m", euid: int = 0) -> MountConfig:
    argv: list[str] = []
    for o in option_strings:
        argv += ["-o", o]
    return build_config(parse_argv([*argv, mnt]), CWD, euid=euid)


def test_containers_storage_relative_lowers() -> None:
    # Older containers/storage: lowerdir=l/<26 chars>:..., run with cmd.Dir = the driver home.
    c = cfg("lowerdir=l/ABC:l/DEF,upperdir=ID/diff,workdir=ID/work", mnt="ID/merged")
    assert c.lowers == (f"{CWD}/l/ABC", f"{CWD}/l/DEF")
    assert c.upper == f"{CWD}/ID/diff"
    assert c.workdir == f"{CWD}/ID/work"
    assert c.mountpoint == f"{CWD}/ID/merged"
    assert c.warnings == ()


def test_containers_storage_full_label() -> None:
    # What overlay.go builds for a rootless container with an SELinux label and a userns.
    label = (
        "lowerdir=/s/l/A:/s/l/B,upperdir=/s/ID/diff,workdir=/s/ID/work,nodev,"
        'context="system_u:object_r:container_file_t:s0:c1,c2",'
        "uidmapping=0:1000:1:1:100000:65536,gidmapping=0:1000:1:1:100000:65536"
    )
    c = cfg(label)
    assert c.lowers == ("/s/l/A", "/s/l/B")
    want = (IdMapping(0, 1000, 1), IdMapping(1, 100000, 65536))
    assert c.uid_mappings == want
    assert c.gid_mappings == want
    assert "nodev" in c.extra_fuse_options
    assert c.warnings == ()


def test_containers_storage_id_mapping_form() -> None:
    # overlay.go writes each range as ":C:H:N" after the "=" (podman --uidmap 0:500000:65536)
    c = cfg("lowerdir=/a,uidmapping=:0:500000:65536,gidmapping=:0:1000:1:1:100000:65536")
    assert c.uid_mappings == (IdMapping(0, 500000, 65536),)
    assert c.gid_mappings == (IdMapping(0, 1000, 1), IdMapping(1, 100000, 65536))
    assert c.warnings == ()
    for bad in ("uidmapping=::0:1:1", "uidmapping=:0:1", "uidmapping=:"):
        with pytest.raises(LayerfsError):
            cfg(f"lowerdir=/a,{bad}")


def test_squash_options_and_xattr_permissions() -> None:
    c = cfg("lowerdir=/a,upperdir=/u,workdir=/w,squash_to_uid=1000,squash_to_gid=1001")
    assert (c.squash_to_uid, c.squash_to_gid) == (1000, 1001)
    c = cfg("lowerdir=/a,xattr_permissions=2")
    assert any("xattr_permissions=2" in w for w in c.warnings)
    assert cfg("lowerdir=/a,xattr_permissions=0").warnings == ()


def test_squash_to_root_yields_to_explicit_ids() -> None:
    assert (cfg("lowerdir=/a,squash_to_root").squash_to_uid, 0) == (0, 0)
    c = cfg("lowerdir=/a,squash_to_root,squash_to_uid=7")
    assert (c.squash_to_uid, c.squash_to_gid) == (7, 0)


def test_mapping_in_man_page_comma_form() -> None:
    c = cfg("lowerdir=/a,uidmapping=0:1000:1,1:100000:65536,gidmapping=0:10:5")
    assert c.uid_mappings == (IdMapping(0, 1000, 1), IdMapping(1, 100000, 65536))
    assert c.gid_mappings == (IdMapping(0, 10, 5),)


@pytest.mark.parametrize(
    "mapping",
    [
        "uidmapping=0:1000:1:1:100000:65536,gidmapping=0:1000:1:1:100000:65536",
        "uidmapping=:0:500000:65536,gidmapping=:0:1000:1:1:100000:65536",
        "uidmapping=0:1000:1,1:100000:65536,gidmapping=0:10:5,rw",
        "gidmapping=7:8:9,uidmapping=1:2:3,uidmapping=4:5:6",
        "uidmapping=0:1000",
        "gidmapping=0:1:0",
        "uidmapping",
        "uidmapping=0:1000:10:5:2000:10",
        "uidmapping=0:1000:1,1:1000:5",
    ],
)
def test_layerfs_mount_maps_ids_as_mount_layerfs(tmp_path: Path, mapping: str) -> None:
    """``layerfs mount -o`` takes uidmapping=/gidmapping= with mount.layerfs' parser: the
    same ranges, or the same refusal, for every spelling."""
    for name in ("lower", "upper", "work", "merged"):
        (tmp_path / name).mkdir()
    lower, upper, work, merged = (str(tmp_path / n) for n in ("lower", "upper", "work", "merged"))
    args = build_parser().parse_args(
        ["mount", lower, upper, merged, "--workdir", work, "-o", mapping]
    )
    try:
        helper = cfg(f"lowerdir=/a,{mapping}")
    except LayerfsError as e:
        with pytest.raises(LayerfsError) as got:
            _mount_config(args)
        assert str(got.value) == str(e)
        return
    c, _ = _mount_config(args)
    assert (c.uid_mappings, c.gid_mappings) == (helper.uid_mappings, helper.gid_mappings)
    assert c.uid_mappings or c.gid_mappings


@pytest.mark.parametrize(
    "bad",
    [
        "uidmapping=0:1000",
        "uidmapping=a:b:c",
        "gidmapping=0:1:0",
        "uidmapping",
        # overlapping ranges, as the kernel's uid_map refuses them: stored 5 shown as 1005,
        # and 2000 stored as 5 (review14: user 2000's files owned by 1005)
        "uidmapping=0:1000:10:5:2000:10",
        "gidmapping=0:1000:10,20:1005:3",  # 1005 stored two ways
        "uidmapping=4294967290:0:10",  # past 32 bits
        "gidmapping=0:4294967295:1",  # (gid_t)-1: no id
        "squash_to_uid=-1",
        "squash_to_gid=root",
        "fsync=2",
        "lowerdir=/a::/b",
        "lowerdir=/a:",
        "lowerdir=",
        "upperdir=",
    ],
)
def test_malformed_values_are_errors(bad: str) -> None:
    with pytest.raises(LayerfsError):
        cfg("lowerdir=/x," + bad if not bad.startswith("lowerdir") else bad)


def test_missing_lowerdir() -> None:
    with pytest.raises(LayerfsError, match="lowerdir"):
        cfg("upperdir=/u,workdir=/w")


def test_read_only_stack_without_upper() -> None:
    c = cfg("lowerdir=/a:/b")
    assert (c.upper, c.workdir) == (None, None)
    # mount.fuse3 passes "rw"; a stack without an upper is still mounted read-only
    assert "ro" in cfg("rw,lowerdir=/a").extra_fuse_options
    assert "rw" not in cfg("rw,lowerdir=/a").extra_fuse_options


def test_ro_with_upper_mounts_upper_read_only_on_top() -> None:
    c = cfg("lowerdir=/a:/b,upperdir=/u,workdir=/w,ro")
    assert c.lowers == ("/u", "/a", "/b")
    assert (c.upper, c.workdir) == (None, None)
    assert "ro" in c.extra_fuse_options
    # last of ro/rw wins, as in libfuse
    assert cfg("lowerdir=/a,upperdir=/u,workdir=/w,ro", "rw").upper == "/u"


def test_workdir_without_upper_is_dropped_with_a_warning() -> None:
    c = cfg("lowerdir=/a,workdir=/w")
    assert c.workdir is None
    assert any("workdir" in w for w in c.warnings)


def test_volatile_and_fsync() -> None:
    # kernel overlayfs' fsync=auto|strict|volatile (6.12+), default auto; "volatile" and
    # fuse-overlayfs' fsync=0 (it never syncs a copy-up) are volatile; fsync=1 is auto
    assert cfg("lowerdir=/a").fsync_mode == "auto"
    c = cfg("lowerdir=/a,volatile")
    assert c.fsync_mode == "volatile" and c.volatile
    for value, mode in [("0", "volatile"), ("1", "auto"), ("auto", "auto")]:
        assert cfg(f"lowerdir=/a,fsync={value}").fsync_mode == mode
    assert cfg("lowerdir=/a,fsync=strict").fsync_mode == "strict"
    assert cfg("lowerdir=/a,fsync=volatile").volatile


def test_lowerdir_plus_appends() -> None:
    c = cfg("lowerdir+=/a,lowerdir+=b")
    assert c.lowers == ("/a", f"{CWD}/b")


def test_escaped_and_quoted_paths() -> None:
    c = cfg(r"lowerdir=/a\:1:/b\,2,upperdir=" + '"/u,3"' + r",workdir=/w\\x")
    assert c.lowers == ("/a:1", "/b,2")
    assert c.upper == "/u,3"
    assert c.workdir == "/w\\x"


def test_non_utf8_paths_survive() -> None:
    weird = os.fsdecode(b"/layers/\xff\xfe")
    c = cfg("lowerdir=" + escape_path(weird))
    assert os.fsencode(c.lowers[0]) == b"/layers/\xff\xfe"


def test_generic_mount_options_are_silent() -> None:
    generic = (
        "rw,dev,suid,exec,auto,nouser,async,defaults,nofail,_netdev,noauto,user,users,"
        "x-systemd.automount,X-mount.mkdir=0755,comment=systemd.x,relatime,lazytime,"
        "default_permissions,allow_root,noacl,static_nlink,context=abc,timeout=2,"
        "redirect_dir=off,metacopy=off,index=off,xino=auto,userxattr"
    )
    c = cfg("lowerdir=/a," + generic)
    assert c.warnings == ()


def test_unknown_options_warn_but_never_fail() -> None:
    c = cfg("lowerdir=/a,frobnicate,speed=11,index=on")
    assert len(c.warnings) == 3
    assert any("frobnicate" in w for w in c.warnings)
    assert any("speed=11" in w for w in c.warnings)
    assert any("index=on" in w for w in c.warnings)


def test_ksm_option() -> None:
    assert cfg("lowerdir=/a").merge_pages is False
    assert cfg("lowerdir=/a,ksm").merge_pages is True
    assert cfg("lowerdir=/a,ksm=on").merge_pages is True
    assert cfg("lowerdir=/a,ksm,ksm=off").merge_pages is False
    with pytest.raises(LayerfsError, match="ksm=yes"):
        cfg("lowerdir=/a,ksm=yes")


def test_metacopy_option() -> None:
    assert cfg("lowerdir=/a").metacopy is False
    assert cfg("lowerdir=/a,metacopy=on").metacopy is True
    assert cfg("lowerdir=/a,metacopy=on,metacopy=off").metacopy is False
    with pytest.raises(LayerfsError, match="metacopy=yes"):
        cfg("lowerdir=/a,metacopy=yes")


def test_fuse_flags_defaults_follow_fuse_overlayfs() -> None:
    rw = "lowerdir=/a,upperdir=/u,workdir=/w"
    assert set(cfg(rw, euid=0).extra_fuse_options) == {"noatime", "suid"}
    assert set(cfg(rw, euid=1000).extra_fuse_options) == {"noatime"}
    flags = cfg(rw + ",nosuid,atime,noexec,nodev", euid=0).extra_fuse_options
    assert set(flags) == {"nosuid", "atime", "noexec", "nodev"}


def test_allow_other_debug_fsname_log() -> None:
    c = cfg("lowerdir=/a,allow_other,fsname=ctr1,log=layerfs.log")
    assert c.allow_other is True
    assert c.fsname == "ctr1"
    assert c.log_file == f"{CWD}/layerfs.log"
    c = cfg("lowerdir=/a,debug")
    assert c.debug and c.foreground


def test_last_lowerdir_wins() -> None:
    assert cfg("lowerdir=/a", "lowerdir=/b").lowers == ("/b",)


def test_podman_4_3_golden_argv() -> None:
    # Recorded from podman 4.3.1 (Debian 12) `podman run --rm` with mountopt = "nodev": the
    # driver turns nodev into a mount flag and passes only the data part, plus "volatile".
    home = "/g/overlay"
    ctr = f"{home}/3ed6ab02756a9235b3ec25def1a0674c72293eb9094af16be7171eb282ad686a"
    argv = [
        "-o",
        f"lowerdir={home}/l/W34UXANTCA7CHPMMDIUYERJWTO,upperdir={ctr}/diff,workdir={ctr}/work,"
        "volatile",
        f"{ctr}/merged",
    ]
    c = build_config(parse_argv(argv), home, euid=0)
    assert c.lowers == (f"{home}/l/W34UXANTCA7CHPMMDIUYERJWTO",)
    assert (c.upper, c.workdir, c.mountpoint) == (f"{ctr}/diff", f"{ctr}/work", f"{ctr}/merged")
    assert c.fsync_mode == "volatile"
    assert c.warnings == ()
    # `podman info` runs the program with --version alone
    assert parse_argv(["--version"]).action == "version"


def test_an_id_mapped_caller_reads_its_groups_only_when_a_check_needs_them() -> None:
    """IdMap.caller turns a caller into stored ids; its supplementary groups, not read yet,
    stay so (a /proc read costs more than a create: a mapped mount's every create, mkdir and
    chmod made one), and are read and mapped when a setgid check asks (Caller.in_group)."""
    ids = IdMap.of(
        cfg("lowerdir=/a,uidmapping=0:1000:1:1:100000:65536,gidmapping=0:1000:1:1:100000:65536")
    )
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: a process in host group 100005 (stored 6); never returns
        try:
            os.setgroups([100005])
            os.write(ready_w, b"x")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        c = ids.caller(Caller(uid=100001, gid=100001, pid=pid))
        assert (c.uid, c.gid, c.groups) == (2, 2, None)
        assert c.in_group(6) and not c.in_group(100005) and c.in_group(2)
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)
