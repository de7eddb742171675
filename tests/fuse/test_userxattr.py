"""userxattr: the upper written in ``user.overlay.*``, as kernel overlayfs ``-o userxattr``.

Asked for explicitly (``layerfs mount -o userxattr``, ``mount.layerfs -o ...,userxattr``) or
chosen by layerfs itself in a user namespace. The operations that write overlay xattrs (a
directory made where a lower one was removed: opaque; a lower file removed: a whiteout) leave
``user.overlay.*`` only, and kernel overlayfs mounted ``userxattr`` on that upper shows the same
tree. The differential suite runs the write scenarios rootless (tests/diff, layerfs-userns).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from compat.helpers import helper_command, helper_env, reap
from support.mounts import layerfs_command, mount_kernel, unmount_fuse, userns_popen
from support.snapshot import compare, snapshot

pytestmark = [pytest.mark.fuse, pytest.mark.kernel_overlay]


def _layers(tmp_path: Path) -> dict[str, Path]:
    d = {n: tmp_path / n for n in ("lower", "upper", "work", "merged", "kwork", "kmerged")}
    for p in d.values():
        p.mkdir()
    (d["lower"] / "dir").mkdir()
    (d["lower"] / "dir" / "old").write_text("old")
    (d["lower"] / "file").write_text("f")
    return d


def _mount(front: str, d: dict[str, Path]) -> None:
    if front == "layerfs":
        cmd = [*layerfs_command(), "mount", str(d["lower"]), str(d["upper"]), str(d["merged"])]
        cmd += ["--workdir", str(d["work"]), "-o", "userxattr"]
        env = None
    else:
        opts = f"lowerdir={d['lower']},upperdir={d['upper']},workdir={d['work']},userxattr"
        cmd, env = [*helper_command(), "-o", opts, str(d["merged"])], helper_env()
    subprocess.run(cmd, check=True, timeout=60, env=env)


def _overlay_xattrs(root: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in ["", *dirs, *files]:
            p = os.path.join(dirpath, name) if name else dirpath
            names = [x for x in os.listxattr(p, follow_symlinks=False) if ".overlay." in x]
            if names:
                rel = os.path.relpath(p, root)
                out[rel] = {x: os.getxattr(p, x, follow_symlinks=False) for x in names}
    return out


@pytest.mark.parametrize("front", ["layerfs", "mount.layerfs"])
def test_explicit_userxattr_writes_user_overlay(tmp_path: Path, front: str) -> None:
    d = _layers(tmp_path)
    _mount(front, d)
    try:
        m = d["merged"]
        (m / "dir" / "old").unlink()
        (m / "dir").rmdir()
        (m / "dir").mkdir()  # over the whiteout: opaque, else "old" comes back
        (m / "file").unlink()
        os.setxattr(m / "dir", "user.overlay.mine", b"v")  # the user's own: escaped
        assert os.listdir(m / "dir") == []
        assert os.getxattr(m / "dir", "user.overlay.mine") == b"v"
        merged = snapshot(m)
    finally:
        assert not unmount_fuse(d["merged"])
        reap(d["merged"])
    got = _overlay_xattrs(d["upper"])
    assert got == {
        # the copy-up of dir (for the whiteout of old) marked its parent, as the kernel does
        ".": {"user.overlay.impure": b"y"},
        "dir": {"user.overlay.opaque": b"y", "user.overlay.overlay.mine": b"v"},
    }
    st = os.lstat(d["upper"] / "file")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    # the kernel, told userxattr, reads that upper as layerfs showed it
    with mount_kernel(
        [d["lower"]],
        d["upper"],
        d["kwork"],
        d["kmerged"],
        options=("userxattr", "redirect_dir=nofollow"),
    ) as k:
        assert compare(snapshot(k.mnt), merged) == []


def _in_userns(tmp_path: Path, code: str) -> str:
    out = tmp_path / "out"
    with open(out, "wb") as fh:
        proc = userns_popen([sys.executable, "-c", code], stdout=fh, stderr=subprocess.STDOUT)
    assert proc.wait(timeout=60) == 0, out.read_text()
    return out.read_text().strip()


def test_user_namespace_is_detected(tmp_path: Path) -> None:
    code = "from layerfs.config import MountConfig as C; print(C((), '/').user_xattrs)"
    assert _in_userns(tmp_path, code) == "True"
    here = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert here.stdout.strip() == "False"
    # outside the initial namespace, lower directories are renamed as the kernel's userxattr
    # mounts rename them: not at all (EXDEV, redirect_dir=nofollow), unless asked for
    code = (
        "from layerfs.config import MountConfig as C; "
        "print(C((), '/').redirects, C((), '/', redirect_dir=True).redirects, "
        "C((), '/', userxattr=False).redirects)"
    )
    assert _in_userns(tmp_path, code) == "False True True"


def test_unprivileged_daemon_writes_user_xattrs(tmp_path: Path) -> None:
    # Started as root, nobody once imported (as setpriv --reuid --regid --clear-groups): the
    # venv's interpreter may live where nobody cannot read it (a pyenv under /root)
    code = (
        "from layerfs.config import MountConfig as C; import os; "
        "os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534); "
        "print(C((), '/').user_xattrs)"
    )
    as_nobody = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert as_nobody.stdout.strip() == "True", as_nobody.stderr


# Mount, touch the lower device (its copy-up is refused: no mknod of a device in a user
# namespace), print the upper root's overlay xattrs, unmount. $1: "kernel" or the layerfs CLI.
_REFUSED_COPY_UP = r"""
set -e
t=$2
if [ "$1" = kernel ]; then
    mount -t overlay overlay -o "lowerdir=$t/lower,upperdir=$t/upper,workdir=$t/work,userxattr" \
        "$t/merged"
else
    $1 mount "$t/lower" "$t/upper" "$t/merged" --workdir "$t/work" -o userxattr
fi
touch -h -d @1000 "$t/merged/null" 2>/dev/null && echo copied || echo refused
getfattr --absolute-names -d -m '^user[.]overlay[.]impure' "$t/upper" | grep impure || true
umount "$t/merged" 2>/dev/null || fusermount3 -u "$t/merged"
"""


def test_a_refused_copy_up_marks_the_parent_as_the_kernel(tmp_path: Path) -> None:
    """ovl_do_copy_up marks the parent impure before it copies: a copy-up the upper refuses
    leaves the mark. Read before any listing (a listing may drop the mark again), in a user
    namespace as rootless engines mount (found by test_random_operations[layerfs-userns])."""
    out = {}
    for front in ("kernel", " ".join(layerfs_command())):
        t = tmp_path / ("k" if front == "kernel" else "l")
        for n in ("lower", "upper", "work", "merged"):
            (t / n).mkdir(parents=True)
        os.mknod(t / "lower" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        for p in [tmp_path, *t.iterdir(), t]:
            os.chmod(p, 0o777)
        log = tmp_path / f"{t.name}.out"
        with open(log, "wb") as fh:
            cmd = ["sh", "-c", _REFUSED_COPY_UP, "sh", front, str(t)]
            proc = userns_popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        assert proc.wait(timeout=60) == 0, log.read_text()
        out[front == "kernel"] = log.read_text().split()
    assert out[True][0] == "refused"
    assert out[False] == out[True]
