"""What Mounts returns for a snapshot: the mount containerd (or a client) performs.

* no parent: a bind of the snapshot's ``fs`` (read-only for a view);
* a view of one parent: a read-only bind of the parent's ``fs``;
* otherwise ``fuse3.mount.layerfs`` (containerd runs ``mount.fuse3 overlay TARGET -o ...
  -t mount.layerfs``, which runs ``mount.layerfs``): ``lowerdir`` nearest parent first, and
  for an active snapshot ``upperdir``/``workdir``; the uid/gid mapping labels become
  ``uidmapping``/``gidmapping``;
* an active ``extract-*`` snapshot (containerd unpacking a layer) with parents, when this
  process is root in the initial user namespace: a kernel ``overlay`` mount, as containerd's
  overlayfs snapshotter returns. containerd's applier then writes the layer straight into the
  upperdir in the kernel's format (0/0 whiteouts, ``trusted.overlay.opaque``), which is
  layerfs's on-disk format too, instead of a FUSE round trip per file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

FUSE_TYPE = "fuse3.mount.layerfs"
UIDMAP_LABEL = "containerd.io/snapshot/uidmapping"
GIDMAP_LABEL = "containerd.io/snapshot/gidmapping"


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


def is_extract_key(key: str) -> bool:
    """containerd names unpack snapshots ``<namespace>/<n>/extract-<...>``."""
    return key.rsplit("/", 1)[-1].startswith("extract-") or key.startswith("extract-")


def mounts_for(
    *,
    kind_active: bool,
    fs: str,
    work: str,
    parent_fs: Sequence[str],
    labels: Mapping[str, str],
    kernel_overlay: bool,
    fuse_type: str = FUSE_TYPE,
) -> list[Mount]:
    """The mounts of one snapshot; PARENT_FS nearest first. KERNEL_OVERLAY asks for the kernel
    overlay mount (the caller decides when: extract snapshots, root); FUSE_TYPE names another
    program with the same options (fuse3.fuse-overlayfs, for comparisons)."""
    if not parent_fs:
        return [Mount("bind", fs, ("rw" if kind_active else "ro", "rbind"))]
    if not kind_active and len(parent_fs) == 1:
        return [Mount("bind", parent_fs[0], ("ro", "rbind"))]
    options: list[str] = []
    if kind_active:
        options += [f"upperdir={fs}", f"workdir={work}"]
    options.append("lowerdir=" + ":".join(parent_fs))
    if kernel_overlay and kind_active:
        if _kernel_has_index_param():
            options.insert(0, "index=off")  # as containerd's overlayfs snapshotter mounts
        return [Mount("overlay", "overlay", tuple(options))]
    for label, name in ((UIDMAP_LABEL, "uidmapping"), (GIDMAP_LABEL, "gidmapping")):
        if labels.get(label):
            # containerd separates ranges with ",", which would split the -o list
            options.append(f"{name}=" + labels[label].replace(",", ":"))
    return [Mount(fuse_type, "overlay", tuple(options))]


def _kernel_has_index_param() -> bool:
    return os.path.exists("/sys/module/overlay/parameters/index")


def root_in_initial_userns() -> bool:
    """Root whose user namespace is the initial one (uid_map maps all 2^32-1 ids at 0)."""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False
