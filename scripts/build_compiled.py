"""Compile the engine with mypyc into build/mypyc (layerfs.compiled loads it in daemons).

    .venv/bin/python scripts/build_compiled.py [--force]

Does nothing when build/mypyc already holds a build of the current sources for this
interpreter. Otherwise compiles ``layerfs.compiled.MODULES`` as one group in a copy of the
package (the checkout gets no build products) and moves the extension modules and the
MANIFEST into build/mypyc; the old build is removed first, so a failed build leaves none
and daemons run the engine interpreted. Prints one line; the compiler's output goes to
build/mypyc.log. Exit status 1 when the build failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from layerfs import compiled  # noqa: E402  (the checkout's, whatever is installed)

# Run in the copy: mypyc's setuptools step, its group name and the build directory there.
_SETUP = """
import sys
from setuptools import setup
from mypyc.build import mypycify

setup(
    name="layerfs-engine",
    ext_modules=mypycify(sys.argv[1:], group_name={group!r}),
    script_args=["build_ext", "--inplace"],
)
"""


def main() -> int:
    out = Path(compiled.DIR)
    log = out.with_suffix(".log")
    fresh = (out / "MANIFEST").is_file() and (out / "MANIFEST").read_text() == compiled.manifest()
    if fresh and "--force" not in sys.argv[1:]:
        print(f"compiled engine: up to date ({out})")
        return 0
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="layerfs-mypyc-") as tmp:
        work = Path(tmp)
        shutil.copytree(
            REPO / "layerfs",
            work / "layerfs",
            ignore=shutil.ignore_patterns("__pycache__", "*.so"),  # the sources only
        )
        shutil.copy(REPO / "pyproject.toml", work)  # mypy's settings
        sources = [f"layerfs/{name}.py" for name in compiled.MODULES]
        with log.open("w") as f:
            r = subprocess.run(
                [sys.executable, "-c", _SETUP.format(group=compiled.GROUP), *sources],
                cwd=work,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        built = sorted((work / "layerfs").glob("*.so"))
        if r.returncode != 0 or len(built) != len(compiled.MODULES) + 1:
            print(f"compiled engine: build failed ({log}): the engine runs interpreted")
            return 1
        (out / "layerfs").mkdir(parents=True)
        for so in built:
            shutil.move(so, out / "layerfs" / so.name)
        # what was compiled: the copy's sources, which an edit meanwhile cannot change
        (out / "MANIFEST").write_text(compiled.manifest(str(work / "layerfs")))
    took = time.monotonic() - start
    print(f"compiled engine: built in {took:.0f} s ({out}, {len(built)} modules)")
    with contextlib.suppress(OSError):
        log.unlink()
    return 0


if __name__ == "__main__":
    os.umask(0o022)  # readable by the users a rootless mount runs as
    sys.exit(main())
