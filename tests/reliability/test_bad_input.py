"""Every error of ``layerfs mount``, table-driven: exit code 1, one ``layerfs: ...`` line on
stderr that names the offending path, nothing mounted, no daemon left, and nothing written
(the whole test directory is compared before and after, contents and mtimes included).

Run detached (no ``-f``), as container engines run it: a mistaken success would return 0 with a
live mount. Unknown ``-o`` options only warn, and a non-UTF-8 layer path is a valid path.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.mounts import is_mounted, layerfs_command, mountpoints

from ._helpers import (
    layerfs_daemon,
    mount_cmd,
    needs_root,
    pids_naming,
    tmpfs,
    tree_state,
    unmount_any,
    wait_until,
)

pytestmark = [pytest.mark.fuse, needs_root]


@dataclass
class Env:
    root: Path
    lower: Path
    lower2: Path
    upper: Path
    work: Path
    mnt: Path
    other_fs: Path  # a tmpfs: another filesystem than the upper's
    mounted: Path  # a directory that already is a mount point


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(
        tmp_path,
        tmp_path / "lower",
        tmp_path / "lower2",
        tmp_path / "upper",
        tmp_path / "work",
        tmp_path / "merged",
        tmp_path / "otherfs",
        tmp_path / "mounted",
    )
    for p in (e.lower, e.lower2, e.upper, e.work, e.mnt):
        p.mkdir()
    (e.lower / "f").write_text("x")
    (e.lower / "sub").mkdir()
    (e.upper / "sub").mkdir()
    (tmp_path / "a-file").write_text("not a directory")
    with tmpfs(e.other_fs, "1m"), tmpfs(e.mounted, "1m"):
        (e.other_fs / "work").mkdir()
        try:
            yield e
        finally:
            for m in (e.mnt, e.mounted / "x"):
                unmount_any(m)


Args = Callable[[Env], tuple[list[str | bytes], bytes]]


def _mount(
    lowers: str | bytes, upper: str | bytes | None, mnt: str | bytes, work: str | bytes | None
) -> list[str | bytes]:
    args: list[str | bytes] = ["mount", lowers]
    if upper is not None:
        args.append(upper)
    args.append(mnt)
    if work is not None:
        args += ["--workdir", work]
    return args


def s(p: Path) -> str:
    return str(p)


# name -> (argv after "layerfs", the path the message must name)
CASES: dict[str, Args] = {
    "missing lower": lambda e: (
        _mount(s(e.root / "nope"), s(e.upper), s(e.mnt), s(e.work)),
        b"nope",
    ),
    "missing second lower": lambda e: (
        _mount(f"{e.lower}:{e.root / 'nope2'}", s(e.upper), s(e.mnt), s(e.work)),
        b"nope2",
    ),
    "lower is a file": lambda e: (
        _mount(s(e.root / "a-file"), s(e.upper), s(e.mnt), s(e.work)),
        b"a-file",
    ),
    "empty lowerdir": lambda e: (_mount("", s(e.upper), s(e.mnt), s(e.work)), b"lower"),
    "empty entry in lowerdir": lambda e: (
        _mount(f"{e.lower}::{e.lower2}", s(e.upper), s(e.mnt), s(e.work)),
        os.fsencode(e.lower),
    ),
    "upper missing": lambda e: (
        _mount(s(e.lower), s(e.root / "no-upper"), s(e.mnt), s(e.work)),
        b"no-upper",
    ),
    "upper missing, default workdir": lambda e: (
        _mount(s(e.lower), s(e.root / "no-upper"), s(e.mnt), None),
        b"no-upper",
    ),
    "workdir missing": lambda e: (
        _mount(s(e.lower), s(e.upper), s(e.mnt), s(e.root / "no-work")),
        b"no-work",
    ),
    "metacopy without redirect_dir": lambda e: (
        [
            *_mount(s(e.lower), s(e.upper), s(e.mnt), s(e.work)),
            "-o",
            "metacopy=on,redirect_dir=off",
        ],
        b"metacopy=on requires redirect_dir=on",
    ),
    "workdir without upper": lambda e: (_mount(s(e.lower), None, s(e.mnt), s(e.work)), b"work"),
    "merged missing": lambda e: (
        _mount(s(e.lower), s(e.upper), s(e.root / "no-mnt"), s(e.work)),
        b"no-mnt",
    ),
    "merged missing, default workdir": lambda e: (
        _mount(s(e.lower), s(e.upper), s(e.root / "no-mnt"), None),
        b"no-mnt",
    ),
    "merged is a file": lambda e: (
        _mount(s(e.lower), s(e.upper), s(e.root / "a-file"), s(e.work)),
        b"a-file",
    ),
    "merged already a mount": lambda e: (
        _mount(s(e.lower), s(e.upper), s(e.mounted), s(e.work)),
        b"mounted",
    ),
    "merged already a mount, default workdir": lambda e: (
        _mount(s(e.lower), s(e.upper), s(e.mounted), None),
        b"mounted",
    ),
    "upper inside lower": lambda e: (
        _mount(s(e.lower), s(e.lower / "sub"), s(e.mnt), s(e.work)),
        b"sub",
    ),
    "lower inside upper": lambda e: (
        _mount(s(e.upper / "sub"), s(e.upper), s(e.mnt), s(e.work)),
        b"sub",
    ),
    "workdir inside upper": lambda e: (
        _mount(s(e.lower), s(e.upper), s(e.mnt), s(e.upper / "sub")),
        b"sub",
    ),
    "workdir is the upper": lambda e: (
        _mount(s(e.lower), s(e.upper), s(e.mnt), s(e.upper)),
        os.fsencode(e.upper),
    ),
    "workdir inside lower": lambda e: (
        _mount(s(e.lower2), s(e.upper), s(e.mnt), s(e.lower2)),
        b"lower2",
    ),
    "workdir on another filesystem": lambda e: (
        _mount(s(e.lower), s(e.upper), s(e.mnt), s(e.other_fs / "work")),
        b"otherfs",
    ),
    "merged inside upper": lambda e: (
        _mount(s(e.lower), s(e.upper), s(e.upper / "sub"), s(e.work)),
        b"sub",
    ),
    "merged is a lower": lambda e: (
        _mount(s(e.lower), s(e.upper), s(e.lower), s(e.work)),
        os.fsencode(e.lower),
    ),
    "non-UTF-8 missing lower": lambda e: (
        _mount(os.fsencode(e.root) + b"/l\xff\xfe", s(e.upper), s(e.mnt), s(e.work)),
        b"/l\xff\xfe",  # the bytes as given, not a surrogate escape such as "\udcff"
    ),
    # validated before the default workdir is made: it was left behind, inside the lower
    "upper inside lower, default workdir": lambda e: (
        _mount(s(e.lower), s(e.lower / "sub"), s(e.mnt), None),
        b"sub",
    ),
    "upper is a file, default workdir": lambda e: (
        _mount(s(e.lower), s(e.root / "a-file"), s(e.mnt), None),
        b"a-file is not a directory",  # not "does not exist"
    ),
    "workdir parent missing, default workdir": lambda e: (
        _mount(s(e.lower), s(e.root / "no-parent" / "upper"), s(e.mnt), None),
        b"no-parent",
    ),
    # bad values of known options are errors, as the kernel's "bad value"
    "redirect_dir=yes": lambda e: (
        [*_mount(s(e.lower), s(e.upper), s(e.mnt), None), "-o", "redirect_dir=yes"],
        b"redirect_dir: bad value 'yes'",
    ),
    "metacopy=yess": lambda e: (
        [*_mount(s(e.lower), s(e.upper), s(e.mnt), None), "-o", "metacopy=yess"],
        b"metacopy: bad value 'yess'",
    ),
    "fsync=yes": lambda e: (
        [*_mount(s(e.lower), s(e.upper), s(e.mnt), None), "-o", "fsync=yes"],
        b"fsync: bad value 'yes' (expected auto, strict, volatile, 1, 0)",
    ),
    "allow_other=foo": lambda e: (
        [*_mount(s(e.lower), s(e.upper), s(e.mnt), None), "-o", "allow_other=foo"],
        b"allow_other: bad value 'foo'",
    ),
    "uidmapping=0:1000": lambda e: (
        [*_mount(s(e.lower), s(e.upper), s(e.mnt), None), "-o", "uidmapping=0:1000"],
        b"invalid uidmapping=0:1000: expected CONTAINER_ID:HOST_ID:COUNT",
    ),
    "too many paths": lambda e: ([*_mount(s(e.lower), s(e.upper), s(e.mnt), None), "x"], b""),
}


def _run(args: Sequence[str | bytes], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    cmd = [os.fsencode(a) for a in (*layerfs_command(), *args)]
    return subprocess.run(
        cmd, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False
    )


def _mounts_below(root: Path) -> list[bytes]:
    base = os.fsencode(root)
    return sorted(m for m in mountpoints() if m.startswith(base))


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(env: Env, case: str) -> None:
    args, names = CASES[case](env)
    before = tree_state(env.root)
    mounts = _mounts_below(env.root)
    r = _run(args, env.root)
    err = r.stderr.decode(errors="surrogateescape")
    assert r.returncode == 1, (r.returncode, err)
    assert r.stdout == b""
    lines = [ln for ln in r.stderr.splitlines() if b": warning:" not in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith(b"layerfs: "), err
    assert b"Traceback" not in r.stderr
    assert names in lines[0], f"message does not name {names!r}: {err}"
    assert _mounts_below(env.root) == mounts, "something was mounted"
    assert not pids_naming(env.mnt)
    assert tree_state(env.root) == before, "a failed mount wrote something"


def _mount_and_unmount(args: Sequence[str | bytes], mnt: bytes, cwd: Path) -> bytes:
    try:
        r = _run(args, cwd)
        assert r.returncode == 0, r.stderr
        assert is_mounted(os.fsdecode(mnt))
        return r.stderr
    finally:
        unmount_any(os.fsdecode(mnt))
        wait_until(lambda: not pids_naming(os.fsdecode(mnt)), 20, "the daemon to exit")


def test_unknown_option_warns_and_mounts(env: Env) -> None:
    cmd = mount_cmd([env.lower], env.upper, env.work, env.mnt, foreground=False)
    cmd += ["-o", 'frobnicate=1,rw,context="system_u:object_r:container_file_t:s0"']
    err = _mount_and_unmount(cmd[len(layerfs_command()) :], os.fsencode(env.mnt), env.root)
    warnings = err.decode().splitlines()
    assert any("frobnicate" in w and "warning" in w for w in warnings), warnings
    assert all(w.startswith("layerfs: warning:") for w in warnings), warnings


def test_non_utf8_paths_mount(env: Env) -> None:
    """Layer, upper and mount point names that are not UTF-8 are ordinary paths."""
    base = os.fsencode(env.root)
    lower, upper, work, mnt = (base + n for n in (b"/l\xff", b"/u\xfe", b"/w\xfd", b"/m\xfc"))
    for p in (lower, upper, work, mnt):
        os.mkdir(p)
    with open(lower + b"/name-\xff", "wb") as fh:
        fh.write(b"lower")
    try:
        r = _run(_mount(lower, upper, mnt, work), env.root)
        assert r.returncode == 0, r.stderr
        assert r.stderr == b""
        assert os.listdir(mnt) == [b"name-\xff"]
        with open(mnt + b"/name-\xff", "ab") as fh:
            fh.write(b"+upper")
        with open(upper + b"/name-\xff", "rb") as fh:
            assert fh.read() == b"lower+upper"
    finally:
        unmount_any(os.fsdecode(mnt))
        wait_until(lambda: not pids_naming(os.fsdecode(mnt)), 20, "the daemon to exit")


def test_stale_mount_point_is_refused_until_cleaned(tmp_path: Path) -> None:
    """After a crash the mount point is stale: mounting there again fails with one line naming
    it (nothing written), and works once ``layerfs umount`` has cleaned it."""
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for p in (lower, upper, work, mnt):
        p.mkdir()
    (lower / "f").write_text("x")
    with layerfs_daemon([lower], upper, work, mnt) as d:
        d.kill9()
        before = tree_state(lower), tree_state(upper), tree_state(work)
        r = _run(_mount(s(lower), s(upper), s(mnt), s(work)), tmp_path)
        lines = r.stderr.splitlines()
        assert r.returncode == 1, r.stderr
        assert len(lines) == 1 and lines[0].startswith(b"layerfs: "), r.stderr
        assert os.fsencode(mnt) in lines[0]
        assert (tree_state(lower), tree_state(upper), tree_state(work)) == before
        assert _run(["umount", s(mnt)], tmp_path).returncode == 0
        assert not is_mounted(mnt)
        r = _run(_mount(s(lower), s(upper), s(mnt), s(work)), tmp_path)
        assert r.returncode == 0, r.stderr
        assert (mnt / "f").read_text() == "x"
        unmount_any(mnt)
        wait_until(lambda: not pids_naming(mnt), 20, "the daemon to exit")


def test_no_access_to_dev_fuse_one_message_nothing_left(env: Env) -> None:
    """Without /dev/fuse (a private mount namespace with /dev/null over it): one error line,
    libfuse's reason inside ours (it used to print its own line too), and the default workdir
    made for the mount removed again."""
    before = tree_state(env.root)
    cmd = " ".join(
        shlex.quote(os.fsdecode(a))
        for a in (*layerfs_command(), *_mount(s(env.lower), s(env.upper), s(env.mnt), None))
    )
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount --bind /dev/null /dev/fuse && exec {cmd}"],
        cwd=env.root, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(b"layerfs: cannot mount"), r.stderr
    assert b"fuse" in lines[0].split(b":", 2)[2], "libfuse's reason is not in the message"
    # the workdir came and went: only the times of the directory that held it changed
    after = tree_state(env.root)
    assert after.pop(b".")[:4] == before.pop(b".")[:4]
    assert after == before, "a failed mount left something behind"


def test_umount_refuses_what_is_not_layerfs(env: Env) -> None:
    """``layerfs umount`` on another filesystem's mount point (a tmpfs) refuses, naming its
    type; it used to detach it with ``umount -l``."""
    r = _run(["umount", s(env.mounted)], env.root)
    assert r.returncode == 1
    assert b"is not a layerfs mount (a tmpfs mount)" in r.stderr, r.stderr
    assert is_mounted(env.mounted)
