"""Round trips against tools nobody here wrote: podman builds and saves, umoci unpacks and
repacks (its repack writes real OCI whiteouts), skopeo inspects, podman pulls and runs.

An image made by podman+umoci, imported into the store and mounted (kernel overlayfs and
layerfs), shows the tree ``umoci unpack`` makes. A container's changes committed by layerfs
are accepted by ``skopeo inspect``, unpacked by umoci with every change present, and seen by
``podman run``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.mounts import layerfs_available, mount_kernel, mount_layerfs

from layerfs.store import cli
from layerfs.store.diff import changes
from layerfs.store.store import Store
from store.ocitools import snapshot

pytestmark = [pytest.mark.external, pytest.mark.kernel_overlay, pytest.mark.slow]

TOOLS = ("podman", "umoci", "skopeo")
BUSYBOX = next((p for p in ("/bin/busybox", "/usr/bin/busybox") if os.path.exists(p)), None)


def _need_tools() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing or BUSYBOX is None:
        pytest.skip(f"needs {', '.join(missing or ['busybox-static'])} (Debian packages)")


def run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
    return r.stdout


@dataclass
class Podman:
    env: dict[str, str]

    def __call__(self, *args: str) -> str:
        return run(["podman", "--cgroup-manager", "cgroupfs", *args], env=self.env)


@dataclass
class Built:
    podman: Podman
    layout: Path
    tmp: Path


def _rootfs(root: Path) -> None:
    assert BUSYBOX is not None
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for applet in ("sh", "cat", "ls", "test", "stat"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc").mkdir()
    (root / "etc/hello").write_text("hello from the base\n")
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "srv/data").mkdir(parents=True)
    for i in range(5):
        (root / "srv/data" / f"f{i}").write_bytes(os.urandom(1000 * (i + 1)))
    (root / "home/user").mkdir(parents=True)
    (root / "home/user/notes").write_text("mine\n")
    os.chown(root / "home/user", 1000, 1000)
    os.chown(root / "home/user/notes", 1000, 1000)
    os.chmod(root / "home/user", 0o700)
    (root / "bin/suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "bin/suid", 0o4755)
    os.link(root / "etc/hello", root / "etc/hello.link")
    os.mkfifo(root / "srv/fifo")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """podman import -> podman save (OCI) -> umoci unpack/modify/repack: a 2-layer image."""
    _need_tools()
    tmp = tmp_path_factory.mktemp("tools")
    conf = tmp / "storage.conf"
    conf.write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{tmp}/graph"\nrunroot = "{tmp}/run"\n'
    )
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf), "HOME": str(tmp)}
    podman = Podman(env)
    rootfs = tmp / "rootfs"
    _rootfs(rootfs)
    tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True)
    r = subprocess.run(
        ["podman", "import", "-", "localhost/lfs-base:1"],
        input=tar.stdout,
        capture_output=True,
        env=env,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    layout = tmp / "oci"
    podman("save", "--format", "oci-dir", "-o", str(layout), "localhost/lfs-base:1")
    # podman names the image localhost/lfs-base:1; give umoci a plain tag too.
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = "base"
    (layout / "index.json").write_text(json.dumps(index))
    bundle = tmp / "bundle"
    run(["umoci", "unpack", "--image", f"{layout}:base", str(bundle)])
    root = bundle / "rootfs"
    (root / "etc/hello").unlink()  # also breaks the hard link: etc/hello.link stays
    shutil.rmtree(root / "srv/data")
    (root / "srv/data").mkdir()
    (root / "srv/data/only").write_text("replaced dir\n")
    (root / "etc/hello2").write_text("second layer\n")
    os.chmod(root / "etc/passwd", 0o600)
    run(["umoci", "repack", "--image", f"{layout}:two", str(bundle)])
    try:
        yield Built(podman, layout, tmp)
    finally:
        # Private vfs storage: removing the images is enough (no mounts, nothing shared).
        # Not "podman system reset": it also clears host-wide state other tests may use.
        subprocess.run(["podman", "rmi", "-a", "-f"], env=env, capture_output=True, timeout=120)


MOUNTERS = {"kernel": mount_kernel, "layerfs": mount_layerfs}


@pytest.fixture(params=sorted(MOUNTERS))
def mounter(request: pytest.FixtureRequest) -> str:
    if request.param == "layerfs":
        if why := layerfs_available():
            pytest.skip(why)
        if not os.path.exists("/dev/fuse"):
            pytest.skip("no /dev/fuse")
    return str(request.param)


def _umoci_tree(layout: Path, tag: str, dest: Path) -> dict[str, tuple[object, ...]]:
    run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(dest)])
    return snapshot(dest / "rootfs")


def test_import_matches_umoci_unpack(built: Built, tmp_path: Path, mounter: str) -> None:
    store = Store(str(tmp_path / "store"))
    assert cli.main(["image", "import", "--store", store.root, f"{built.layout}:two"]) == 0
    rec = store.resolve("two")
    assert len(rec.layers) == 2
    expected = _umoci_tree(built.layout, "two", tmp_path / "bundle")
    assert "srv/data/f0" not in expected and "etc/hello" not in expected  # the whiteouts
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with MOUNTERS[mounter](store.lowers("two"), None, None, mnt):
        assert snapshot(mnt) == expected
    assert cli.main(["image", "verify", "--store", store.root, "two"]) == 0


def _change(merged: Path) -> None:
    (merged / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nnew:x:1:1::/:/bin/sh\n")
    (merged / "etc/hello.link").unlink()
    shutil.rmtree(merged / "srv/data")
    (merged / "srv/data").mkdir()
    (merged / "srv/data/fresh").write_text("fresh\n")
    (merged / "opt").mkdir()
    (merged / "opt/app").write_bytes(os.urandom(70000))
    os.chmod(merged / "opt/app", 0o755)
    os.symlink("app", merged / "opt/app-link")
    (merged / "home/user/notes").write_text("changed\n")
    os.setxattr(merged / "opt/app", "user.origin", b"layerfs-test")
    os.rename(merged / "home/user", merged / "home/renamed")  # a redirect in the upper


def test_commit_accepted_by_skopeo_umoci_podman(built: Built, tmp_path: Path, mounter: str) -> None:
    store = Store(str(tmp_path / "store"))
    store.import_layout(f"{built.layout}:two")
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    with MOUNTERS[mounter](store.lowers("two"), upper, work, mnt):
        _change(mnt)
        expected = snapshot(mnt)

    diff = subprocess.run(
        [
            sys.executable,
            "-m",
            "layerfs.store.cli",
            "diff",
            "--store",
            store.root,
            "--image",
            "two",
            str(upper),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
        check=True,
    )
    lines = set(diff.stdout.splitlines())
    assert {"C /etc/passwd", "D /etc/hello.link", "A /opt/app", "D /srv/data"} <= lines

    out = tmp_path / "out"
    argv = ["commit", "--store", store.root, str(upper), "--image", "two", "--tag", "committed"]
    assert cli.main([*argv, "--into", str(out), "-m", "test commit"]) == 0

    info = json.loads(run(["skopeo", "inspect", f"oci:{out}:committed"]))
    assert len(info["Layers"]) == 3
    assert _umoci_tree(out, "committed", tmp_path / "bundle") == expected

    # The committed image imports back into a new store and mounts to the same tree.
    again = Store(str(tmp_path / "store2"))
    again.import_layout(f"{out}:committed")
    with mount_kernel(again.lowers("committed"), None, None, mnt):
        assert snapshot(mnt) == expected


@pytest.mark.podman
def test_committed_image_runs_under_podman(built: Built, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    store.import_layout(f"{built.layout}:two")
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    for d in (upper, work, mnt):
        d.mkdir()
    with mount_kernel(store.lowers("two"), upper, work, mnt):
        _change(mnt)
    out = tmp_path / "out"
    from layerfs.store.commit import commit

    commit(store, str(upper), "two", ("run",), into=str(out))
    image_id = built.podman("pull", f"oci:{out}:run").split()[-1]
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    # podman's default rlimits exceed what this host may grant; stay within the hard limits.
    limits = [f"--ulimit=nofile={min(nofile, 4096)}", f"--ulimit=nproc={min(nproc, 4096)}"]
    script = (
        "cat /etc/passwd /srv/data/fresh /home/renamed/notes; ls /srv/data /home; "
        "test -e /etc/hello.link || echo link-gone; stat -c %a /opt/app"
    )
    runtime = ["--runtime", "runc"] if shutil.which("runc") else []
    output = built.podman(
        "run", "--rm", "--network", "none", *runtime, *limits, image_id, "/bin/sh", "-c", script
    )
    assert "new:x:1:1" in output
    assert "fresh" in output and "changed" in output
    assert "only" not in output and "f0" not in output
    assert "link-gone" in output
    assert "755" in output
    assert "renamed" in output and "user" not in output.split("fresh", 1)[1]


def test_import_oci_archive(built: Built, tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    built.podman("save", "--format", "oci-archive", "-o", str(archive), "localhost/lfs-base:1")
    store = Store(str(tmp_path / "store"))
    assert cli.main(["image", "import", "--store", store.root, f"oci-archive:{archive}"]) == 0
    assert store.tags_of(store.resolve("localhost/lfs-base:1").manifest_digest)
    assert os.listdir(Path(store.root) / "tmp") == []
    (lower,) = store.lowers("localhost/lfs-base:1")
    assert (Path(lower) / "etc/hello").read_text() == "hello from the base\n"


def test_import_podman_docker_archive(built: Built, tmp_path: Path) -> None:
    """``podman save --format docker-archive`` imports to the image its oci-archive gives:
    same config, diffIDs and tree."""
    docker, oci_tar = tmp_path / "docker.tar", tmp_path / "oci.tar"
    built.podman("save", "--format", "docker-archive", "-o", str(docker), "localhost/lfs-base:1")
    built.podman("save", "--format", "oci-archive", "-o", str(oci_tar), "localhost/lfs-base:1")
    store = Store(str(tmp_path / "store"))
    assert cli.main(["image", "import", "--store", store.root, f"docker-archive:{docker}"]) == 0
    ref = Store(str(tmp_path / "ref"))
    ref.import_layout(f"oci-archive:{oci_tar}")
    got, want = store.resolve("localhost/lfs-base:1"), ref.resolve("localhost/lfs-base:1")
    assert (got.config_digest, got.diff_ids) == (want.config_digest, want.diff_ids)
    assert snapshot(store.lowers("localhost/lfs-base:1")[0]) == snapshot(
        ref.lowers("localhost/lfs-base:1")[0]
    )


# Paths libpod itself leaves out of ``podman diff`` (its own mount points and generated files,
# libpod/diff.go containerMounts): not overlay semantics, so filtered from ours too.
PODMAN_OWN = {
    "/dev", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/etc/mtab", "/proc", "/run",
    "/run/notify", "/run/.containerenv", "/run/secrets", "/sys",
}  # fmt: skip


@pytest.mark.podman
def test_diff_matches_podman_diff(built: Built, tmp_path: Path) -> None:
    """Oracle: for a container podman ran on its own overlay storage, ``layerfs diff`` of the
    container's upper (with its lowers) lists what ``podman diff`` lists."""
    # podman's container cleanup refuses a runroot of more than 50 characters (tmp_path/r is
    # more): podman run then waits 20 s for it (docs/benchmarks.md)
    runroot = tempfile.mkdtemp(prefix="layerfs-test-", dir="/run")
    conf = tmp_path / "storage.conf"
    conf.write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{tmp_path}/g"\nrunroot = "{runroot}"\n'
    )
    podman = Podman({**built.podman.env, "CONTAINERS_STORAGE_CONF": str(conf)})
    try:
        image = podman("pull", f"oci:{built.layout}:two").split()[-1]
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        limits = [f"--ulimit=nofile={min(nofile, 4096)}", f"--ulimit=nproc={min(nproc, 4096)}"]
        script = (
            "echo changed > /etc/passwd; rm /bin/ls; rm -r /srv/data; mkdir /srv/data; "
            "echo n > /srv/data/n; mkdir -p /opt/a/b; echo f > /opt/a/b/f; chmod 700 /bin/suid; "
            "rm /home/user/notes; echo new > /etc/hello2"
        )
        runtime = ["--runtime", "runc"] if shutil.which("runc") else []
        podman(
            "run", "--name", "lfs-diff", "--network", "none", *runtime, *limits, image,
            "/bin/sh", "-c", script,
        )  # fmt: skip
        theirs = set(podman("diff", "lfs-diff").splitlines())
        fmt = "{{.GraphDriver.Data.UpperDir}} {{.GraphDriver.Data.LowerDir}}"
        upper, lowers = podman("inspect", "lfs-diff", "--format", fmt).split()
        ours = {
            str(c)
            for c in changes(upper, lowers.split(":"))
            if os.fsdecode(c.path) not in PODMAN_OWN
        }
        assert ours == theirs
        assert {"C /etc/passwd", "D /bin/ls", "A /opt/a/b/f", "D /home/user/notes"} <= ours
    finally:
        try:
            podman("rm", "-a", "-f")
            podman("rmi", "-a", "-f")
        finally:
            shutil.rmtree(runroot, ignore_errors=True)
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            mnt = line.split()[4]
            if mnt.startswith(str(tmp_path)):
                subprocess.run(["umount", "-l", mnt], check=False)
