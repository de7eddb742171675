"""The committed generated code in layerfs_snapshotter/api is what the .proto files give, and
the wire names are containerd's."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

from layerfs_snapshotter.api import mount_pb2, snapshots_pb2

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_matches_the_proto_files() -> None:
    with tempfile.TemporaryDirectory() as out:
        env_venv = str(Path(sys.executable).parent.parent)
        subprocess.run(
            [str(REPO / "scripts/gen-snapshotter-api.sh"), out],
            check=True,
            env={"VENV": env_venv, "PATH": "/usr/bin:/bin"},
        )
        api = REPO / "layerfs_snapshotter/api"
        for name in ("mount_pb2.py", "mount_pb2.pyi", "snapshots_pb2.py", "snapshots_pb2.pyi"):
            assert filecmp.cmp(
                api / name, Path(out, "layerfs_snapshotter/api", name), shallow=False
            ), name


def test_wire_names_and_numbers() -> None:
    svc = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert svc.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert [m.name for m in svc.methods] == [
        "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage",
        "Cleanup",
    ]  # fmt: skip
    assert svc.methods_by_name["List"].server_streaming
    mount = mount_pb2.Mount.DESCRIPTOR
    assert mount.full_name == "containerd.types.Mount"
    assert {f.name: f.number for f in mount.fields} == {
        "type": 1, "source": 2, "target": 3, "options": 4,
    }  # fmt: skip
    info = snapshots_pb2.Info.DESCRIPTOR
    assert {f.name: f.number for f in info.fields} == {
        "name": 1, "parent": 2, "kind": 3, "created_at": 4, "updated_at": 5, "labels": 6,
    }  # fmt: skip
