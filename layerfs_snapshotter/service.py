"""The gRPC service ``containerd.services.snapshots.v1.Snapshots`` over a Snapshotter.

grpcio's thread-pool server: requests run in worker threads; the Snapshotter serialises the
metadata transactions and does slow work (usage walks, removals) outside them. Errors become
the status codes containerd steers by (NotFound, AlreadyExists, FailedPrecondition,
InvalidArgument); anything else is Unknown, with the message, and is logged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, message, timestamp_pb2

from layerfs_snapshotter import errors
from layerfs_snapshotter.api import mount_pb2, snapshots_pb2
from layerfs_snapshotter.metadata import ACTIVE, COMMITTED, VIEW, Info
from layerfs_snapshotter.mounts import Mount
from layerfs_snapshotter.snapshotter import Snapshotter

log = logging.getLogger("layerfs-snapshotter")

SERVICE = "containerd.services.snapshots.v1.Snapshots"

_CODES: dict[type[errors.SnapshotError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
}
_KINDS = {
    VIEW: snapshots_pb2.VIEW,
    ACTIVE: snapshots_pb2.ACTIVE,
    COMMITTED: snapshots_pb2.COMMITTED,
}
_LIST_BATCH = 100  # infos per List message, as containerd's own service sends them

Req = TypeVar("Req", bound=message.Message)
Resp = TypeVar("Resp")


def _status(
    fn: Callable[[Servicer, Req, grpc.ServicerContext], Resp],
) -> Callable[[Servicer, Req, grpc.ServicerContext], Resp]:
    """Turn the snapshotter's errors into gRPC statuses (context.abort raises)."""

    @functools.wraps(fn)
    def wrapper(self: Servicer, request: Req, context: grpc.ServicerContext) -> Resp:
        name = fn.__name__
        try:
            return fn(self, request, context)
        except errors.SnapshotError as e:
            log.debug("%s: %s: %s", name, type(e).__name__, e)
            context.abort(_CODES[type(e)], str(e))
        except Exception as e:
            log.exception("%s failed", name)
            context.abort(grpc.StatusCode.UNKNOWN, f"{name}: {e}")

    return wrapper


def _mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def _info(info: Info) -> snapshots_pb2.Info:
    return snapshots_pb2.Info(
        name=info.name,
        parent=info.parent,
        kind=_KINDS[info.kind],
        created_at=_timestamp(info.created_ns),
        updated_at=_timestamp(info.updated_ns),
        labels=info.labels,
    )


class Servicer:
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    @_status
    def Prepare(
        self, req: snapshots_pb2.PrepareSnapshotRequest, ctx: grpc.ServicerContext
    ) -> snapshots_pb2.PrepareSnapshotResponse:
        mounts = self.sn.prepare(req.key, req.parent, dict(req.labels))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_status
    def View(
        self, req: snapshots_pb2.ViewSnapshotRequest, ctx: grpc.ServicerContext
    ) -> snapshots_pb2.ViewSnapshotResponse:
        mounts = self.sn.view(req.key, req.parent, dict(req.labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_status
    def Mounts(
        self, req: snapshots_pb2.MountsRequest, ctx: grpc.ServicerContext
    ) -> snapshots_pb2.MountsResponse:
        return snapshots_pb2.MountsResponse(mounts=_mounts(self.sn.mounts(req.key)))

    @_status
    def Commit(
        self, req: snapshots_pb2.CommitSnapshotRequest, ctx: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.sn.commit(req.name, req.key, dict(req.labels))
        return empty_pb2.Empty()

    @_status
    def Remove(
        self, req: snapshots_pb2.RemoveSnapshotRequest, ctx: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.sn.remove(req.key)
        return empty_pb2.Empty()

    @_status
    def Stat(
        self, req: snapshots_pb2.StatSnapshotRequest, ctx: grpc.ServicerContext
    ) -> snapshots_pb2.StatSnapshotResponse:
        return snapshots_pb2.StatSnapshotResponse(info=_info(self.sn.stat(req.key)))

    @_status
    def Update(
        self, req: snapshots_pb2.UpdateSnapshotRequest, ctx: grpc.ServicerContext
    ) -> snapshots_pb2.UpdateSnapshotResponse:
        paths = list(req.update_mask.paths) if req.HasField("update_mask") else []
        info = self.sn.update(req.info.name, dict(req.info.labels), paths)
        return snapshots_pb2.UpdateSnapshotResponse(info=_info(info))

    @_status
    def List(
        self, req: snapshots_pb2.ListSnapshotsRequest, ctx: grpc.ServicerContext
    ) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
        # Parsed and read before the first message, so that a bad filter is a status.
        infos = [_info(i) for i in self.sn.walk(list(req.filters))]
        return iter(
            [
                snapshots_pb2.ListSnapshotsResponse(info=infos[i : i + _LIST_BATCH])
                for i in range(0, len(infos), _LIST_BATCH)
            ]
        )

    @_status
    def Usage(
        self, req: snapshots_pb2.UsageRequest, ctx: grpc.ServicerContext
    ) -> snapshots_pb2.UsageResponse:
        use = self.sn.usage(req.key)
        return snapshots_pb2.UsageResponse(size=use.size, inodes=use.inodes)

    @_status
    def Cleanup(
        self, req: snapshots_pb2.CleanupRequest, ctx: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.sn.cleanup()
        return empty_pb2.Empty()


def _handlers(servicer: Servicer) -> grpc.GenericRpcHandler:
    msgs = snapshots_pb2
    unary: dict[str, tuple[Any, Any]] = {
        "Prepare": (msgs.PrepareSnapshotRequest, msgs.PrepareSnapshotResponse),
        "View": (msgs.ViewSnapshotRequest, msgs.ViewSnapshotResponse),
        "Mounts": (msgs.MountsRequest, msgs.MountsResponse),
        "Commit": (msgs.CommitSnapshotRequest, empty_pb2.Empty),
        "Remove": (msgs.RemoveSnapshotRequest, empty_pb2.Empty),
        "Stat": (msgs.StatSnapshotRequest, msgs.StatSnapshotResponse),
        "Update": (msgs.UpdateSnapshotRequest, msgs.UpdateSnapshotResponse),
        "Usage": (msgs.UsageRequest, msgs.UsageResponse),
        "Cleanup": (msgs.CleanupRequest, empty_pb2.Empty),
    }
    table: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=req.FromString,
            response_serializer=resp.SerializeToString,
        )
        for name, (req, resp) in unary.items()
    }
    table["List"] = grpc.unary_stream_rpc_method_handler(
        servicer.List,
        request_deserializer=msgs.ListSnapshotsRequest.FromString,
        response_serializer=msgs.ListSnapshotsResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, table)


def make_server(snapshotter: Snapshotter, address: str, workers: int = 8) -> grpc.Server:
    """A server for SNAPSHOTTER listening on the unix socket ADDRESS (not started)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((_handlers(Servicer(snapshotter)),))
    server.add_insecure_port(f"unix:{address}")
    return server
