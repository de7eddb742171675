"""The engine compiled by mypyc, loaded in a daemon in place of its sources.

``scripts/build_compiled.py`` (run by scripts/setup.sh) compiles MODULES, the engine below
the FUSE adapter, from these sources into one mypyc group: DIR holds ``layerfs/*.so`` (a
shim per module and the group's library, ``layerfs/engine__mypyc``) and a MANIFEST of what
they were built from (the interpreter, each source's size and CRC). A daemon, or the fork
server's preload, calls ``use()`` before it imports the engine: with the switch on, and a
build of exactly these sources for this interpreter, ``use()`` puts ``DIR/layerfs`` first
on the package's ``__path__``, so that ``import layerfs.overlay`` finds the extension module
there and every module not compiled is still found beside this file. The sources stay the
one truth: a build of other sources (an edit, a checkout, another Python) is not loaded.

The switch: ``LAYERFS_COMPILED=0`` runs the engine interpreted, ``1`` compiled (where
built); unset, DEFAULT: compiled where built (since session 15), else interpreted.
Compiled, a failed lookup takes 37% and an untar 20% fewer user instructions a request
(docs/benchmarks.md, session 14, mypyc), and since session 15 a walk keeps as much per
node in both (docs/architecture.md, "The engine compiled by mypyc": mypyc boxes a new int
wherever an int-typed value is stored). Processes that do not call ``use()`` (the
in-process engine tests, ``benchmarks.handlercost``) run the sources.

Not compiled: the adapter (``ops``: pyfuse3's Operations subclass, imported afresh for each
mount of a sharing process; ``fusehooks``: ctypes callbacks), and
what a mount's caller runs before a daemon exists (``config``, ``records``, ``errors``,
``premount``, ``forkserver``...), which a daemon runs once.

Must not import: anything but the standard library (the fork server's caller imports this).
"""

from __future__ import annotations

import os
import sys
import zlib

# One group: calls between these modules are C calls. In import order (the build's list).
MODULES = (
    "_sys",
    "xattrs",
    "whiteout",
    "locks",
    "layers",
    "inodes",
    "lookup",
    "readdir",
    "copyup",
    "dirty",
    "files",
    "namespace",
    "attrs",
    "acl",
    "idmap",
    "overlay",
)
GROUP = "layerfs.engine"  # the shared library: DIR/layerfs/engine__mypyc.*.so
DEFAULT = True

_PKG = os.path.dirname(os.path.abspath(__file__))
# build/ of the checkout (not in git); layerfs.forkclient reads DIR/MANIFEST's mtime too
DIR = os.path.join(os.path.dirname(_PKG), "build", "mypyc")

_state: str | None = None


def enabled() -> bool:
    """Whether this process's environment asks for the compiled engine."""
    value = os.environ.get("LAYERFS_COMPILED", "")
    return DEFAULT if value == "" else value != "0"


def manifest(pkg: str = _PKG) -> str:
    """What a build is valid for: this interpreter, and the sources of MODULES in PKG."""
    lines = [sys.version]
    for name in MODULES:
        with open(os.path.join(pkg, name + ".py"), "rb") as f:
            data = f.read()
        lines.append(f"{name} {len(data)} {zlib.crc32(data):08x}")
    return "\n".join(lines) + "\n"


def use() -> str:
    """Load the engine compiled if the switch is on and a build of these sources exists;
    return what this process runs: "compiled", or "interpreted (why)". Call it before the
    engine is imported; later calls return the first answer."""
    global _state
    if _state is None:
        _state = _choose()
    return _state


def _choose() -> str:
    if not enabled():
        return "interpreted (LAYERFS_COMPILED=0)"
    try:
        with open(os.path.join(DIR, "MANIFEST")) as f:
            built = f.read()
    except OSError:
        return f"interpreted (no compiled engine in {DIR}: scripts/build_compiled.py)"
    if built != manifest():
        return f"interpreted ({DIR} was built from other sources: scripts/build_compiled.py)"
    early = [name for name in MODULES if f"layerfs.{name}" in sys.modules]
    if early:  # two copies of a class (one compiled) would not mix
        return f"interpreted (layerfs.{early[0]} was imported before the switch)"
    import layerfs

    layerfs.__path__.insert(0, os.path.join(DIR, "layerfs"))
    return "compiled"
