"""Capability probes, hypothesis profile, and the ``subject`` fixture (from tests/support)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

# tests/support is imported as ``support`` in every pytest import mode.
sys.path.insert(0, str(Path(__file__).parent))

from support.hung_fuse import pytest_runtest_protocol  # noqa: F401  (a hook: its name is enough)
from support.mounts import Subject, subject_named

settings.register_profile(
    "layerfs",
    max_examples=int(os.environ.get("LAYERFS_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    print_blob=True,
    # Every example mounts two filesystems: shrinking can take many minutes, so it is opt-in.
    phases=[
        p for p in Phase if p is not Phase.shrink or os.environ.get("LAYERFS_HYPOTHESIS_SHRINK")
    ],
)
settings.load_profile("layerfs")


def fuse_skip_reason() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "fusermount3 not installed (apt-get install fuse3)"
    return None


def kernel_overlay_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "kernel overlayfs reference needs root"
    with open("/proc/filesystems") as fh:
        if "overlay" not in fh.read():
            return "kernel has no overlay filesystem (modprobe overlay)"
    return None


def _dropped(signum: int, frame: object) -> None:
    """Caught and dropped: the run goes on as if the signal were ignored."""


def pytest_configure(config: pytest.Config) -> None:
    """Children start with the default dispositions, as a terminal's foreground job has them.
    A run started in the background (a script's ``cmd &``, nohup) has SIGINT, SIGQUIT or
    SIGHUP ignored, and every child inherits an ignored signal: a Python child then installs
    no KeyboardInterrupt handler, so the Ctrl-C test_ctrl_c_stops_a_pull_cleanly sends its
    pull did nothing, and a daemon that forgot to ignore SIGHUP passed test_hup_is_ignored.
    A caught signal is reset to the default at exec; the run itself still ignores it."""
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_IGN:
            signal.signal(sig, _dropped)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    fuse, kernel = fuse_skip_reason(), kernel_overlay_skip_reason()
    for item in items:
        if fuse and item.get_closest_marker("fuse"):
            item.add_marker(pytest.mark.skip(reason=fuse))
        if kernel and item.get_closest_marker("kernel_overlay"):
            item.add_marker(pytest.mark.skip(reason=kernel))


_HOST_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow")


def _host_state() -> dict[str, tuple[int, int, int, int, bytes]]:
    out = {}
    for p in _HOST_FILES:
        with contextlib.suppress(OSError):
            st = os.lstat(p)
            with open(p, "rb") as fh:
                out[p] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, fh.read())
    return out


@pytest.fixture(autouse=True, scope="session")
def _host_files_untouched() -> Iterator[None]:
    """Layers hold symlinks to /etc/passwd: as root, a test following one would damage the host."""
    before = _host_state()
    yield
    changed = [p for p, v in _host_state().items() if before.get(p) != v]
    assert not changed, f"the test run changed host files: {changed}"


@pytest.fixture(params=["layerfs", "fuse-overlayfs"])
def subject(request: pytest.FixtureRequest) -> Subject:
    """The filesystem under test; fuse-overlayfs is the stand-in that proves the harness."""
    return subject_named(request.param)
