"""The compiled raw path's wait (layerfs._craw's ``serve``) with a trio timer set.

Writes set one (``Files._close_writers`` waits WRITERS_IDLE after the last write or create),
so an untar's requests all come while it is set. The C wait bounds its poll by trio's next
deadline and goes on answering there; before, it left every such wait to the Python poll
(~11k instructions a request: docs/benchmarks.md, session 16 untar3). The timer must still
fire on time: the node descriptors are closed once writes stop
(``test_handler_calls::test_no_upper_file_stays_open_for_writing`` waits for that too).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from support.mounts import KERNEL, Layout, subject_named, write_fds_in

from layerfs import fusehooks
from layerfs.files import WRITERS_IDLE

pytestmark = pytest.mark.fuse

STATS = "trusted.layerfs.statistics"
FILES = 60


def _stats(mnt: Path) -> dict[str, int]:
    return dict(json.loads(os.getxattr(mnt, STATS)))


def _untar_like(root: Path) -> None:
    """What tar does for each member: create, write, chown, chmod, set the mtime alone."""
    for i in range(FILES):
        p = root / f"f{i:03d}"
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"%d" % i * 100)
        finally:
            os.close(fd)
        os.chown(p, 1000 + i, 2000 + i % 3)
        os.chmod(p, 0o640 | (i % 8))
        os.utime(p, ns=(os.stat(p).st_atime_ns, 10**18 + i))


def _read_back(root: Path) -> list[tuple[str, int, int, int, int, bytes]]:
    return [
        (p.name, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, p.read_bytes())
        for p in sorted(root.iterdir())
        if (st := os.stat(p))
    ]


@pytest.mark.parametrize("loop", ["poll", "craw"])
def test_requests_under_a_timer_are_answered_in_the_c_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    """An untar's requests (the writers' timer set throughout) on both loops: the files
    read back as on kernel overlayfs over the same layers; with craw, most requests were
    found by the C wait's own poll (``loop_cpoll``) and the SETATTRs of the new files
    answered without a coroutine (``loop_setattr_fd``), neither with the poll loop; and once
    writes stop the timer fires with no request to wake the daemon (no descriptor left
    open for writing: a C poll that slept past trio's deadline keeps them open)."""
    if loop == "craw" and fusehooks.craw_module() is None:
        pytest.skip("layerfs._craw is not built (scripts/setup.sh builds it: Cython and gcc)")
    monkeypatch.setenv("LAYERFS_LOOP", loop)
    layout = Layout.create(tmp_path / "fs", 1)
    with layout.mount(subject_named("layerfs")) as m:
        work = m.mnt / "work"
        work.mkdir()
        before = _stats(m.mnt)
        _untar_like(work)
        after = _stats(m.mnt)
        cpoll = after.get("loop_cpoll", 0) - before.get("loop_cpoll", 0)
        answered = after.get("loop_raw", 0) - before.get("loop_raw", 0)
        fd_setattrs = after.get("loop_setattr_fd", 0) - before.get("loop_setattr_fd", 0)
        if loop == "craw":
            # each file's LOOKUP, MKNOD, WRITE, SETATTRs and GETATTRs answered in C; a few
            # polls go to trio when a task runs (the timer's, the gauge's)
            assert answered >= 4 * FILES, after
            assert cpoll >= answered * 3 // 4, (before, after)
            # the chown, chmod and utime of each file made here: through the descriptor
            # MKNOD left, without a coroutine (Overlay.setattr_fd)
            assert fd_setattrs >= 3 * FILES, after
        else:
            assert cpoll == fd_setattrs == 0, after
        os.chmod(work / "f000", 0o640)  # the last request: a SETATTR answered in C
        # with no request coming: only the poll's bound wakes the loop for the timer
        assert m.proc is not None and layout.upper is not None
        deadline = time.monotonic() + 20 * WRITERS_IDLE
        while (left := write_fds_in(m.proc.pid, layout.upper)) and time.monotonic() < deadline:
            time.sleep(WRITERS_IDLE / 4)
        assert left == []
        seen = _read_back(work)
    kernel = Layout.create(tmp_path / "kernel", 1)
    with kernel.mount(KERNEL) as k:
        (k.mnt / "work").mkdir()
        _untar_like(k.mnt / "work")
        os.chmod(k.mnt / "work" / "f000", 0o640)
        assert _read_back(k.mnt / "work") == seen
