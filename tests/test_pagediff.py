"""benchmarks.pagediff finds a forked child's own pages and tells each kind of write apart."""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os

import pytest

from benchmarks import pagediff

PAGE = pagediff.PAGE

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="pagemap frame numbers need root")


def test_a_child_s_writes_are_classed_page_by_page() -> None:
    buf = mmap.mmap(-1, 16 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ctypes.c_char.from_buffer(buf)
    base = ctypes.addressof(view)
    untouched = 5  # never written here: absent in the parent
    for page in range(16):
        if page != untouched:
            buf[page * PAGE : (page + 1) * PAGE] = bytes([page + 1]) * PAGE
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(done_w)  # the parent's closing it ends the wait below
            word = 1 * PAGE  # a count: one word raised by 3
            value = int.from_bytes(buf[word : word + 8], "little") + 3
            buf[word : word + 8] = value.to_bytes(8, "little")
            buf[2 * PAGE + 64 : 2 * PAGE + 72] = (2**62).to_bytes(8, "little")  # a pointer
            buf[3 * PAGE : 3 * PAGE + 8] = buf[3 * PAGE : 3 * PAGE + 8]  # copied, unchanged
            buf[untouched * PAGE] = 7
            os.write(ready_w, b"r")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)  # a child that dies early gives EOF, not a hang
    os.close(done_r)
    try:
        assert os.read(ready_r, 1) == b"r"
        diff = pagediff.compare(pid, os.getpid())
    finally:
        os.close(done_w)  # the child's read returns: it exits
        os.waitpid(pid, 0)
        os.close(ready_r)
        del view
        buf.close()
    ours = {
        kind: {(a - base) // PAGE for a in addresses if base <= a < base + 16 * PAGE}
        for kind, addresses in diff.addresses.items()
    }
    assert ours == {"counts": {1}, "other": {2}, "same": {3}, "new": {untouched}}
    assert diff.pages[("anon", "counts")] >= 1
    page2 = bytearray(bytes([3]) * PAGE)  # as the child left it
    page2[64:72] = (2**62).to_bytes(8, "little")
    digest = hashlib.blake2b(bytes(page2), digest_size=16).digest()
    assert digest in diff.contents  # a page of its own: counted once when merged
    assert hashlib.blake2b(bytes([4]) * PAGE, digest_size=16).digest() not in diff.contents
    assert "total" in pagediff.report(diff)
