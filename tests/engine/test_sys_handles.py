"""_sys.file_handle_at, the origin a copy-up records: one buffer per thread, reused by every
call (a buffer, an int and a pointer made per call were a third of the call's cost, session 16
chmod4). What each call returns must not depend on the calls before it, in this thread or in
another: the handle of each name, of the directory itself (b""), of a symlink (not followed),
the error for a missing name."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from layerfs import _sys


def test_handles_alike_across_calls_and_threads(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"f{i}").write_bytes(b"x")
    (tmp_path / "l").symlink_to("f0")
    names = [f"f{i}".encode() for i in range(50)] + [b"l", b""]
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = {n: _sys.file_handle_at(fd, n) for n in names}
        if first[b"f0"] is None:
            pytest.skip("this filesystem has no file handles")
        assert len(set(first.values())) == len(names)  # each its own (the link's, not f0's)
        with pytest.raises(FileNotFoundError):
            _sys.file_handle_at(fd, b"missing")
        seen: list[dict[bytes, tuple[int, bytes] | None]] = []

        def run() -> None:
            for _ in range(20):
                seen.append({n: _sys.file_handle_at(fd, n) for n in reversed(names)})

        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(seen) == 80 and all(s == first for s in seen)
        path_fd = os.open(tmp_path / "f3", os.O_PATH)
        try:
            assert _sys.file_handle_at(path_fd, b"") == first[b"f3"]
        finally:
            os.close(path_fd)
    finally:
        os.close(fd)
