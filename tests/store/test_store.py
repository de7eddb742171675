"""The store: digest checks, atomic refusal, platforms, sharing, refcounts, verify, CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from layerfs.errors import LayerfsError
from layerfs.store import cli
from layerfs.store.oci import Platform
from layerfs.store.store import Store
from store.conftest import store_is_empty
from store.ocitools import E, make_tar, sha, write_image, write_platform_index

BASE = [E("etc", "d", mode=0o755), E("etc/os-release", data=b"ID=test\n")]


def _blob(layout: Path, desc: dict[str, object], index: int) -> Path:
    manifest = json.loads((layout / "blobs/sha256" / str(desc["digest"])[7:]).read_bytes())
    return layout / "blobs/sha256" / str(manifest["layers"][index]["digest"])[7:]


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_import_each_compression(store: Store, layout: Path, compression: str) -> None:
    if compression == "zstd":
        pytest.importorskip("zstandard", reason="zstd layers need the zstandard package")
    write_image(layout, [BASE, [E("etc/motd", data=b"hi")]], compression=compression)
    rec = store.import_layout(str(layout))
    assert [Path(p).name for p in store.lowers("latest")] == ["diff", "diff"]
    top, bottom = store.lowers("latest")
    assert top == store.layer_root(rec.layers[1].diff_id)
    assert (Path(top) / "etc/motd").read_bytes() == b"hi"
    assert (Path(bottom) / "etc/os-release").read_bytes() == b"ID=test\n"
    assert store.verify("latest") == {d: [] for d in rec.diff_ids}


def test_tampered_blob_refused(store: Store, layout: Path) -> None:
    desc = write_image(layout, [BASE, [E("x", data=b"y" * 1000)]], compression="none")
    blob = _blob(layout, desc, 1)
    data = bytearray(blob.read_bytes())
    data[600] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(LayerfsError, match="digest mismatch"):
        store.import_layout(str(layout))
    assert store_is_empty(store)


def test_truncated_blob_refused(store: Store, layout: Path) -> None:
    desc = write_image(layout, [BASE, [E("x", data=os.urandom(50000))]])
    blob = _blob(layout, desc, 1)
    blob.write_bytes(blob.read_bytes()[:-100])
    with pytest.raises(LayerfsError):
        store.import_layout(str(layout))
    assert store_is_empty(store)


def test_wrong_diff_id_refused(store: Store, layout: Path) -> None:
    wrong = sha(make_tar([E("other")]))
    write_image(layout, [BASE], diff_ids=[wrong])
    with pytest.raises(LayerfsError, match="diffID"):
        store.import_layout(str(layout))
    assert store_is_empty(store)


def test_wrong_diff_id_for_known_blob_refused(store: Store, tmp_path: Path) -> None:
    good = tmp_path / "good"
    write_image(good, [BASE])
    store.import_layout(str(good))
    bad = tmp_path / "bad"
    write_image(bad, [BASE], diff_ids=[sha(b"not the tar")])
    with pytest.raises(LayerfsError, match="diffID"):
        store.import_layout(str(bad))
    assert len(store.images()) == 1


def test_unknown_media_type_refused(store: Store, layout: Path) -> None:
    write_image(layout, [BASE], layer_media_type="application/x-mystery")
    with pytest.raises(LayerfsError, match="media type"):
        store.import_layout(str(layout))
    assert store_is_empty(store)


def test_multi_platform_index_picks_manifest(store: Store, layout: Path) -> None:
    amd = write_image(layout, [[E("arch", data=b"amd64")]], tag=None, arch="amd64")
    arm = write_image(layout, [[E("arch", data=b"arm64")]], tag=None, arch="arm64")
    armv7 = write_image(layout, [[E("arch", data=b"armv7")]], tag=None, arch="arm")
    write_platform_index(
        layout,
        [
            (amd, {"os": "linux", "architecture": "amd64"}),
            (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
            (armv7, {"os": "linux", "architecture": "arm", "variant": "v7"}),
        ],
        tag="multi",
    )
    for plat, want in (
        ("linux/arm64", b"arm64"),
        ("linux/amd64", b"amd64"),
        ("linux/arm/v7", b"armv7"),
    ):
        rec = store.import_layout(f"{layout}:multi", platform=Platform.parse(plat), tags=(plat,))
        (lower,) = store.lowers(plat)
        assert (Path(lower) / "arch").read_bytes() == want
        assert rec.platform.startswith(plat.split("/")[0])
    with pytest.raises(LayerfsError, match="no manifest for platform"):
        store.import_layout(f"{layout}:multi", platform=Platform.parse("linux/s390x"))


def test_shared_layers_stored_once_and_refcounted(store: Store, tmp_path: Path) -> None:
    base = [*BASE, E("usr", "d"), E("usr/big", data=os.urandom(4 << 20))]
    one, two = tmp_path / "one", tmp_path / "two"
    write_image(one, [base, [E("app1", data=b"1")]], tag="one")
    write_image(two, [base, [E("app2", data=b"2" * 10000)]], tag="two")
    from store.ocitools import disk_usage

    store.import_layout(str(one))
    after_one = disk_usage(store.root)
    store.import_layout(str(two))
    after_two = disk_usage(store.root)
    # The second image adds its small layer, not another copy of the 4 MiB base.
    assert after_two - after_one < (1 << 20)
    assert after_one > (4 << 20)
    users = store.layer_users()
    assert sorted(users.values()) == [1, 1, 2]
    rows = {r["tags"][0]: r for r in _ls_json(store)}
    assert rows["one"]["shared_layers"] == rows["two"]["shared_layers"] == 1
    assert rows["one"]["size"] > (4 << 20) > rows["one"]["unique_size"]
    base_id = store.resolve("one").diff_ids[0]
    assert store.resolve("two").diff_ids[0] == base_id
    assert store.remove("one") != []
    assert store.has_layer(base_id)  # still used by "two"
    assert disk_usage(store.root) > (4 << 20)
    freed = store.remove("two")
    assert base_id in freed
    assert store_is_empty(store)


def test_rm_tag_keeps_image_with_other_tags(store: Store, layout: Path) -> None:
    write_image(layout, [BASE], tag="a")
    store.import_layout(str(layout))
    store.tag("a", "b")
    assert store.remove("a") == []
    assert store.resolve("b")
    store.remove("b")
    assert store_is_empty(store)


def test_verify_reports_damage(store: Store, layout: Path) -> None:
    write_image(layout, [[*BASE, E("etc/passwd", data=b"root:x:0:0\n"), E("etc/gone")]])
    rec = store.import_layout(str(layout))
    root = Path(store.lowers("latest")[0])
    (root / "etc/passwd").write_bytes(b"root:x:0:0\nevil::0:0\n")
    (root / "etc/extra").write_bytes(b"")
    (root / "etc/gone").unlink()
    problems = [str(p) for p in store.verify("latest")[rec.diff_ids[0]]]
    assert "extra /etc/extra" in problems
    assert "missing /etc/gone" in problems
    assert any(p.startswith("changed /etc/passwd") and "digest" in p for p in problems)


def test_reimport_is_idempotent(store: Store, layout: Path) -> None:
    write_image(layout, [BASE])
    first = store.import_layout(str(layout))
    second = store.import_layout(str(layout))
    assert first == second
    assert len(store.images()) == 1


def test_cli_commands(store: Store, layout: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_image(layout, [BASE, [E("app", data=b"1")]], tag="demo:1")
    s = ["--store", store.root]
    assert cli.main(["image", "import", *s, f"{layout}:demo:1"]) == 0
    assert cli.main(["image", "ls", *s]) == 0
    out = capsys.readouterr().out
    assert "demo:1" in out
    assert cli.main(["image", "ls", "--json", *s]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["layers"] == 2 and rows[0]["tags"] == ["demo:1"]
    assert cli.main(["image", "inspect", *s, "demo:1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["rootfs"]["diff_ids"] == [x["diff_id"] for x in info["layers"]]
    assert cli.main(["image", "verify", *s, "demo:1"]) == 0
    assert cli.lowers_for_image("demo:1", store.root) == store.lowers("demo:1")
    assert cli.main(["image", "inspect", *s, "nope"]) == 1
    assert "no image 'nope'" in capsys.readouterr().err
    assert cli.main(["image", "rm", *s, "demo:1"]) == 0
    assert store_is_empty(store)


def test_store_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LAYERFS_STORE", str(tmp_path / "envstore"))
    assert Store().root == str(tmp_path / "envstore")


def test_recorded_upper(
    store: Store, layout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_image(layout, [BASE], tag="base")
    store.import_layout(str(layout))
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc/os-release").write_bytes(b"ID=changed\n")
    cli.record_upper("base", str(upper), store.root)
    s = ["--store", store.root]
    assert cli.main(["diff", *s, str(upper)]) == 0
    assert "C /etc/os-release" in capsys.readouterr().out.splitlines()
    assert cli.main(["commit", *s, str(upper), "--tag", "child"]) == 0
    assert store.resolve("child").diff_ids[0] == store.resolve("base").diff_ids[0]
    # An upper still sits on "base": rm refuses; "child" has none and goes.
    with pytest.raises(LayerfsError, match="in use"):
        store.remove("base")
    assert cli.main(["image", "rm", *s, "base"]) == 1
    store.remove("child")
    shutil.rmtree(upper)  # the container is gone: its record no longer holds the image
    store.remove("base")
    assert store_is_empty(store)


def test_rm_force(store: Store, layout: Path, tmp_path: Path) -> None:
    write_image(layout, [BASE], tag="base")
    store.import_layout(str(layout))
    (tmp_path / "upper").mkdir()
    store.record_upper("base", str(tmp_path / "upper"))
    assert store.remove("base", force=True) != []


def test_docker_media_types_import_and_commit(store: Store, layout: Path, tmp_path: Path) -> None:
    write_image(
        layout,
        [BASE],
        tag="docker",
        layer_media_type="application/vnd.docker.image.rootfs.diff.tar.gzip",
        manifest_media_type="application/vnd.docker.distribution.manifest.v2+json",
        config_media_type="application/vnd.docker.container.image.v1+json",
    )
    store.import_layout(str(layout))
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "new").write_bytes(b"n")
    from layerfs.store.commit import commit

    out = tmp_path / "out"
    rec = commit(store, str(upper), "docker", ("child",), into=str(out))
    # The new manifest is OCI throughout; the base layer keeps its bytes and digest.
    manifest = json.loads((out / "blobs/sha256" / rec.manifest_digest[7:]).read_bytes())
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert {x["mediaType"] for x in manifest["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    }
    assert manifest["layers"][0]["digest"] == store.resolve("docker").layers[0].digest
    again = Store(str(tmp_path / "again"))
    again.import_layout(f"{out}:child")
    assert (Path(again.lowers("child")[0]) / "new").read_bytes() == b"n"


def test_progress_only_on_a_terminal(store: Store, layout: Path) -> None:
    import io

    from layerfs.store.progress import Progress

    write_image(layout, [BASE, [E("big", data=os.urandom(1 << 20))]])
    quiet = io.StringIO()
    store.import_layout(str(layout), progress=Progress(quiet))
    assert quiet.getvalue() == ""  # StringIO is not a terminal
    shown = io.StringIO()
    other = Store(str(Path(store.root).parent / "other"))
    other.import_layout(str(layout), progress=Progress(shown, enabled=True))
    assert "layer 1/2" in shown.getvalue() and "MiB" in shown.getvalue()


def _ls_json(store: Store) -> list[dict[str, Any]]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["image", "ls", "--json", "--store", store.root]) == 0
    rows: list[dict[str, Any]] = json.loads(buf.getvalue())
    return rows


def test_resolve_short_registry_names(store: Store, layout: Path) -> None:
    """An image tagged by a pull (``docker.io/library/alpine:3``) is found by the short names
    docker accepts for it, and by ``NAME@DIGEST``; other names are not."""
    write_image(layout, [[E("a", data=b"a")]], tag="x")
    store.import_layout(str(layout), tags=("docker.io/library/alpine:3",))
    rec = store.resolve("docker.io/library/alpine:3")
    for name in (
        "alpine:3",
        "library/alpine:3",
        "docker.io/alpine:3",
        f"alpine@{rec.manifest_digest}",
    ):
        assert store.resolve(name) == rec, name
    for name in ("alpine", "alpine:4", "quay.io/alpine:3"):
        with pytest.raises(LayerfsError):
            store.resolve(name)
