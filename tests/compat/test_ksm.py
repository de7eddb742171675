"""``-o ksm``: a mount's daemon offers its memory to the kernel's same-page merging
(PR_SET_MEMORY_MERGE), and no other process does: not the fork server, not the daemon of a
mount without the option forked from the same server. ksmd merges only where the host runs it
(/sys/kernel/mm/ksm/run); what it saves is measured in benchmarks (``pss-ksm``), not here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from compat.helpers import USERNS, daemon_pids, helper_command, helper_env, run_helper_script
from support.mounts import mount_layerfs

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(
        not os.path.exists("/proc/self/ksm_stat"), reason="no KSM (Linux 6.4+, CONFIG_KSM)"
    ),
]
TIMEOUT = 60


def _merge_any(pid: int) -> bool:
    """Whether PID's whole memory is offered to merging (PR_SET_MEMORY_MERGE)."""
    for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines():
        if line.startswith("ksm_merge_any:"):
            return line.split()[1] == "yes"
    raise AssertionError(f"no ksm_merge_any in /proc/{pid}/ksm_stat")


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[1])


def _mount(d: dict[str, Path], extra: str) -> int:
    opts = f"lowerdir={d['lower']},upperdir={d['upper']},workdir={d['work']}{extra}"
    r = subprocess.run(
        [*helper_command(), "overlay", str(d["merged"]), "-o", opts],
        capture_output=True,
        text=True,
        env=helper_env(),
        timeout=TIMEOUT,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert (d["merged"] / "f").read_text() == "x"
    (pid,) = daemon_pids(d["merged"])
    return pid


def test_only_the_mount_that_asks_is_offered(stacks: list[dict[str, Path]]) -> None:
    plain, merged = stacks[:2]
    plain_pid = _mount(plain, "")
    merged_pid = _mount(merged, ",ksm")
    assert _merge_any(merged_pid)
    assert not _merge_any(plain_pid)
    server = _ppid(merged_pid)
    if Path(f"/proc/{server}/cmdline").read_bytes().startswith(b"layerfs-forkserver"):
        assert _ppid(plain_pid) == server
        assert not _merge_any(server)  # else every later daemon would inherit it


def test_the_layerfs_command_takes_it(tmp_path: Path) -> None:
    for name in ("lower", "upper", "work", "mnt"):
        (tmp_path / name).mkdir()
    t = tmp_path
    with mount_layerfs([t / "lower"], t / "upper", t / "work", t / "mnt", options=["ksm=on"]) as m:
        assert m.proc is not None
        assert _merge_any(m.proc.pid)
        (m.mnt / "new").write_text("y")
    assert (t / "upper" / "new").read_text() == "y"


USERNS_SCRIPT = """
set -e
"$@" overlay "$MNT" -o "lowerdir=$LOWER,upperdir=$UPPER,workdir=$WORK,ksm"
cat "$MNT/f" >/dev/null
for p in /proc/[0-9]*; do
    if tr '\\0' ' ' < $p/cmdline 2>/dev/null | grep -q "^layerfs $MNT"; then
        grep ksm_merge_any $p/ksm_stat
    fi
done
fusermount3 -u "$MNT"
"""


def test_a_rootless_mount_takes_it(stacks: list[dict[str, Path]]) -> None:
    """As rootless podman runs mount.layerfs: root of a new user and mount namespace."""
    r = run_helper_script(USERNS, USERNS_SCRIPT, stacks[0], TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ksm_merge_any:", "yes"], r.stdout
