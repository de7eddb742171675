"""layerfs-snapshotter's gRPC service: status codes, mounts, metadata, List filters, Usage,
crash repair and SIGTERM. (containerd's own suite runs in test_conformance.py; these pin what
it does not check.)"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2

from layerfs_snapshotter.api import snapshots_pb2 as pb
from layerfs_snapshotter.mounts import root_in_initial_userns

from ._service import Client, mounted, running, start, unmount


def code(fn: object, *args: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args)  # type: ignore[operator]
    return e.value.code()  # type: ignore[no-any-return]


def prepare(c: Client, key: str, parent: str = "", **labels: str) -> list[pb.Mount]:  # type: ignore[name-defined]
    return list(
        c.call("Prepare", pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels)).mounts
    )


def commit(c: Client, name: str, key: str) -> None:
    c.call("Commit", pb.CommitSnapshotRequest(name=name, key=key))


def test_status_codes() -> None:
    with running() as svc:
        c = svc.client
        assert code(c.call, "Stat", pb.StatSnapshotRequest(key="nope")) == grpc.StatusCode.NOT_FOUND
        assert code(c.call, "Mounts", pb.MountsRequest(key="nope")) == grpc.StatusCode.NOT_FOUND
        assert (
            code(c.call, "Remove", pb.RemoveSnapshotRequest(key="x")) == grpc.StatusCode.NOT_FOUND
        )
        assert code(prepare, c, "a", "missing-parent") == grpc.StatusCode.NOT_FOUND
        prepare(c, "a")
        assert code(prepare, c, "a") == grpc.StatusCode.ALREADY_EXISTS
        # an active parent is not a committed one
        assert code(prepare, c, "b", "a") == grpc.StatusCode.INVALID_ARGUMENT
        commit(c, "l1", "a")
        assert code(commit, c, "l1", "a") == grpc.StatusCode.ALREADY_EXISTS
        assert code(commit, c, "l2", "a") == grpc.StatusCode.NOT_FOUND
        # a committed snapshot has no mounts; a view cannot be committed
        assert (
            code(c.call, "Mounts", pb.MountsRequest(key="l1"))
            == grpc.StatusCode.FAILED_PRECONDITION
        )
        c.call("View", pb.ViewSnapshotRequest(key="v", parent="l1"))
        assert code(commit, c, "l3", "v") == grpc.StatusCode.FAILED_PRECONDITION
        # a parent with children cannot go
        assert (
            code(c.call, "Remove", pb.RemoveSnapshotRequest(key="l1"))
            == grpc.StatusCode.FAILED_PRECONDITION
        )
        bad = pb.UpdateSnapshotRequest(
            info=pb.Info(name="l1"), update_mask=field_mask_pb2.FieldMask(paths=["parent"])
        )
        assert code(c.call, "Update", bad) == grpc.StatusCode.INVALID_ARGUMENT
        assert code(c.list, "name==") != grpc.StatusCode.OK  # an empty value is a parse error
        assert code(c.list, 'labels."x') == grpc.StatusCode.INVALID_ARGUMENT


def test_mount_kinds_and_lowerdir_order() -> None:
    with running("--kernel-extract", "off") as svc:
        c, snaps = svc.client, svc.root / "snapshots"
        (m,) = prepare(c, "a")
        assert (m.type, list(m.options)) == ("bind", ["rw", "rbind"])
        base = Path(m.source)
        assert base.parent.parent == snaps and base.name == "fs"
        commit(c, "l1", "a")
        (v,) = c.call("View", pb.ViewSnapshotRequest(key="v1", parent="l1")).mounts
        assert (v.type, v.source, list(v.options)) == ("bind", str(base), ["ro", "rbind"])
        (m2,) = prepare(c, "b", "l1")
        commit(c, "l2", "b")
        up = Path(next(o for o in m2.options if o.startswith("upperdir=")).split("=", 1)[1])
        (m3,) = prepare(
            c, "c", "l2", **{"containerd.io/snapshot/uidmapping": "0:100000:65536,65536:1:1"}
        )
        assert m3.type == "fuse3.mount.layerfs" and m3.source == "overlay"
        opts = dict(o.split("=", 1) for o in m3.options)
        assert opts["lowerdir"] == f"{up}:{base}"  # nearest parent first
        assert opts["upperdir"].endswith("/fs") and opts["workdir"].endswith("/work")
        assert opts["uidmapping"] == "0:100000:65536:65536:1:1"
        (v2,) = c.call("View", pb.ViewSnapshotRequest(key="v2", parent="l2")).mounts
        assert list(v2.options) == [f"lowerdir={up}:{base}"]
        # Mounts answers what Prepare answered
        (again,) = c.call("Mounts", pb.MountsRequest(key="c")).mounts
        assert again == m3


@pytest.mark.skipif(not root_in_initial_userns(), reason="needs root in the initial userns")
def test_extract_snapshot_gets_a_kernel_overlay() -> None:
    with running() as svc:
        c = svc.client
        prepare(c, "ns/1/extract-1 sha256:a")
        commit(c, "l1", "ns/1/extract-1 sha256:a")
        (m,) = prepare(c, "ns/2/extract-2 sha256:b", "l1")
        assert m.type == "overlay"
        assert {o.split("=")[0] for o in m.options} >= {"lowerdir", "upperdir", "workdir"}
        (m2,) = prepare(c, "ns/3/container", "l1")
        assert m2.type == "fuse3.mount.layerfs"


def test_labels_update_and_walk_filters() -> None:
    with running() as svc:
        c = svc.client
        prepare(c, "a", **{"containerd.io/gc.root": "x", "l": "1"})
        commit(c, "p", "a")
        prepare(c, "b", "p", l="2", other="y")
        c.call("View", pb.ViewSnapshotRequest(key="v", parent="p"))

        def names(*f: str) -> list[str]:
            return sorted(i.name for i in c.list(*f))

        assert names() == ["b", "p", "v"]
        assert names("kind==committed") == ["p"]
        assert names("parent==p") == ["b", "v"]
        assert names('parent!=""') == ["b", "v"]
        assert names("labels.l==2") == ["b"]
        assert names("labels.l") == ["b"]  # commit labels replace the active's
        assert names("name==p", "name==v") == ["p", "v"]
        assert names('labels."containerd.io/snapshot.ref"==sha256:x,parent=="p"') == []
        assert names("name~=/^[bv]$/") == ["b", "v"]
        # Update: no mask replaces all labels; labels.K sets or (absent) removes one
        info = c.call(
            "Update", pb.UpdateSnapshotRequest(info=pb.Info(name="b", labels={"k": "v"}))
        ).info
        assert dict(info.labels) == {"k": "v"}
        mask = field_mask_pb2.FieldMask(paths=["labels.k", "labels.n"])
        req = pb.UpdateSnapshotRequest(info=pb.Info(name="b", labels={"n": "1"}), update_mask=mask)
        info = c.call("Update", req).info
        assert dict(info.labels) == {"n": "1"}
        assert info.updated_at.ToNanoseconds() > info.created_at.ToNanoseconds()
        st = c.call("Stat", pb.StatSnapshotRequest(key="b")).info
        assert (st.parent, st.kind) == ("p", pb.ACTIVE)


def test_usage_of_active_and_committed() -> None:
    with running() as svc:
        c = svc.client
        (m,) = prepare(c, "a")
        fs = Path(m.source)
        (fs / "f").write_bytes(b"x" * 100_000)
        os.link(fs / "f", fs / "hardlink")
        (fs / "d").mkdir()
        u = c.call("Usage", pb.UsageRequest(key="a"))
        du = subprocess.run(["du", "-s", "-B1", str(fs)], capture_output=True, text=True)
        assert u.size == int(du.stdout.split()[0])  # hard link counted once, as du does
        assert u.inodes == 3  # fs, f (twice linked), d
        commit(c, "l", "a")
        assert c.call("Usage", pb.UsageRequest(key="l")) == u


def test_crash_leftovers_are_repaired_at_start() -> None:
    """Whatever a crash leaves between a directory and its row: the next start removes the
    directories without a row, keeps the others, and ids are never handed out twice."""
    with tempfile.TemporaryDirectory(prefix="layerfs-snap-") as tmp:
        root, sock = Path(tmp, "root"), Path(tmp, "s.sock")
        svc = start(root, sock)
        prepare(svc.client, "keep")
        (m,) = prepare(svc.client, "gone")
        svc.client.channel.close()
        svc.stop(signal.SIGKILL)
        snaps = root / "snapshots"
        gone = Path(m.source).parent
        # the row of "gone" never committed; a creation and a removal were cut short
        with sqlite3.connect(root / "metadata.db") as db:
            db.execute("DELETE FROM snapshots WHERE key = 'gone'")
        (snaps / "new-abc" / "fs").mkdir(parents=True)
        (snaps / "rm-7-xyz" / "fs").mkdir(parents=True)
        svc = start(root, sock)
        try:
            left = sorted(p.name for p in snaps.iterdir())
            keep = svc.client.call("Mounts", pb.MountsRequest(key="keep")).mounts[0]
            assert left == [Path(keep.source).parent.name]
            assert not gone.exists()
            (m2,) = prepare(svc.client, "new")
            assert Path(m2.source).parent.name not in (gone.name, left[0])
            svc.client.call("Remove", pb.RemoveSnapshotRequest(key="new"))
            assert not Path(m2.source).exists()
        finally:
            svc.client.channel.close()
            assert svc.stop() == 0  # SIGTERM: a clean exit
        assert not sock.exists()


@pytest.mark.fuse
def test_fuse_mount_of_a_prepared_snapshot() -> None:
    """What Mounts returns mounts through mount.fuse3 as containerd runs it: the lowers show,
    writes land in the upper, and Usage sees them."""
    with running("--kernel-extract", "off") as svc, tempfile.TemporaryDirectory() as mnt:
        c = svc.client
        (m,) = prepare(c, "a")
        Path(m.source, "bottom").write_text("b")
        commit(c, "l1", "a")
        (m,) = prepare(c, "b", "l1")
        mounted(m, mnt)
        try:
            assert Path(mnt, "bottom").read_text() == "b"
            Path(mnt, "top").write_text("t")
            Path(mnt, "bottom").unlink()
            fstype = subprocess.run(
                ["findmnt", "-n", "-o", "FSTYPE", mnt], capture_output=True, text=True
            ).stdout.strip()
            assert fstype == "fuse.layerfs"
        finally:
            unmount(mnt)
        upper = Path(dict(o.split("=", 1) for o in m.options)["upperdir"])
        assert (upper / "top").read_text() == "t"
        assert (upper / "bottom").is_char_device()  # a whiteout
        assert c.call("Usage", pb.UsageRequest(key="b")).inodes == 3
    shutil.rmtree(mnt, ignore_errors=True)


def test_fuse_program_option_names_the_mount_type() -> None:
    """--fuse-program (for comparisons: fuse-overlayfs takes the same options)."""
    with running("--kernel-extract", "off", "--fuse-program", "fuse-overlayfs") as svc:
        c = svc.client
        prepare(c, "a")
        commit(c, "l1", "a")
        (m,) = prepare(c, "b", "l1")
        assert m.type == "fuse3.fuse-overlayfs"
