"""The fork server's preload imports pyfuse3 without importlib.metadata and trio without
``ldconfig -p`` (layerfs.importstub).

What these hold: after the preload of a fork server, neither ``importlib.metadata`` nor
``email`` is imported and pyfuse3 is whole (its own "unknown" version, its API there), the
stub is gone from ``sys.modules``, no subprocess was started and trio still names its
threads; a pyfuse3 that needs more of importlib.metadata than the stub has is imported
again, in full, with the real module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from compat.helpers import REPO

CHECK_PRELOAD = """
import subprocess, sys
started = []
class Popen(subprocess.Popen):
    def __init__(self, args, *more, **kw):
        started.append(args)
        super().__init__(args, *more, **kw)
subprocess.Popen = Popen
from layerfs.mount import _preload
_preload()
import pyfuse3, trio._core._thread_cache as threads
print(sorted(n for n in sys.modules if n == "importlib.metadata" or n.split(".")[0] == "email"))
print(pyfuse3.__version__, callable(pyfuse3.init), callable(pyfuse3.main))
print(started, threads.set_os_thread_name is not None)
"""


def _run(code: str, *paths: str) -> list[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*paths, os.fspath(REPO)])
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_the_preload_leaves_importlib_metadata_out() -> None:
    # and trio named its threads without running ldconfig -p (ctypes.util.find_library)
    assert _run(CHECK_PRELOAD) == ["[]", "unknown True True", "[] True"]


FAKE_PYFUSE3 = """
from importlib.metadata import version, distribution  # more than the stub has
VERSION = version("trio")
"""


def test_a_pyfuse3_wanting_more_is_imported_in_full(tmp_path: Path) -> None:
    (tmp_path / "pyfuse3").mkdir()
    (tmp_path / "pyfuse3" / "__init__.py").write_text(FAKE_PYFUSE3)
    code = (
        "import sys, importlib.metadata as real\n"
        "del sys.modules['importlib.metadata']\n"  # as in a fresh server
        "from layerfs import importstub\n"
        "importstub.import_pyfuse3()\n"
        "import pyfuse3, importlib.metadata as md\n"
        "print(pyfuse3.VERSION == real.version('trio'), md.distribution is not None)\n"
    )
    assert _run(code, str(tmp_path)) == ["True True"]
