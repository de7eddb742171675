"""layerfs.fusehooks finds pyfuse3's symbols without copying the extension into memory."""

from __future__ import annotations

import os
import subprocess
import sys
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


def test_daemons_forked_by_the_server_find_the_symbols_without_a_walk() -> None:
    """The fork server's preload looks pyfuse3's variables up once: a daemon forked from it
    finds them (the same addresses) without walking the symbol table again, ~2 ms of Python
    on the way to its first answer; and the ctypes types and library handle the hooks are
    made of, made in the server (a class each, ~0.6 ms in every daemon)."""
    script = r"""
import os
from layerfs import fusehooks, mount
mount._preload()
import pyfuse3
ext = pyfuse3.__file__
base = fusehooks._load_base(ext)
want = {fusehooks._SESSION, fusehooks._FUSE_OPS, fusehooks._WORKER_DATA}
expect = {k: base + v for k, v in fusehooks._symbols(ext, want).items()}
def walk(*args):
    raise AssertionError("the symbol table was walked again")
fusehooks._symtab = walk
import ctypes
def make(*args, **kwargs):
    raise AssertionError("a ctypes type or library handle was made again")
pid = os.fork()
if pid == 0:
    ctypes.CFUNCTYPE = ctypes.PYFUNCTYPE = ctypes.CDLL = make
    try:
        ok = fusehooks._addresses(ext) == expect and len(expect) == 3
        fusehooks._libfuse()
        for args in fusehooks._SIGNATURES:
            fusehooks._shim_type(args)
            fusehooks._handler_type(args)
    except AssertionError:
        ok = False
    os._exit(0 if ok else 1)
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "0", out
