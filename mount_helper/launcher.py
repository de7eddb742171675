"""The ``mount.layerfs`` program file: Python started without ``site``, straight into ``run``.

pip's console script for ``mount.layerfs`` imports ``re`` before our code runs, and Python
imports ``site`` (the venv's ``.pth`` files, setuptools' ``_distutils_hack``) before either:
together 21 of the 60.6 million instructions a mount with a fork server up cost its caller
(``valgrind --tool=callgrind``; 39.4 million without them). scripts/setup.sh and
scripts/install-system.sh replace that script with this launcher: ``python -SP`` (no
``site``; ``-P``: the script's directory is not put on ``sys.path``), with the ``sys.path``
entries ``site`` would have added written into it, as they are when it is written.
``PYTHON*`` variables keep working (no ``-E``), and the fork server and daemons, forked from a
``mount.layerfs``, find trio and pyfuse3 on that path.

``python -m mount_helper.launcher PATH`` writes it, with the interpreter that runs it.

Must not import: anything of layerfs (this only writes a file).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

# Linux reads at most this much of a "#!" line (BINPRM_BUF_SIZE, 256 since 5.1; 128 before)
_SHEBANG_MAX = 127


def site_paths(python: str) -> list[str]:
    """The ``sys.path`` entries PYTHON's ``site`` adds (its site-packages, and what their
    ``.pth`` files name, an editable install's checkout among them), in order."""

    def path(*flags: str) -> list[str]:
        out = subprocess.run(
            [python, *flags, "-P", "-c", "import sys; print(repr(sys.path))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [str(p) for p in ast.literal_eval(out)]

    bare = set(path("-S"))
    return [p for p in path() if p not in bare]


def text(python: str, paths: list[str]) -> str:
    """The launcher: PYTHON with ``-SP``, PATHS appended to ``sys.path``, then ``run``."""
    shebang = f"#!{python} -SP\n"
    if len(shebang) > _SHEBANG_MAX or any(c.isspace() for c in python):
        # what pip writes in that case: sh execs the interpreter on this same file
        shebang = f"#!/bin/sh\n'''exec' {_sh_quote(python)} -SP \"$0\" \"$@\"\n' '''\n"
    return (
        f"{shebang}"
        "# mount.layerfs, written by mount_helper/launcher.py (scripts/setup.sh and\n"
        "# install-system.sh): no site, no re, the paths below. Rewrite it if they move.\n"
        "import sys\n"
        f"sys.path += {paths!r}\n"
        "from mount_helper.main import run\n"
        "run()\n"
    )


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def write(path: str, python: str, paths: list[str]) -> None:
    """Write the launcher at PATH (atomically, executable)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text(python, paths))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m mount_helper.launcher PATH", file=sys.stderr)
        return 2
    write(sys.argv[1], sys.executable, site_paths(sys.executable))
    return 0


if __name__ == "__main__":
    sys.exit(main())
