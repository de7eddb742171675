"""_sys.check_name: one path component, or EINVAL (ENAMETOOLONG past 255 bytes).

It runs on every lookup and create; it tests for "/" and NUL as ints (bytes' ``in`` with a
bytes operand raises and clears a TypeError first): a slash or NUL anywhere, first and last
bytes included, must still be refused (docs/benchmarks.md, session 11 loopprof).
"""

from __future__ import annotations

import errno

import pytest

from layerfs import _sys

REFUSED = [b"", b".", b"..", b"/", b"/a", b"a/", b"a/b", b"\0", b"\0a", b"a\0", b"a\0b", b"a/\0"]
ACCEPTED = [b"a", b"...", b".a", b"a.", b"a b", b"\xff\xfe", b"\\", b"x" * 255]


@pytest.mark.parametrize("name", REFUSED)
def test_a_name_that_is_not_one_component_is_refused(name: bytes) -> None:
    with pytest.raises(OSError) as e:
        _sys.check_name(name)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("name", ACCEPTED)
def test_one_component_is_accepted(name: bytes) -> None:
    _sys.check_name(name)


def test_a_name_over_255_bytes_is_too_long() -> None:
    with pytest.raises(OSError) as e:
        _sys.check_name(b"x" * 256)
    assert e.value.errno == errno.ENAMETOOLONG
