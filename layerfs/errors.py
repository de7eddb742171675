"""The project's exception classes: errors the front ends report to users (one line, no
traceback), and the engine's OSError subclass, here because mypyc cannot compile a class
derived from OSError (layerfs.compiled: this module stays interpreted)."""

from __future__ import annotations


class LayerfsError(Exception):
    """A user-facing error (bad option, bad directory, mount failure)."""


class MetacopySizeError(OSError):
    """An upper metacopy file whose size is not its data's: no copy-up makes one. The kernel
    serves it (the upper's size in stat, the data's bytes to its own end in a read, and a
    copy-up of the data over the upper's own bytes), which FUSE's page cache cannot (reads
    stop at the size stat showed): layerfs refuses its lookup (EIO, layerfs.lookup.resolve),
    and a listing, which the kernel's lookup would pass, shows it as a bare entry
    (Overlay._check_impure_merged)."""
