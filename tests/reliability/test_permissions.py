"""Permission checks for unprivileged users, differentially: the same operations, as uid 65534
("other") and uid 1000 ("owner"), against layerfs and kernel overlayfs built on one lower, with
errno compared per operation and the merged trees compared at the end.

Covers read/write/execute/search, creating in an unwritable directory, sticky-directory unlink
and rename, chmod/chown of others' files, setuid/setgid cleared on write, utime rules, user and
trusted xattrs, protected hard links and setgid directories. layerfs runs as root with its
defaults (allow_other, default_permissions), as a container engine runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.mounts import mount_kernel
from support.snapshot import compare, fs_clock_ns, snapshot

from ._asuser import CAP
from ._helpers import layerfs_daemon, needs_root

pytestmark = [pytest.mark.fuse, pytest.mark.kernel_overlay, needs_root]

ASUSER = Path(__file__).with_name("_asuser.py")
OWNER, OTHER, G = 1000, 65534, 1000
ACLU = 2001  # a user that only ACL entries name
SCRIPT = b"#!/bin/sh\nexit 7\n"


def _mk(path: Path, mode: int, uid: int = 0, gid: int = 0, data: bytes | None = None) -> None:
    if data is None:
        path.mkdir()
    else:
        path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _make_lower(lower: Path) -> None:
    lower.mkdir()
    os.chmod(lower, 0o755)
    _mk(lower / "pub", 0o755)
    for name, mode, data in [
        ("r644", 0o644, b"data"),
        ("w666", 0o666, b"data"),
        ("x755", 0o755, SCRIPT),
        ("x700", 0o700, SCRIPT),
        ("x744", 0o744, SCRIPT),
        ("n000", 0o000, b"secret"),
    ]:
        _mk(lower / "pub" / name, mode, data=data)
    _mk(lower / "home", 0o755, OWNER, G)
    for name, mode in [
        ("own600", 0o600),
        ("own644", 0o644),
        ("suid", 0o4757),
        ("suid2", 0o4755),
        ("sgid", 0o2777),
        ("sgidnx", 0o2767),
        ("suid3", 0o6755),
        ("suid4", 0o6755),
        ("suid5", 0o4777),
        ("later", 0o666),
        ("suid6", 0o6777),
    ]:
        _mk(lower / "home" / name, mode, OWNER, G, b"owned")
    _mk(lower / "pub" / "capf", 0o755, data=SCRIPT)
    os.setxattr(lower / "pub" / "capf", "security.capability", CAP)
    _mk(lower / "home" / "sub", 0o700, OWNER, G)
    _mk(lower / "home" / "sub" / "f", 0o644, OWNER, G, b"private")
    _mk(lower / "ro", 0o555)
    _mk(lower / "ro" / "f", 0o666, data=b"in a read-only dir")
    _mk(lower / "noexec", 0o744)
    _mk(lower / "noexec" / "f", 0o644, data=b"unreachable")
    _mk(lower / "tmp", 0o1777)
    _mk(lower / "tmp" / "of", 0o666, OWNER, G, b"other's file")
    _mk(lower / "tmp" / "od", 0o777, OWNER, G)
    _mk(lower / "wdir", 0o777)
    _mk(lower / "wdir" / "of", 0o644, OWNER, G, b"owner's file")
    _mk(lower / "sgdir", 0o2777, 0, G)
    _make_acl_lower(lower / "acl")


def _setfacl(path: Path, *args: str) -> None:
    subprocess.run(["setfacl", *args, str(path)], check=True)


def _make_acl_lower(acl: Path) -> None:
    """Objects whose POSIX ACLs say more than their mode (setfacl, as root)."""
    _mk(acl, 0o755)
    _mk(acl / "deny", 0o644, data=b"not for 2001")
    _setfacl(acl / "deny", "-m", f"u:{ACLU}:---")
    _mk(acl / "ddeny", 0o755)
    _mk(acl / "ddeny" / "f", 0o644, data=b"behind an ACL")
    _setfacl(acl / "ddeny", "-m", f"u:{ACLU}:---")
    _mk(acl / "grant", 0o640, data=b"for 2001")
    _setfacl(acl / "grant", "-m", f"u:{ACLU}:r--")
    _mk(acl / "grantw", 0o640, data=b"2001 may write")
    _setfacl(acl / "grantw", "-m", f"u:{ACLU}:rw-")
    _mk(acl / "gdeny", 0o644, data=b"not for group 65534")
    _setfacl(acl / "gdeny", "-m", f"g:{OTHER}:---")
    # a directory handing down a default ACL (group bits narrower than the mode asked)
    _mk(acl / "dflt", 0o755)
    _mk(acl / "dflt" / "old", 0o644, data=b"old")
    _setfacl(acl / "dflt", "-m", f"u:{ACLU}:rwx")
    _setfacl(acl / "dflt", "-d", "-m", f"u::rwx,g::r-x,o::---,u:{ACLU}:rwx,m::rwx")
    _mk(acl / "open", 0o777)  # no default ACL: the umask applies
    _mk(acl / "odir", 0o777, OWNER, G)
    _mk(acl / "own644", 0o644, OWNER, G, b"owner's")
    _mk(acl / "ownacl", 0o660, OWNER, G, b"owner's, shared")
    _setfacl(acl / "ownacl", "-m", f"u:{ACLU}:rw-")
    _mk(acl / "sgid", 0o2750, OWNER, 0, b"setgid, group 0")


OTH, OWN, ROOT = OTHER, OWNER, 0


def op(uid: int, name: str, *args: object) -> list[object]:
    gid = {OTH: OTHER, OWN: G, ROOT: 0, ACLU: ACLU}[uid]
    return [uid, gid, name, *args]


SCRIPT_OPS: list[list[object]] = [
    # read / write / execute
    op(OTH, "read", "pub/r644"),
    op(OTH, "write", "pub/r644"),
    op(OTH, "open_rdwr", "pub/r644"),
    op(OTH, "open_trunc", "pub/r644"),
    op(OTH, "write", "pub/w666"),
    op(OTH, "exec", "pub/x755"),
    op(OTH, "exec", "pub/x700"),
    op(OTH, "exec", "pub/x744"),
    op(OWN, "exec", "pub/x744"),
    op(OTH, "read", "pub/n000"),
    op(OWN, "write", "pub/n000"),
    op(ROOT, "read", "pub/n000"),
    # search and list
    op(OTH, "listdir", "noexec"),
    op(OTH, "stat", "noexec/f"),
    op(OTH, "read", "noexec/f"),
    op(OTH, "listdir", "home/sub"),
    op(OTH, "stat", "home/sub/f"),
    op(OWN, "read", "home/sub/f"),
    # an unwritable directory
    op(OTH, "create", "ro/new"),
    op(OTH, "mkdir", "ro/d"),
    op(OTH, "unlink", "ro/f"),
    op(OTH, "write", "ro/f"),
    op(OTH, "rename", "pub/w666", "ro/moved"),
    op(OTH, "rename", "ro/f", "wdir/moved"),
    op(OTH, "symlink", "=target", "ro/link"),
    op(OTH, "mknod_fifo", "ro/fifo"),
    # a sticky directory
    op(OTH, "unlink", "tmp/of"),
    op(OTH, "rename", "tmp/of", "tmp/of-moved"),
    op(OTH, "rmdir", "tmp/od"),
    op(OTH, "write", "tmp/of"),
    op(OTH, "open_creat", "tmp/of"),
    op(OTH, "create", "tmp/mine"),
    op(OWN, "unlink", "tmp/mine"),
    op(OWN, "rename", "tmp/mine", "tmp/stolen"),
    op(OTH, "rename", "tmp/mine", "tmp/mine2"),
    op(OTH, "unlink", "tmp/mine2"),
    op(OWN, "rename", "tmp/of", "tmp/of3"),
    op(ROOT, "unlink", "tmp/of3"),
    # a writable, non-sticky directory
    op(OTH, "rename", "wdir/of", "wdir/of2"),
    op(OTH, "unlink", "wdir/of2"),
    op(OTH, "create", "wdir/newf"),
    op(OTH, "mkdir", "wdir/newd"),
    op(OTH, "symlink", "=../pub/r644", "wdir/sym"),
    op(OTH, "mknod_fifo", "wdir/fifo"),
    op(OWN, "unlink", "wdir/newf"),
    # chmod / chown
    op(OTH, "chmod", "pub/r644", 0o777),
    op(OTH, "chmod", "home/own644", 0o777),
    op(OWN, "chmod", "home/own644", 0o640),
    op(OTH, "chown", "home/own644", OTHER, OTHER),
    op(OWN, "chown", "home/own644", OTHER, -1),
    op(OWN, "chown", "home/own644", -1, 0),
    op(OWN, "chown", "home/own644", -1, G),
    op(OWN, "chown", "home/own644", -1, -1),
    op(OWN, "chmod", "home/own600", 0o4700),
    op(ROOT, "stat", "home/own644"),
    op(ROOT, "stat", "home/own600"),
    # setuid / setgid cleared on write
    op(OTH, "write", "home/suid"),
    op(ROOT, "stat", "home/suid"),
    op(OWN, "write", "home/suid2"),
    op(ROOT, "stat", "home/suid2"),
    op(OTH, "write", "home/sgid"),
    op(ROOT, "stat", "home/sgid"),
    op(OTH, "write", "home/sgidnx"),
    op(ROOT, "stat", "home/sgidnx"),
    op(OTH, "truncate", "home/suid", 1),
    op(ROOT, "stat", "home/suid"),
    op(ROOT, "chown", "home/suid3", OWNER, G),
    op(ROOT, "stat", "home/suid3"),
    op(OWN, "chown", "home/suid4", -1, G),
    op(ROOT, "stat", "home/suid4"),
    op(OTH, "truncate", "home/suid5", 0),
    op(ROOT, "stat", "home/suid5"),
    op(OWN, "chmod", "home/suid5", 0o6777),
    op(ROOT, "stat", "home/suid5"),
    # the same once the file was written (the kernel may then mark it S_NOSEC and skip the
    # checks: a chmod +s or a new capability must undo that)
    op(OTH, "write", "home/later"),
    op(OTH, "write", "home/later"),
    op(OWN, "chmod", "home/later", 0o6777),
    op(OTH, "write", "home/later"),
    op(ROOT, "stat", "home/later"),
    op(OTH, "open_trunc", "home/suid6"),
    op(ROOT, "stat", "home/suid6"),
    # a write drops the file capability, whoever writes
    op(ROOT, "hascap", "pub/capf"),
    op(ROOT, "write", "pub/capf"),
    op(ROOT, "hascap", "pub/capf"),
    op(ROOT, "write", "pub/capf"),
    op(ROOT, "setcap", "pub/capf"),
    op(ROOT, "hascap", "pub/capf"),
    op(ROOT, "write", "pub/capf"),
    op(ROOT, "hascap", "pub/capf"),
    # truncate and utime
    op(OTH, "truncate", "pub/w666", 2),
    op(OTH, "truncate", "pub/r644", 2),
    op(OTH, "utime_now", "pub/w666"),
    op(OTH, "utime_set", "pub/w666"),
    op(OTH, "utime_now", "pub/r644"),
    op(OWN, "utime_set", "home/own644"),
    op(OTH, "utime_set", "home/own644"),
    # xattrs
    op(OTH, "setxattr", "pub/w666", "user.k", "v"),
    op(OTH, "getxattr", "pub/w666", "user.k"),
    op(OTH, "setxattr", "pub/r644", "user.k", "v"),
    op(OTH, "setxattr", "pub/w666", "trusted.k", "v"),
    op(OTH, "setxattr", "wdir/newd", "user.k", "v"),
    op(OTH, "getxattr", "wdir/newd", "user.k"),
    # hard links to others' files (fs.protected_hardlinks)
    op(OTH, "link", "home/own600", "wdir/hl"),
    op(OTH, "link", "pub/w666", "wdir/hl2"),
    op(ROOT, "stat", "wdir/hl2"),
    # a setgid directory hands down its group (and the bit, to directories)
    op(OTH, "create", "sgdir/f"),
    op(OTH, "mkdir", "sgdir/d"),
    op(OTH, "create", "sgdir/d/f"),
    # root's new objects, which the daemon (root) makes in place (Namespace._as_made), also
    # where a setgid directory hands its group down, and a default ACL (then built)
    op(ROOT, "create", "sgdir/rf"),
    op(ROOT, "mkdir", "sgdir/rd"),
    op(ROOT, "mknod_fifo", "sgdir/rp"),
    op(ROOT, "symlink", "=t", "sgdir/rs"),
    op(ROOT, "create", "acl/dflt/rf"),
    op(ROOT, "getfacl", "acl/dflt/rf"),
    op(ROOT, "mkdir", "acl/dflt/rd"),
    op(ROOT, "getfacl", "acl/dflt/rd"),
    # POSIX ACLs: enforced as the kernel does (named user and group entries, the mask)
    op(OTH, "getfacl", ""),  # the root: its xattrs are read through its fd
    op(ACLU, "read", "acl/deny"),
    op(OTH, "read", "acl/deny"),
    op(ACLU, "listdir", "acl/ddeny"),
    op(ACLU, "stat", "acl/ddeny/f"),
    op(ACLU, "read", "acl/grant"),
    op(ACLU, "write", "acl/grant"),
    op(OTH, "read", "acl/grant"),
    op(OTH, "read", "acl/gdeny"),
    op(ACLU, "write", "acl/grantw"),  # a copy-up keeps the ACL
    op(ROOT, "getfacl", "acl/grantw"),
    op(ACLU, "read", "acl/grantw"),
    # new objects inherit the default ACL (no umask then), or get the umask
    op(ACLU, "create", "acl/dflt/new"),
    op(ROOT, "getfacl", "acl/dflt/new"),
    op(ACLU, "mkdir", "acl/dflt/nd"),
    op(ROOT, "getfacl", "acl/dflt/nd"),
    op(ACLU, "create", "acl/dflt/nd/f"),
    op(ROOT, "getfacl", "acl/dflt/nd/f"),
    op(ACLU, "mknod_fifo", "acl/dflt/fifo"),
    op(ROOT, "getfacl", "acl/dflt/fifo"),
    op(ACLU, "symlink", "=new", "acl/dflt/sym"),
    op(ROOT, "unlink", "acl/dflt/old"),
    op(ACLU, "create", "acl/dflt/old"),  # over a whiteout
    op(ROOT, "getfacl", "acl/dflt/old"),
    op(OTH, "read", "acl/dflt/new"),
    op(OTH, "create", "acl/open/f"),
    op(ROOT, "getfacl", "acl/open/f"),
    # setfacl: the mode follows the ACL; only the owner may; a default ACL set through us
    op(OTH, "setfacl", "=-m", f"=u:{OTHER}:rw-", "acl/own644"),
    op(OWN, "setfacl", "=-m", f"=u:{ACLU}:---,g::rw-", "acl/own644"),
    op(ROOT, "stat", "acl/own644"),
    op(ROOT, "getfacl", "acl/own644"),
    op(ACLU, "read", "acl/own644"),
    op(OTH, "read", "acl/own644"),
    op(OWN, "setfacl", "=-d", "=-m", f"=u:{OTHER}:rwx", "acl/odir"),
    op(OTH, "mkdir", "acl/odir/d"),
    op(OTH, "create", "acl/odir/d/f"),
    op(ROOT, "getfacl", "acl/odir/d/f"),
    op(OWN, "setfacl", "=-m", "=u::rwx", "acl/odir/d/f"),  # not the owner: refused
    # chmod narrows the mask, and widens it again
    op(OWN, "chmod", "acl/ownacl", 0o600),
    op(ROOT, "getfacl", "acl/ownacl"),
    op(ACLU, "read", "acl/ownacl"),
    op(OWN, "chmod", "acl/ownacl", 0o640),
    op(ACLU, "read", "acl/ownacl"),
    op(ACLU, "write", "acl/ownacl"),
    op(OWN, "setfacl", "=-b", "acl/ownacl"),
    op(ROOT, "stat", "acl/ownacl"),
    op(ACLU, "read", "acl/ownacl"),
    # setting an ACL clears setgid when the owner is not in the file's group
    op(OWN, "setfacl", "=-m", f"=u:{ACLU}:r--", "acl/sgid"),
    op(ROOT, "stat", "acl/sgid"),
    op(ACLU, "read", "acl/sgid"),
]


def _run_ops(root: Path) -> list[object]:
    r = subprocess.run(
        [sys.executable, str(ASUSER), str(root)],
        input=json.dumps(SCRIPT_OPS),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    out: list[object] = json.loads(r.stdout)
    return out


def _mount_options(mnt: Path) -> set[str]:
    """The mount and superblock options of MNT, from /proc/self/mountinfo."""
    target = os.fsencode(mnt)
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            pre, _, post = line.partition(b" - ")
            fields = pre.split()
            if fields[4] == target:
                opts = fields[5].split(b",") + post.split()[2].split(b",")
                return {o.decode() for o in opts}
    raise AssertionError(f"{mnt} is not mounted")


@pytest.fixture
def base() -> Iterator[Path]:
    # Not tmp_path: /tmp/pytest-of-root is 0700, which the unprivileged users cannot search.
    d = Path(tempfile.mkdtemp(prefix="layerfs-perm-", dir="/tmp"))
    try:
        os.chmod(d, 0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_permissions_match_kernel(base: Path) -> None:
    lower = base / "lower"
    _make_lower(lower)
    dirs = {}
    for name in ("lf", "ko"):
        top = base / name
        for sub in ("upper", "work", "merged"):
            (top / sub).mkdir(parents=True)
        os.chmod(top, 0o755)
        os.chmod(top / "merged", 0o755)
        dirs[name] = top
    # The merged root shows its upper's mtime: one value for both uppers, else the two
    # mkdirs above compare equal only when no clock tick fell between them (under load).
    for top in dirs.values():
        os.utime(top / "upper", ns=(10**18, 10**18))
    since = fs_clock_ns()
    lf, ko = dirs["lf"], dirs["ko"]
    with layerfs_daemon([lower], lf / "upper", lf / "work", lf / "merged") as d:
        opts = _mount_options(lf / "merged")
        assert {"allow_other", "default_permissions"} <= opts, opts
        ours = _run_ops(lf / "merged")
        ours_tree = snapshot(lf / "merged")
    assert d.proc.returncode == 0, d.log_text()
    with mount_kernel([lower], ko / "upper", ko / "work", ko / "merged"):
        theirs = _run_ops(ko / "merged")
        theirs_tree = snapshot(ko / "merged")
    diffs = [
        f"{i:3} uid {o[0]} {o[2]}{tuple(o[3:])}: kernel {k} layerfs {s}"
        for i, (o, k, s) in enumerate(zip(SCRIPT_OPS, theirs, ours, strict=True))
        if k != s
    ]
    assert not diffs, f"{len(diffs)} operations differ from kernel overlayfs:\n" + "\n".join(diffs)
    # The script must have exercised both refusals and successes.
    kinds = {k[0] for k in theirs if isinstance(k, list)}
    assert kinds == {"ok", "err"}, kinds
    tree_diffs = compare(theirs_tree, ours_tree, since_ns=since)
    assert not tree_diffs, "\n".join(tree_diffs)
