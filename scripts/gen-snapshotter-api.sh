#!/usr/bin/env bash
# Regenerate layerfs_snapshotter/api/*_pb2.py{,i} from the .proto files beside them (needs the
# dev extra: grpcio-tools and mypy-protobuf). The generated files are committed;
# tests/snapshotter/test_api.py checks that they match the .proto files.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
venv=${VENV:-$repo/.venv}
out=${1:-.}
"$venv/bin/python" -m grpc_tools.protoc -I . \
    --plugin=protoc-gen-mypy="$venv/bin/protoc-gen-mypy" \
    --python_out="$out" --mypy_out="$out" \
    layerfs_snapshotter/api/mount.proto layerfs_snapshotter/api/snapshots.proto
