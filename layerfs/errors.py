"""Errors the front ends report to users: one line, no traceback."""

from __future__ import annotations


class LayerfsError(Exception):
    """A user-facing error (bad option, bad directory, mount failure)."""
