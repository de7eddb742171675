"""layerfs.fusehooks finds pyfuse3's symbols without copying the extension into memory."""

from __future__ import annotations

import os
import tracemalloc

import pyfuse3

from layerfs import fusehooks


def test_symbols_are_found_without_reading_the_extension_into_memory() -> None:
    wanted = {b"__pyx_v_7pyfuse3_worker_data", b"__pyx_v_7pyfuse3_session"}
    size = os.path.getsize(pyfuse3.__file__)
    tracemalloc.start()
    try:
        found = fusehooks._symbols(pyfuse3.__file__, wanted)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert set(found) == wanted and all(found.values())
    # A read of the file (4 MiB) stays in a daemon's heap; the symbol table walk needs KiB.
    assert peak < size // 16, (peak, size)
