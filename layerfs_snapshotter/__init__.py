"""layerfs-snapshotter: a containerd snapshotter (proxy plugin, gRPC) whose mounts are layerfs.

A long-running service that keeps snapshot metadata in sqlite and the layers in the overlay
snapshotter's layout; it mounts nothing itself: containerd and its clients mount what Mounts
returns (``fuse3.mount.layerfs``, so each mount daemon is theirs, not ours).

Must not import: pyfuse3, trio, the layerfs engine (docs/containerd.md).
"""
