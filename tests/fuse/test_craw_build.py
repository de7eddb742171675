"""The compiled raw path's build (layerfs._craw, scripts/setup.sh): a daemon loads it only when
it was built from the ``_craw.pyx`` beside it, as the mypyc engine's MANIFEST check does
(tests/fuse/test_compiled.py). A build of another source (a checkout moved on without
setup.sh run again, or a rebuild that failed and left the old one) pairs old C with new
Python: in session 14 such a build left a request unanswered, a test hung 10 min past its
timeout (docs/testing.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs import fusehooks


def test_a_build_of_another_source_is_not_loaded(tmp_path: Path) -> None:
    """A copy of the package with its build: loaded; with the copy's _craw.pyx changed by a
    line, refused with a warning (the Python raw path serves)."""
    module = fusehooks.craw_module()
    if module is None:
        pytest.skip("layerfs._craw is not built (scripts/setup.sh builds it: Cython and gcc)")
    pkg = Path(fusehooks.__file__).parent
    shutil.copytree(pkg, tmp_path / "layerfs", ignore=shutil.ignore_patterns("__pycache__"))
    probe = "from layerfs import fusehooks; print(fusehooks.craw_module() is not None)"

    def loaded() -> tuple[bool, str]:
        env = {**os.environ, "PYTHONPATH": str(tmp_path)}
        out = subprocess.run(
            [sys.executable, "-P", "-c", probe],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip() == "True", out.stderr

    assert loaded() == (True, "")
    source = tmp_path / "layerfs" / "_craw.pyx"
    source.write_bytes(source.read_bytes() + b"# edited after the build\n")
    ok, err = loaded()
    assert not ok, "a build of another _craw.pyx was loaded"
    assert "setup.sh" in err, err
