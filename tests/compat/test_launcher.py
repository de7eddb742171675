"""The ``mount.layerfs`` launcher (mount_helper.launcher, written by scripts/setup.sh) and the
records the first mount's caller builds instead of dataclasses (layerfs.records).

What these hold: the launcher starts Python without ``site`` and without pip's wrapper (no
``re``), whether its interpreter fits on a ``#!`` line or needs ``/bin/sh`` to exec it; a
MountConfig behaves as the frozen dataclass it replaced (equality, hash, replace, refused
assignment, pickle and copy, the fork server's marshal round trip).
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs import forkserver
from layerfs.config import IdMapping, MountConfig
from mount_helper import launcher


@pytest.mark.parametrize("where", ["plain", "with space"])
def test_the_launcher_starts_python_without_site(tmp_path: Path, where: str) -> None:
    python = sys.executable
    if where != "plain":  # no "#!" line can name it: /bin/sh execs it
        (tmp_path / "a dir").mkdir()
        python = str(tmp_path / "a dir" / "python")
        os.symlink(sys.executable, python)
    prog = tmp_path / "mount.layerfs"
    launcher.write(str(prog), python, launcher.site_paths(sys.executable))
    assert prog.read_text().startswith("#!/bin/sh\n" if where != "plain" else f"#!{python} -SP")
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    env.pop("PYTHONPATH", None)  # the launcher's own paths find layerfs and mount_helper
    r = subprocess.run(
        [str(prog), "--version"], capture_output=True, text=True, env=env, cwd="/", check=False
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("mount.layerfs: version ")
    lines = r.stderr.splitlines()
    imported = {x.rpartition("|")[2].strip() for x in lines if x.startswith("import time:")}
    assert "mount_helper.main" in imported
    assert not imported & {"site", "re", "dataclasses"}


def _config() -> MountConfig:
    return MountConfig(
        lowers=("/l1", "/l2"),
        mountpoint="/m",
        upper="/u",
        workdir="/w",
        uid_mappings=(IdMapping(0, 1000, 1), IdMapping(1, 100000, 65536)),
        extra_fuse_options=("noatime",),
        warnings=("a warning",),
    )


def test_a_mount_config_is_a_frozen_value() -> None:
    c = _config()
    assert c == _config() and hash(c) == hash(_config())
    assert c != c.replace(upper="/u2") and c.replace(upper="/u2").upper == "/u2"
    assert c.replace(upper="/u2").lowers == c.lowers
    assert IdMapping(1, 2, 3) != (1, 2, 3)
    with pytest.raises(AttributeError):
        c.upper = "/x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.replace(nonsense=1)
    assert "lowers=('/l1', '/l2')" in repr(c) and repr(IdMapping(1, 2, 3)).startswith("IdMapping(")
    for clone in (pickle.loads(pickle.dumps(c)), copy.copy(c), copy.deepcopy(c)):
        assert clone == c
        assert clone.fields() == c.fields()


def test_a_mount_config_survives_the_fork_server_request() -> None:
    c = _config()
    decoded, env, umask = forkserver._decode(forkserver._encode(c, {b"K": b"V"}, 0o027))
    assert (decoded, env, umask) == (c, {b"K": b"V"}, 0o027)
