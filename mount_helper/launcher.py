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

In front of it, where gcc builds it, goes the C front end (mount_helper/front.c): PATH is
then that program and the launcher is PATH-py (``install``). It makes the thin request to a
running fork server without starting Python at all (its 10 ms of CPU were most of a mount's
exec-to-live time) and execs the launcher for everything else.

``python -m mount_helper.launcher PATH`` writes both, with the interpreter that runs it.

Must not import: anything of layerfs (this only writes a file).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

FRONT_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "front.c")
PYTHON_SUFFIX = "-py"  # the Python front end beside the C one: mount.layerfs-py

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


def install(path: str, python: str, paths: list[str], source: str | None = FRONT_SOURCE) -> bool:
    """``mount.layerfs`` at PATH: the C front end built from SOURCE (None: none) with the
    Python front end beside it at PATH-py, which it runs for all but the thin request; or,
    where it does not build (no gcc, say), the Python front end at PATH as well. True when the
    C front end is at PATH."""
    write(path + PYTHON_SUFFIX, python, paths)
    if source is not None and build_front(source, path, path + PYTHON_SUFFIX, python, paths):
        return True
    write(path, python, paths)
    return False


def build_front(source: str, path: str, python_front: str, python: str, paths: list[str]) -> bool:
    """Compile SOURCE (mount_helper/front.c) to PATH, running PYTHON_FRONT for what it does not
    do itself, and reaching the fork server that PYTHON with PATHS would (the parts of
    layerfs.forkclient.address() fixed at build time); False when it cannot be built."""
    probe = (
        f"import sys; sys.path += {paths!r}; from layerfs import forkclient; "
        "print(repr((forkclient.__file__, sys.executable, sys.version)))"
    )
    try:
        out = subprocess.run(
            [python, "-SP", "-c", probe], capture_output=True, text=True, check=True, cwd="/"
        ).stdout
        module, executable, version = ast.literal_eval(out)
    except (OSError, subprocess.CalledProcessError, ValueError, SyntaxError):
        return False
    pkg = os.path.dirname(module)
    if not pkg.startswith("/"):
        return False  # forkclient normalises a relative path; a built front would not reach it
    header = "".join(
        f"#define {name} {_c_string(value)}\n"
        for name, value in (
            ("FRONT_PYTHON", os.path.abspath(python_front)),
            ("IDENT_EXECUTABLE", executable),
            ("IDENT_VERSION", version),
            ("IDENT_PKG", pkg),
        )
    )
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp + ".h", "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(header)
        built = subprocess.run(
            ["gcc", "-O2", "-Wall", "-include", tmp + ".h", "-o", tmp, source],
            capture_output=True,
            check=False,
        )
        if built.returncode != 0:
            return False
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
        return True
    except OSError:
        return False
    finally:
        for leftover in (tmp, tmp + ".h"):
            try:
                os.unlink(leftover)
            except OSError:
                pass


def _c_string(value: str) -> str:
    """VALUE as a C string literal of its file-system bytes."""
    data = value.encode(sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())
    return '"' + "".join(f"\\{b:03o}" for b in data) + '"'


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m mount_helper.launcher PATH", file=sys.stderr)
        return 2
    front = install(sys.argv[1], sys.executable, site_paths(sys.executable))
    print(f"{sys.argv[1]}: {'C' if front else 'Python'} front end", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
