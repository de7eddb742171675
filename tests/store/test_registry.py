"""``layerfs image pull`` and ``push`` against a real registry (Debian's docker-registry,
distribution 2.8) filled by skopeo from layouts ``ocitools`` builds, and the pushed images
read back by skopeo and podman."""

from __future__ import annotations

import base64
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.mounts import mount_kernel

from layerfs.store.store import Store
from store.blob_hold import BlobHold, blob_hold
from store.conftest import store_is_empty
from store.ocitools import E, snapshot, write_image, write_platform_index
from store.registry_env import LocalRegistry, auth_file, local_registry, registry_binary
from store.token_server import token_server

pytestmark = [pytest.mark.external]

CLI = [sys.executable, "-m", "layerfs.store.cli"]
BUSYBOX = next((p for p in ("/bin/busybox", "/usr/bin/busybox") if os.path.exists(p)), None)


def _need() -> None:
    missing = [t for t in ("skopeo",) if shutil.which(t) is None]
    if registry_binary() is None:
        missing.append("docker-registry")
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian packages)")


def _base_layer() -> list[E]:
    out = [
        E("bin", "d", mode=0o755),
        E("etc", "d", mode=0o755),
        E("etc/hello", data=b"hello from the registry\n"),
        E("srv", "d", mode=0o750, uid=1000, gid=1000),
        E("srv/data", data=os.urandom(300_000)),
    ]
    if BUSYBOX is not None:
        out.append(E("bin/busybox", data=Path(BUSYBOX).read_bytes(), mode=0o755))
        out += [E(f"bin/{a}", "l", link="busybox") for a in ("sh", "cat", "ls", "test")]
    return out


TOP = [E("etc/hello", data=b"second layer\n"), E("srv/.wh.data"), E("srv/new", data=b"n")]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=180, env=env)


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A registry holding test/base:1 (gzip, 2 layers), test/zstd:1, test/plain:1 (an
    uncompressed layer), test/docker:1 (Docker schema 2) and test/multi:1 (an index of
    linux/amd64 and linux/arm64)."""
    _need()
    tmp = tmp_path_factory.mktemp("registry")
    with local_registry(tmp / "reg") as r:
        src = tmp / "src"
        write_image(src, [_base_layer(), TOP], tag="base")
        r.skopeo_copy(f"oci:{src}:base", "test/base:1")
        r.skopeo_copy(f"oci:{src}:base", "test/docker:1", docker_v2s2=True)
        write_image(tmp / "zstd", [[E("z", data=b"zstd layer")]], tag="z", compression="zstd")
        r.skopeo_copy(f"oci:{tmp / 'zstd'}:z", "test/zstd:1")
        write_image(tmp / "plain", [[E("p", data=b"plain layer")]], tag="p", compression="none")
        r.skopeo_copy(f"oci:{tmp / 'plain'}:p", "test/plain:1")
        multi = tmp / "multi"
        amd = write_image(multi, [[E("arch", data=b"amd64")]], tag=None, arch="amd64")
        arm = write_image(multi, [[E("arch", data=b"arm64")]], tag=None, arch="arm64")
        write_platform_index(
            multi,
            [(amd, {"os": "linux", "architecture": "amd64"}),
             (arm, {"os": "linux", "architecture": "arm64"})],
            "m",
        )  # fmt: skip
        r.skopeo_copy(f"oci:{multi}:m", "test/multi:1", all_images=True)
        yield r


def _no_credentials_env(home: Path) -> dict[str, str]:
    """The environment with none of the auth files the client reads: an empty HOME and no
    $REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR or $DOCKER_CONFIG."""
    home.mkdir()
    unset = ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG")
    return {**{k: v for k, v in os.environ.items() if k not in unset}, "HOME": str(home)}


def _manifest_digest(reg: LocalRegistry, repo_tag: str) -> str:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{reg.host}/{repo_tag}"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    import hashlib

    return "sha256:" + hashlib.sha256(out).hexdigest()


@pytest.mark.kernel_overlay
def test_pull_by_tag_and_digest(reg: LocalRegistry, tmp_path: Path) -> None:
    """A pull gives the manifest the registry holds, tagged and recorded with repository and
    digest, whose layers mount to the tree the same image imported from its layout gives."""
    store = Store(str(tmp_path / "store"))
    ref = f"{reg.host}/test/base:1"
    r = _cli("image", "pull", "--store", store.root, ref)
    assert r.returncode == 0, r.stderr
    digest = _manifest_digest(reg, "test/base:1")
    rec = store.resolve(ref)
    assert rec.manifest_digest == digest == rec.repo_digest
    assert rec.repository == f"{reg.host}/test/base"
    assert r.stderr.count("Pull complete") == 2 and f"Digest: {digest}" in r.stderr
    ls = _cli("image", "ls", "--digests", "--store", store.root)
    assert f"{reg.host}/test/base" in ls.stdout and digest in ls.stdout
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mount_kernel(store.lowers(ref), None, None, mnt):
        tree = snapshot(mnt)
    assert (tree["etc/hello"], "srv/data" in tree) == (tree["etc/hello"], False)
    assert "srv/new" in tree
    # By digest: the same image, no download (every layer is there), no new tag.
    again = _cli("image", "pull", "--store", store.root, f"{reg.host}/test/base@{digest}")
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("Already exists") == 2
    assert len(store.images()) == 1
    bad = "sha256:" + "0" * 64
    r = _cli("image", "pull", "--store", store.root, f"{reg.host}/test/base@{bad}")
    assert r.returncode == 1 and "not found" in r.stderr
    assert store.verify(ref) == {d: [] for d in rec.diff_ids}


def test_pull_media_types(reg: LocalRegistry, tmp_path: Path) -> None:
    """zstd, uncompressed and Docker schema 2 images pull and extract."""
    store = Store(str(tmp_path / "store"))
    for repo, name, data in (
        ("test/zstd:1", "z", b"zstd layer"),
        ("test/plain:1", "p", b"plain layer"),
        ("test/docker:1", "etc/hello", b"second layer\n"),
    ):
        r = _cli("image", "pull", "--store", store.root, f"{reg.host}/{repo}")
        assert r.returncode == 0, r.stderr
        assert (Path(store.lowers(f"{reg.host}/{repo}")[0]) / name).read_bytes() == data
    layer_types = {
        repo: store.resolve(f"{reg.host}/test/{repo}:1").layers[0].media_type
        for repo in ("zstd", "plain", "docker")
    }
    assert layer_types == {
        "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
        "plain": "application/vnd.oci.image.layer.v1.tar",
        "docker": "application/vnd.docker.image.rootfs.diff.tar.gzip",
    }
    docker = store.resolve(f"{reg.host}/test/docker:1")
    assert docker.manifest_media_type == "application/vnd.docker.distribution.manifest.v2+json"


def test_pull_platform_from_index(reg: LocalRegistry, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    ref = f"{reg.host}/test/multi:1"
    r = _cli("image", "pull", "--store", store.root, "--platform", "linux/arm64", ref)
    assert r.returncode == 0, r.stderr
    rec = store.resolve(ref)
    assert rec.platform == "linux/arm64"
    assert rec.repo_digest == _manifest_digest(reg, "test/multi:1") != rec.manifest_digest
    assert (Path(store.lowers(ref)[0]) / "arch").read_bytes() == b"arm64"
    r = _cli("image", "pull", "--store", store.root, "--platform", "linux/s390x", ref)
    assert r.returncode == 1
    assert "no manifest for platform linux/s390x (has: linux/amd64, linux/arm64)" in r.stderr
    r = _cli("image", "pull", "--store", store.root, f"{reg.host}/test/nothing:1")
    assert r.returncode == 1 and "not found" in r.stderr


@pytest.mark.kernel_overlay
@pytest.mark.slow
def test_round_trip_push_to_skopeo_and_podman(reg: LocalRegistry, tmp_path: Path) -> None:
    """pull, mount, change, commit, push (blobs of the base mounted from its repository, the
    new one uploaded in chunks), then skopeo copies the pushed image and podman pulls and
    runs it."""
    store = Store(str(tmp_path / "store"))
    ref = f"{reg.host}/test/base:1"
    assert _cli("image", "pull", "--store", store.root, ref).returncode == 0
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    with mount_kernel(store.lowers(ref), upper, work, mnt):
        (mnt / "etc/pushed").write_bytes(os.urandom(40_000))
        (mnt / "etc/hello").write_text("changed before the push\n")
        expected = snapshot(mnt)
    r = _cli("commit", "--store", store.root, "--image", ref, "--tag", "mine", str(upper))
    assert r.returncode == 0, r.stderr
    dest = f"{reg.host}/pushed/mine:2"
    r = _cli("image", "push", "--store", store.root, "--chunk-size", "16K", "mine", dest)
    assert r.returncode == 0, r.stderr
    rec = store.resolve("mine")
    assert r.stdout.strip() == rec.manifest_digest == _manifest_digest(reg, "pushed/mine:2")
    assert r.stderr.count("Mounted from test/base") == 2, r.stderr
    log = reg.log.read_text(errors="replace")
    assert '"PATCH /v2/pushed/mine/blobs/uploads/' in log
    # Pushed again: every blob is there already.
    r = _cli("image", "push", "--store", store.root, "mine", dest)
    assert r.returncode == 0 and r.stderr.count("Layer already exists") == 4, r.stderr

    out = tmp_path / "copied"
    subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{dest}", f"oci:{out}:x"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    again = Store(str(tmp_path / "store2"))
    again.import_layout(f"{out}:x")
    with mount_kernel(again.lowers("x"), None, None, mnt):
        assert snapshot(mnt) == expected

    if shutil.which("podman") is None or BUSYBOX is None:
        pytest.skip("needs podman and busybox-static for the podman half")
    # podman's container cleanup refuses a runroot of more than 50 characters (tmp_path/r is
    # more): podman run then waits 20 s for it (docs/benchmarks.md)
    runroot = tempfile.mkdtemp(prefix="layerfs-test-", dir="/run")
    conf = tmp_path / "storage.conf"
    conf.write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{tmp_path}/g"\nrunroot = "{runroot}"\n'
    )
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf), "HOME": str(tmp_path)}

    def podman(*args: str) -> str:
        p = subprocess.run(
            ["podman", "--cgroup-manager", "cgroupfs", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=240,
        )
        assert p.returncode == 0, f"podman {args}: {p.stderr}"
        return p.stdout

    try:
        podman("pull", "--tls-verify=false", dest)
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        limits = [f"--ulimit=nofile={min(nofile, 4096)}", f"--ulimit=nproc={min(nproc, 4096)}"]
        runtime = ["--runtime", "runc"] if shutil.which("runc") else []
        output = podman(
            "run", "--rm", "--network", "none", *runtime, *limits, dest,
            "/bin/sh", "-c", "cat /etc/hello; ls /srv /etc",
        )  # fmt: skip
        assert "changed before the push" in output
        assert "pushed" in output and "new" in output and "data" not in output
    finally:
        subprocess.run(["podman", "rmi", "-a", "-f"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(runroot, ignore_errors=True)


def test_auth_basic_from_auth_files(tmp_path: Path) -> None:
    """An htpasswd registry: refused without credentials (the message says so), with wrong
    ones ("refused"), and pulled with credentials from $REGISTRY_AUTH_FILE (podman's) or
    ~/.docker/config.json."""
    _need()
    with local_registry(tmp_path / "reg", auth=True) as r:
        assert r.user is not None and r.password is not None
        write_image(tmp_path / "src", [[E("a", data=b"auth")]], tag="a")
        r.skopeo_copy(f"oci:{tmp_path / 'src'}:a", "secret/img:1")
        home = tmp_path / "home"
        env = _no_credentials_env(home)
        store = Store(str(tmp_path / "store"))
        ref = f"{r.host}/secret/img:1"
        pull = ("image", "pull", "--store", store.root, ref)
        res = _cli(*pull, env=env)
        assert res.returncode == 1 and "credentials needed" in res.stderr, res.stderr
        wrong = auth_file(tmp_path / "wrong.json", r.host, r.user, "nope")
        res = _cli(*pull, env={**env, "REGISTRY_AUTH_FILE": str(wrong)})
        assert res.returncode == 1 and "refused" in res.stderr, res.stderr
        good = auth_file(tmp_path / "auth.json", r.host, r.user, r.password)
        res = _cli(*pull, env={**env, "REGISTRY_AUTH_FILE": str(good)})
        assert res.returncode == 0, res.stderr
        (home / ".docker").mkdir()
        token = base64.b64encode(f"{r.user}:{r.password}".encode()).decode()
        (home / ".docker/config.json").write_text(
            json.dumps({"auths": {f"http://{r.host}": {"auth": token}}})
        )
        store2 = Store(str(tmp_path / "store2"))
        res = _cli("image", "pull", "--store", store2.root, ref, env=env)
        assert res.returncode == 0, res.stderr
        res = _cli("image", "push", "--store", store2.root, ref, f"{r.host}/secret/copy:1", env=env)
        assert res.returncode == 0, res.stderr


def _big_image(tmp: Path, name: str, shared: bytes, own: bytes) -> Path:
    layout = tmp / name
    write_image(
        layout, [[E("shared", data=shared)], [E("own", data=own)]], tag=name, compression="none"
    )
    return layout


def test_concurrent_pulls_fetch_shared_layer_once(reg: LocalRegistry, tmp_path: Path) -> None:
    """Two pulls at once of images that share a layer: the registry serves that blob once."""
    shared = os.urandom(8 << 20)
    for name in ("c1", "c2"):
        layout = _big_image(tmp_path, name, shared, name.encode() * 1000)
        reg.skopeo_copy(f"oci:{layout}:{name}", f"conc/{name}:1")
    store = Store(str(tmp_path / "store"))
    shared_digest = _layer_digests(tmp_path / "c1")[0]
    procs = [
        subprocess.Popen(
            [*CLI, "image", "pull", "--store", store.root, f"{reg.host}/conc/{n}:1"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in ("c1", "c2")
    ]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    assert reg.blob_gets(shared_digest) == 1
    assert len(store.images()) == 2 and len(store.layer_users()) == 3
    # The downloads were ingested and deleted (only their lock files stay).
    assert all(f.endswith(".lock") for f in os.listdir(Path(store.root) / "downloads"))


HOLD_TIMEOUT = 60.0  # the most a held blob waits: a broken pull cannot hang the suite


def _layer_digests(layout: Path) -> list[str]:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(
        (layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text()
    )
    return [x["digest"] for x in manifest["layers"]]


def _signal_while_held(p: subprocess.Popen[str], hold: BlobHold, sig: int) -> str:
    """Send ``sig`` to pull ``p`` while the registry holds its second layer mid-body; return
    the pull's stderr once it has exited, the registry still holding. The hold, not a
    progress line read in time, makes sure the pull is downloading when the signal comes: a
    pull that finished first (session 11's gate, exit 0) cannot happen however loaded the
    machine is. And a pull must stop though its registry sends nothing more."""
    try:
        if not hold.holding.wait(HOLD_TIMEOUT):
            p.kill()
            raise AssertionError(f"the pull never reached the held blob: {p.communicate()[1]}")
        p.send_signal(sig)
        try:
            # Well under HOLD_TIMEOUT: a pull that waits for the blob's next bytes fails here.
            return p.communicate(timeout=HOLD_TIMEOUT / 2)[1]
        except subprocess.TimeoutExpired:
            p.kill()
            raise AssertionError(
                f"the pull did not stop while the registry held a blob: {p.communicate()[1]}"
            ) from None
    finally:
        hold.release()


def test_interrupted_pull_resumes_from_verified_layers(reg: LocalRegistry, tmp_path: Path) -> None:
    """A pull killed (SIGKILL) after its first layer arrived, while the second one streams,
    leaves the store as it was; the next pull fetches only what was missing."""
    layout = _big_image(tmp_path, "kill", os.urandom(1 << 20), os.urandom(2 << 20))
    reg.skopeo_copy(f"oci:{layout}:kill", "kill/img:1")
    d1, d2 = _layer_digests(layout)
    store = Store(str(tmp_path / "store"))
    with blob_hold(reg.host, d2, timeout=HOLD_TIMEOUT) as hold:
        ref = f"{hold.host}/kill/img:1"
        # One download at a time, the small layer first: killed while the second streams.
        p = subprocess.Popen(
            [*CLI, "image", "pull", "--jobs", "1", "--store", store.root, ref],
            stderr=subprocess.PIPE,
            text=True,
        )
        err = _signal_while_held(p, hold, signal.SIGKILL)
        assert p.returncode == -signal.SIGKILL, err
        assert f"{d1[7:19]}: Download complete" in err
        assert store.images() == [] and store.tags() == {}
        assert not (Path(store.root) / "layers").exists() or not any(
            (Path(store.root) / "layers").iterdir()
        )
        r = _cli("image", "pull", "--store", store.root, ref)
    assert r.returncode == 0, r.stderr
    assert reg.blob_gets(d1) == 1  # verified before the kill, not fetched again
    assert reg.blob_gets(d2) >= 1
    assert store.verify(ref) == {d: [] for d in store.resolve(ref).diff_ids}


def test_ctrl_c_stops_a_pull_cleanly(reg: LocalRegistry, tmp_path: Path) -> None:
    """SIGINT while a layer downloads: the pull ends with one line, "layerfs: interrupted"
    (exit 130, no traceback), the store holds no image, layer or tag, and the next pull
    completes."""
    layout = _big_image(tmp_path, "int", os.urandom(1 << 20), os.urandom(2 << 20))
    reg.skopeo_copy(f"oci:{layout}:int", "int/img:1")
    store = Store(str(tmp_path / "store"))
    with blob_hold(reg.host, _layer_digests(layout)[1], timeout=HOLD_TIMEOUT) as hold:
        ref = f"{hold.host}/int/img:1"
        # (SIGINT reaches it as in a terminal however the run was started: tests/conftest.py)
        p = subprocess.Popen(
            [*CLI, "image", "pull", "--jobs", "1", "--store", store.root, ref],
            stderr=subprocess.PIPE,
            text=True,
        )
        err = _signal_while_held(p, hold, signal.SIGINT)
        assert p.returncode == 130, err
        messages = [line for line in err.splitlines() if line.startswith("layerfs:")]
        assert messages == ["layerfs: interrupted"] and "Traceback" not in err, err
        assert err.splitlines()[-1] == "layerfs: interrupted", err
        assert store_is_empty(store)
        r = _cli("image", "pull", "--store", store.root, ref)
    assert r.returncode == 0, r.stderr
    assert store.verify(ref) == {d: [] for d in store.resolve(ref).diff_ids}


FAILURE_BOUND = 20.0  # well under the client's read timeout (60 s) and HOLD_TIMEOUT


def test_failed_layer_stops_a_download_the_registry_holds(
    reg: LocalRegistry, tmp_path: Path
) -> None:
    """One layer fails (its blob in the registry tampered: a digest mismatch) while another
    one's download waits on a registry that sends nothing (the proxy holds it mid-body, and
    lets the failing blob's request through only then): the pull ends with the failure's
    error at once, not when the held download's read times out, and the store is as it was.
    """
    layout = _big_image(tmp_path, "fail", os.urandom(2 << 20), os.urandom(300_000))
    reg.skopeo_copy(f"oci:{layout}:fail", "fail/img:1")
    held, bad = _layer_digests(layout)
    data = next((reg.root / "storage").rglob(f"blobs/sha256/{bad[7:9]}/{bad[7:]}/data"))
    data.write_bytes(os.urandom(data.stat().st_size))  # same size, wrong digest
    store = Store(str(tmp_path / "store"))
    with blob_hold(reg.host, held, timeout=HOLD_TIMEOUT, then=bad) as hold:
        p = subprocess.Popen(
            [
                *CLI,
                "image",
                "pull",
                "--jobs",
                "2",
                "--store",
                store.root,
                f"{hold.host}/fail/img:1",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            if not hold.holding.wait(HOLD_TIMEOUT):
                p.kill()
                raise AssertionError(f"the pull never reached the held blob: {p.communicate()[1]}")
            held_at = time.monotonic()
            try:
                # The failing blob is a few hundred KiB away once the hold is on.
                err = p.communicate(timeout=FAILURE_BOUND)[1]
                print(f"the pull ended {time.monotonic() - held_at:.2f} s into the hold")
            except subprocess.TimeoutExpired:
                p.kill()
                raise AssertionError(
                    f"the pull waited on the held download after a layer failed: "
                    f"{p.communicate()[1]}"
                ) from None
            assert not hold.released.is_set()  # the registry still held it when the pull ended
        finally:
            hold.release()
    assert p.returncode == 1, err
    assert err.splitlines()[-1] == f"layerfs: blob {bad} from {hold.host}: digest mismatch", err
    assert store_is_empty(store)


def test_image_rm_during_a_pull_of_a_layer_it_frees(reg: LocalRegistry, tmp_path: Path) -> None:
    """A pull decides which layers it need not fetch ("Already exists") before it takes the
    store's lock; an ``image rm`` meanwhile (while the proxy holds the pull's own layer) that
    frees one of them (the only other image naming it) must not fail the pull: it fetches
    the layer under the lock's second look. Before (found by review14): the ingest opened a
    download that was never made, and the pull failed."""
    shared = os.urandom(1 << 20)
    for name in ("r1", "r2"):
        layout = _big_image(tmp_path, name, shared, name.encode() * 100_000)
        reg.skopeo_copy(f"oci:{layout}:{name}", f"rmrace/{name}:1")
    store = Store(str(tmp_path / "store"))
    r1 = f"{reg.host}/rmrace/r1:1"
    r = _cli("image", "pull", "--store", store.root, r1)
    assert r.returncode == 0, r.stderr
    shared_digest, own = _layer_digests(tmp_path / "r2")
    with blob_hold(reg.host, own, timeout=HOLD_TIMEOUT) as hold:
        ref = f"{hold.host}/rmrace/r2:1"
        p = subprocess.Popen(
            [*CLI, "image", "pull", "--jobs", "1", "--store", store.root, ref],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            if not hold.holding.wait(HOLD_TIMEOUT):
                p.kill()
                raise AssertionError(f"the pull never reached the held blob: {p.communicate()[1]}")
            rm = _cli("image", "rm", "--store", store.root, r1)
            assert rm.returncode == 0, rm.stderr
            assert store.layer_users() == {}, "r1's layers were not freed"
        finally:
            hold.release()
        err = p.communicate(timeout=HOLD_TIMEOUT)[1]
    assert p.returncode == 0, err
    assert f"{shared_digest[7:19]}: Already exists" in err
    assert store.verify(ref) == {d: [] for d in store.resolve(ref).diff_ids}
    assert reg.blob_gets(shared_digest) == 2  # r1's pull, then this one's second look


def test_pull_waits_for_a_registry_that_comes_back(tmp_path: Path) -> None:
    """Refused connections are retried with back-off: a pull started while the registry is
    down succeeds once it is back (same port and storage) a moment later."""
    _need()
    layout = _big_image(tmp_path, "back", os.urandom(1 << 20), b"own")
    with local_registry(tmp_path / "reg") as r:
        r.skopeo_copy(f"oci:{layout}:back", "back/img:1")
        host = r.host
    store = Store(str(tmp_path / "store"))
    p = subprocess.Popen(
        [*CLI, "image", "pull", "--store", store.root, f"{host}/back/img:1"],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    assert p.poll() is None  # still trying
    with local_registry(tmp_path / "reg", port=int(host.rsplit(":", 1)[1])):
        _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert store.verify(f"{host}/back/img:1") == {
        d: [] for d in store.resolve(f"{host}/back/img:1").diff_ids
    }


def test_bearer_token_auth(tmp_path: Path) -> None:
    """A registry behind a token server (distribution's ``auth: token``, as Docker Hub runs
    it): the pull answers the Bearer challenge with a token fetched with the auth file's
    credentials for the repository's pull scope; a push asks for pull,push; without
    credentials the registry refuses."""
    _need()
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    with (
        token_server(tmp_path / "tok", "layerfs-tok", "tok-secret") as tok,
        local_registry(tmp_path / "reg", token=tok) as r,
    ):
        write_image(tmp_path / "src", [[E("t", data=b"token")]], tag="t")
        r.skopeo_copy(f"oci:{tmp_path / 'src'}:t", "tok/img:1")
        env = _no_credentials_env(tmp_path / "home")
        store = Store(str(tmp_path / "store"))
        ref = f"{r.host}/tok/img:1"
        res = _cli("image", "pull", "--store", store.root, ref, env=env)
        assert res.returncode == 1 and "credentials needed" in res.stderr, res.stderr
        good = auth_file(tmp_path / "auth.json", r.host, tok.user, tok.password)
        env["REGISTRY_AUTH_FILE"] = str(good)
        tok.requests.clear()
        res = _cli("image", "pull", "--store", store.root, ref, env=env)
        assert res.returncode == 0, res.stderr
        assert (Path(store.lowers(ref)[0]) / "t").read_bytes() == b"token"
        assert tok.requests and all(q["authed"] for q in tok.requests)
        scopes = [s for q in tok.requests for s in q["scope"]]
        assert "repository:tok/img:pull" in scopes
        tok.requests.clear()
        res = _cli("image", "push", "--store", store.root, ref, f"{r.host}/tok/copy:1", env=env)
        assert res.returncode == 0, res.stderr
        scopes = [s for q in tok.requests for s in q["scope"]]
        assert "repository:tok/copy:pull,push" in scopes
