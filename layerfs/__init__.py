"""layerfs: a copy-on-write layered filesystem for container root filesystems."""

__version__ = "0.1.0"
