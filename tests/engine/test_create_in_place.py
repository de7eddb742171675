"""Engine tier: which new objects are made in place in one call (Namespace._as_made) and which
are built in the workdir and renamed into place, and that both give the owner and mode the
kernel's overlay gives (Namespace._owner, acl.inherit): by kind, by caller (the daemon's own
ids or another user's), by parent (plain, setgid, with a default ACL), by mode (setuid and
setgid bits, bits the process umask would cut), and over a whiteout the lowers do not explain
(an exclusive create in place meets it, and the object is built over it instead).

Crash atomicity of both ways is tests/reliability/test_crash_points.py's; equality with the
kernel, tests/diff and tests/reliability/test_permissions.py's.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from layerfs.attrs import Caller
from layerfs.inodes import ROOT_ID
from layerfs.overlay import Overlay

from ._stack import make_stack, overlay
from .test_copyup import check_upper

USER = Caller(1000, 1000, 0o022, 1)
ROOT = Caller(0, 0, 0o022, 1)
GROUP = 50  # the setgid parent's group: neither caller's
KINDS = ["file", "dir", "fifo", "symlink"]


@pytest.fixture(autouse=True)
def process_umask() -> Iterator[None]:
    """The umask a daemon is started with (mount._open sets 0 before serving; the engine
    alone keeps the process'), so that what it cuts is known."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _make(ov: Overlay, parent: int, name: bytes, kind: str, mode: int, caller: Caller) -> None:
    if kind == "dir":
        trio.run(ov.mkdir, parent, name, mode, caller)
    elif kind == "symlink":
        trio.run(ov.symlink, parent, name, b"target", caller)
    else:
        fmt = stat.S_IFREG if kind == "file" else stat.S_IFIFO
        trio.run(ov.mknod, parent, name, fmt | mode, 0, caller)


def _parent(up: Path, ov: Overlay, how: str) -> int:
    """An upper directory made by the mount (mkdir), plain, setgid, or with a default ACL."""
    trio.run(ov.mkdir, ROOT_ID, b"p", 0o777, Caller(0, 0, 0, 1))
    if how == "setgid":
        os.chown(up / "p", 0, GROUP)
        os.chmod(up / "p", 0o2777)
    elif how == "acl":
        subprocess.run(["setfacl", "-d", "-m", "u:1234:rwx", str(up / "p")], check=True)
    return ov.lookup(ROOT_ID, b"p").id


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("who", ["root", "user"])
@pytest.mark.parametrize("how", ["plain", "setgid", "acl"])
def test_owner_mode_and_way(tmp_path: Path, kind: str, who: str, how: str) -> None:
    """The daemon (root here) makes in place what it would make as asked by itself: the
    root caller's object where no default ACL is; another user's is built (chown, chmod),
    as is every object under a default ACL (but a symlink, which takes none). Both ways
    give the caller's uid, the caller's gid or a setgid parent's (and S_ISGID to a
    directory there), and the mode cut by the caller's umask or the ACL."""
    low, up, work, mnt = make_stack(tmp_path)
    ov = overlay(low, up, work, mnt)
    try:
        caller = ROOT if who == "root" else USER
        p = _parent(up, ov, how)
        before = dict(ov.ns.stats)
        _make(ov, p, b"new", kind, 0o775, caller)
        st = os.lstat(up / "p" / "new")
        made = {k: v - before[k] for k, v in ov.ns.stats.items()}
        in_place = who == "root" and (how != "acl" or kind == "symlink")
        assert made == {"in_place": int(in_place), "in_work": int(not in_place)}
        assert (st.st_uid, st.st_gid) == (caller.uid, GROUP if how == "setgid" else caller.gid)
        if kind == "symlink":
            assert stat.S_ISLNK(st.st_mode)
        else:
            want = 0o755
            if how == "acl":  # the default ACL's entries, not the umask (posix_acl_create)
                want = 0o775
                assert os.getxattr(up / "p" / "new", "system.posix_acl_access")
            if kind == "dir" and how == "setgid":
                want |= stat.S_ISGID
            assert stat.S_IMODE(st.st_mode) == want, oct(st.st_mode)
        check_upper(up, work)
    finally:
        ov.close()


MODES = {"setuid": 0o4755, "setgid": 0o2755, "sticky": 0o1755, "umask-cut": 0o666}


@pytest.mark.parametrize(
    ("kind", "mode"),
    [(k, m) for k in ("file", "fifo") for m in MODES]
    # a directory's setuid and setgid bits never come: the kernel's mkdir drops them
    + [("dir", "sticky"), ("dir", "umask-cut")],
)
def test_modes_the_daemon_cannot_give_by_itself_are_built(
    tmp_path: Path, kind: str, mode: str
) -> None:
    """Setuid and setgid bits are left to the build (the kernel may strip setgid at a
    create: mode_strip_sgid), as are modes the daemon's umask would cut; the sticky bit is
    made in place. Each object gets the mode asked."""
    low, up, work, mnt = make_stack(tmp_path)
    ov = overlay(low, up, work, mnt)
    try:
        caller = Caller(0, 0, 0, 1)  # the mode asked is the mode given
        _make(ov, ROOT_ID, b"new", kind, MODES[mode], caller)
        assert ov.ns.stats["in_work"] == (0 if mode == "sticky" else 1)
        assert stat.S_IMODE(os.lstat(up / "new").st_mode) == MODES[mode]
        check_upper(up, work)
    finally:
        ov.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_whiteout_the_lowers_do_not_explain_is_built_over(tmp_path: Path, kind: str) -> None:
    """A char whiteout in the upper over a name no lower has (left by an earlier stack):
    the exclusive create in place fails on it, and the object is built in the workdir and
    exchanged with it, as any create over a whiteout; a directory made there is opaque.
    A name the upper holds is EEXIST the same way."""
    low, up, work, mnt = make_stack(tmp_path)
    os.mknod(up / "w", stat.S_IFCHR, 0)
    (up / "taken").write_text("t\n")
    ov = overlay(low, up, work, mnt)
    try:
        with pytest.raises(FileNotFoundError):
            ov.lookup(ROOT_ID, b"w")
        _make(ov, ROOT_ID, b"w", kind, 0o755, ROOT)
        assert ov.ns.stats == {"in_place": 0, "in_work": 1}
        st = os.lstat(up / "w")
        assert not stat.S_ISCHR(st.st_mode)
        if kind == "dir":
            assert os.getxattr(up / "w", "trusted.overlay.opaque") == b"y"
        with pytest.raises(FileExistsError):
            _make(ov, ROOT_ID, b"taken", kind, 0o755, ROOT)
        check_upper(up, work)
    finally:
        ov.close()


def test_a_directory_in_a_merged_parent_is_opaque_in_place(tmp_path: Path) -> None:
    """mkdir in a merged directory (redirect_dir on) marks the new directory opaque after
    making it in place, as ovl_create_upper does."""
    low, up, work, mnt = make_stack(tmp_path)
    (low / "m").mkdir()
    (low / "m" / "x").write_text("x\n")
    ov = overlay(low, up, work, mnt)
    try:
        m = ov.lookup(ROOT_ID, b"m").id
        trio.run(ov.mkdir, m, b"sub", 0o755, ROOT)  # copies m up first
        assert ov.ns.stats == {"in_place": 1, "in_work": 0}
        assert os.getxattr(up / "m" / "sub", "trusted.overlay.opaque") == b"y"
        check_upper(up, work)
    finally:
        ov.close()


def test_names_in_a_directory_made_here_are_found(tmp_path: Path) -> None:
    """In a directory this mount made, a name is first looked for by access(F_OK)
    (lookup.resolve: most lookups there are of new names); one found is lstat'ed and
    resolves as anywhere else, for every kind, and a missing one is absent."""
    low, up, work, mnt = make_stack(tmp_path)
    ov = overlay(low, up, work, mnt)
    try:
        p = _parent(up, ov, "plain")
        assert ov.table.get(p).no_oci_whiteouts
        for kind in KINDS:
            _make(ov, p, kind.encode(), kind, 0o750, ROOT)
        for kind in KINDS:
            st = os.lstat(up / "p" / kind)
            attr = ov.lookup(p, kind.encode())
            assert (attr.mode, attr.size) == (st.st_mode, st.st_size)
        assert ov.find(p, b"missing") is None
    finally:
        ov.close()


def test_a_default_acl_set_through_the_mount_is_inherited(tmp_path: Path) -> None:
    """A directory read once to have no default ACL is not asked again (Node.no_default_acl)
    until one is set through the mount: the next object in it inherits it (built, with its
    access ACL); once removed, objects are made in place again."""
    low, up, work, mnt = make_stack(tmp_path)
    ov = overlay(low, up, work, mnt)
    try:
        p = _parent(up, ov, "plain")
        _make(ov, p, b"before", "file", 0o644, ROOT)
        assert ov.table.get(p).no_default_acl
        subprocess.run(["setfacl", "-d", "-m", "u:1234:rwx", str(up / "p")], check=True)
        value = os.getxattr(up / "p", "system.posix_acl_default")
        os.removexattr(up / "p", "system.posix_acl_default")
        trio.run(ov.setxattr, p, b"system.posix_acl_default", value)
        _make(ov, p, b"after", "file", 0o644, ROOT)
        assert os.getxattr(up / "p" / "after", "system.posix_acl_access")
        # p (0777: the process umask 022 cuts it, so built), before; after
        assert ov.ns.stats == {"in_place": 1, "in_work": 2}
        trio.run(ov.removexattr, p, b"system.posix_acl_default")
        _make(ov, p, b"again", "file", 0o644, ROOT)
        assert ov.ns.stats == {"in_place": 2, "in_work": 2}
        check_upper(up, work)
    finally:
        ov.close()
