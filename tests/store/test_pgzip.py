"""The parallel gzip writer produces one standard gzip member that every reader accepts."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from layerfs.store.pgzip import ParallelGzipWriter


def _compress(data: bytes, block: int, workers: int) -> bytes:
    out = io.BytesIO()
    with ParallelGzipWriter(out, level=6, workers=workers, block=block) as w:
        # Odd-sized writes, so blocks straddle them.
        for i in range(0, len(data), 7777):
            w.write(data[i : i + 7777])
    return out.getvalue()


@given(
    st.binary(max_size=200_000) | st.just(b"layerfs " * 50_000),
    st.sampled_from([4096, 65536, 1 << 20]),
    st.integers(1, 3),
)
def test_round_trip(data: bytes, block: int, workers: int) -> None:
    packed = _compress(data, block, workers)
    assert gzip.decompress(packed) == data
    # Deterministic whatever the thread count.
    assert packed == _compress(data, block, 1)


def test_single_member_matches_zlib_size_and_gzip_tool(tmp_path: Path) -> None:
    data = os.urandom(300_000) + b"compressible " * 100_000
    packed = _compress(data, 65536, 2)
    # Back-references across blocks: close to a one-thread deflate of the whole.
    assert len(packed) < len(gzip.compress(data, 6)) * 1.02 + 1024
    if shutil.which("gzip") is None:
        pytest.skip("no gzip tool")
    (tmp_path / "x.gz").write_bytes(packed)
    r = subprocess.run(["gzip", "-tv", str(tmp_path / "x.gz")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r2 = subprocess.run(["gzip", "-dc", str(tmp_path / "x.gz")], capture_output=True)
    assert r2.stdout == data
