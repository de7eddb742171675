"""The errors the snapshotter raises, one per gRPC status code containerd acts on."""

from __future__ import annotations


class SnapshotError(Exception):
    """Base: the service maps each subclass to its gRPC status code (service.py)."""


class NotFound(SnapshotError):
    pass


class AlreadyExists(SnapshotError):
    pass


class FailedPrecondition(SnapshotError):
    pass


class InvalidArgument(SnapshotError):
    pass
