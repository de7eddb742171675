"""``import pyfuse3`` without ``importlib.metadata``, and trio without ``ldconfig -p``.

pyfuse3 (3.5, ``pyfuse3/_pyfuse3.py``) imports ``importlib.metadata`` at module level for one
thing: ``__version__ = version("pyfuse3")``, falling back to ``"unknown"`` on
PackageNotFoundError. That import (``email``, ``zipfile``, ``csv``, ``importlib.resources``...)
is ~53 million instructions of the fork server's ~590 million before it answers a first
mount's first request (callgrind), and layerfs never reads pyfuse3's version.

``import_pyfuse3`` imports pyfuse3 with a stub of ``importlib.metadata`` in ``sys.modules``
(trio, which pyfuse3 imports, is imported first, without it): the stub's ``version`` raises
PackageNotFoundError, so pyfuse3 takes its own fallback. The stub is removed at once. Should
pyfuse3 need more of the module than the stub has (a newer pyfuse3), the ImportError is
swallowed, the half-imported pyfuse3 dropped, and pyfuse3 imported again, in full.

For the fork server's preload (layerfs.mount): one thread, nothing else importing meanwhile.
Not used when ``importlib.metadata`` is already imported (nothing to save). trio is imported
first, without ldconfig (``_import_trio``).

Must not import: importlib.metadata, pyfuse3 (both inside ``import_pyfuse3`` only).
"""

from __future__ import annotations

import sys

_NAME = "importlib.metadata"


class _PackageNotFoundError(ModuleNotFoundError):
    """The stub's PackageNotFoundError (importlib.metadata's is a ModuleNotFoundError too)."""


def _version(name: str) -> str:
    raise _PackageNotFoundError(name)


def import_pyfuse3() -> None:
    """Import pyfuse3 (and trio) into ``sys.modules``, importlib.metadata left out if it is
    not imported yet."""
    _import_trio()

    if _NAME not in sys.modules and "pyfuse3" not in sys.modules:
        import types

        stub = types.ModuleType(_NAME, "layerfs.importstub's stand-in: version() finds nothing")
        stub.PackageNotFoundError = _PackageNotFoundError  # type: ignore[attr-defined]
        stub.version = _version  # type: ignore[attr-defined]
        sys.modules[_NAME] = stub
        try:
            import pyfuse3
        except ImportError:  # more than the stub has: dropped, imported again below
            for name in [n for n in sys.modules if n == "pyfuse3" or n.startswith("pyfuse3.")]:
                del sys.modules[name]
        finally:
            if sys.modules.get(_NAME) is stub:
                del sys.modules[_NAME]
    import pyfuse3  # noqa: F401


def _import_trio() -> None:
    """``import trio``, whose ``trio._core._thread_cache`` looks up libpthread at import (to
    name its worker threads) with ``ctypes.util.find_library("pthread")``: on Linux that runs
    ``/sbin/ldconfig -p`` in a subprocess (a fork of the server, an exec, its output parsed),
    on the way to a first mount's first answer. Where glibc's ``libpthread.so.0`` can be
    loaded, that is the name ldconfig gives: it is answered without asking; any other name,
    and any other system, goes to find_library as before."""
    if "trio" in sys.modules:
        return
    import ctypes
    import ctypes.util

    real = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        if name == "pthread":
            try:
                ctypes.CDLL("libpthread.so.0")
            except OSError:
                pass
            else:
                return "libpthread.so.0"
        return real(name)

    ctypes.util.find_library = find_library
    try:
        import trio  # noqa: F401
    finally:
        ctypes.util.find_library = real
