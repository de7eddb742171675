"""Compile the engine with mypyc into build/mypyc (layerfs.compiled loads it in daemons).

    .venv/bin/python scripts/build_compiled.py [--force] [--out DIR]

Does nothing when DIR (default build/mypyc, ``layerfs.compiled.DIR``) already holds a build
of the current sources for this interpreter. Otherwise, for another DIR (an installed
package's, scripts/install-system.sh) where build/mypyc holds such a build, copies it;
else compiles ``layerfs.compiled.MODULES`` as one group in a copy of the package (the
checkout gets no build products) and moves the extension modules and the MANIFEST into
DIR; the old build is removed first, so a failed build leaves none and daemons run the
engine interpreted. Prints one line; the compiler's output goes to DIR.log. Exit status 1
when the build failed.
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


def _current(built: Path) -> bool:
    """Whether BUILT holds a build of the checkout's sources for this interpreter."""
    manifest = built / "MANIFEST"
    return manifest.is_file() and manifest.read_text() == compiled.manifest()


def main(args: list[str]) -> int:
    force = "--force" in args
    out = Path(args[args.index("--out") + 1]).resolve() if "--out" in args else Path(compiled.DIR)
    log = out.with_suffix(".log")
    if _current(out) and not force:
        print(f"compiled engine: up to date ({out})")
        return 0
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    ours = Path(compiled.DIR)
    if out != ours and _current(ours) and not force:  # the same sources and interpreter
        shutil.copytree(ours, out)
        print(f"compiled engine: copied from {ours} ({out})")
        return 0
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
    sys.exit(main(sys.argv[1:]))
