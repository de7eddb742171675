"""The snapshotter: sqlite metadata (metadata.py) plus the directories, in the layout of
containerd's overlayfs snapshotter::

    ROOT/metadata.db
    ROOT/snapshots/<id>/fs      the snapshot's upper (its layer once committed)
    ROOT/snapshots/<id>/work    workdir of an active snapshot
    ROOT/snapshots/new-*        being created (moved to <id> in the creating transaction)
    ROOT/snapshots/rm-*         being removed (moved out of <id> in the removing transaction)

Crash safety: a directory exists before its row commits and disappears only after its row is
gone, so a crash leaves at worst directories without a row. Those are orphans: cleanup()
removes them, and the service runs it at start.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from layerfs_snapshotter import filters
from layerfs_snapshotter.errors import AlreadyExists, FailedPrecondition
from layerfs_snapshotter.metadata import ACTIVE, COMMITTED, VIEW, Info, MetaStore, Tx
from layerfs_snapshotter.mounts import (
    FUSE_TYPE,
    Mount,
    is_extract_key,
    mounts_for,
    root_in_initial_userns,
)

log = logging.getLogger("layerfs-snapshotter")


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


class Snapshotter:
    def __init__(
        self, root: str, *, kernel_extract: bool | None = None, fuse_type: str = FUSE_TYPE
    ) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.snapshots = os.path.join(self.root, "snapshots")
        os.makedirs(self.snapshots, mode=0o700, exist_ok=True)
        self.meta = MetaStore(os.path.join(self.root, "metadata.db"))
        if kernel_extract is None:
            kernel_extract = root_in_initial_userns()
        self.kernel_extract = kernel_extract
        self.fuse_type = fuse_type
        self._removing: set[str] = set()  # rm-* names whose removal is under way
        self._removing_lock = threading.Lock()

    def close(self) -> None:
        self.meta.close()

    # --- paths ---------------------------------------------------------------------------
    def fs_path(self, sid: int) -> str:
        return os.path.join(self.snapshots, str(sid), "fs")

    def work_path(self, sid: int) -> str:
        return os.path.join(self.snapshots, str(sid), "work")

    # --- the API -------------------------------------------------------------------------
    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        return self._create(VIEW, key, parent, labels)

    def mounts(self, key: str) -> list[Mount]:
        with self.meta.transaction() as tx:
            info = tx.get(key)
            if info.kind == COMMITTED:
                raise FailedPrecondition(f"snapshot {key} is committed: not active or view")
            return self._mounts(tx, info)

    def stat(self, key: str) -> Info:
        with self.meta.transaction() as tx:
            return tx.get(key)

    def update(self, key: str, labels: Mapping[str, str], fieldpaths: list[str]) -> Info:
        with self.meta.transaction(write=True) as tx:
            return tx.update(key, labels, fieldpaths)

    def walk(self, flt: Sequence[str]) -> Iterator[Info]:
        parsed = filters.parse_all(flt)
        with self.meta.transaction() as tx:
            infos = tx.all()
        for info in infos:
            adaptor = filters.snapshot_adaptor(info.name, info.parent, info.kind, info.labels)
            if filters.matches(parsed, adaptor):
                yield info

    def usage(self, key: str) -> Usage:
        with self.meta.transaction() as tx:
            info = tx.get(key)
        if info.kind == ACTIVE:
            return disk_usage(self.fs_path(info.id))
        return Usage(info.size, info.inodes)

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> Info:
        with self.meta.transaction() as tx:
            if tx.exists(name):  # checked first, as containerd's storage does
                raise AlreadyExists(f"committed snapshot {name} already exists")
            info = tx.get(key)
        # Measured outside the lock (a walk of the whole layer); the upper of a snapshot
        # being committed is no longer written (containerd unmounted it).
        use = disk_usage(self.fs_path(info.id)) if info.kind == ACTIVE else Usage(0, 0)
        with self.meta.transaction(write=True) as tx:
            return tx.commit(key, name, labels, use.size, use.inodes)

    def remove(self, key: str) -> None:
        with self.meta.transaction(write=True) as tx:
            info = tx.remove(key)
            doomed = self._claim(str(info.id))
        if doomed is not None:  # the row is gone: from here on the directory is an orphan
            self._remove_dir(doomed)

    def cleanup(self) -> None:
        """Remove every directory under snapshots/ that has no row: leftovers of a crash, of a
        failed removal, or of a creation that did not commit."""
        with self.meta.transaction() as tx:
            ids = {str(i) for i in tx.ids()}
            doomed = []
            for name in sorted(os.listdir(self.snapshots)):
                if name in ids:
                    continue
                with self._removing_lock:
                    if name in self._removing:
                        continue
                claimed = self._claim(name)
                if claimed is not None:
                    doomed.append(claimed)
        for path in doomed:
            self._remove_dir(path)

    # --- internals -------------------------------------------------------------------------
    def _create(self, kind: str, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        with self.meta.transaction(write=True) as tx:
            tmp = tempfile.mkdtemp(prefix="new-", dir=self.snapshots)
            try:
                os.chmod(tmp, 0o700)
                fs = os.path.join(tmp, "fs")
                os.mkdir(fs, 0o755)
                os.chmod(fs, 0o755)  # whatever the umask
                if kind == ACTIVE:
                    os.mkdir(os.path.join(tmp, "work"), 0o711)
                info = tx.create(kind, key, parent, labels)
                parents = tx.parent_ids(info)
                if parents and kind == ACTIVE:
                    # The new upper's root belongs to whoever owns the parent's root (images
                    # unpacked for a user namespace), as the overlayfs snapshotter does.
                    st = os.stat(self.fs_path(parents[0]))
                    os.lchown(fs, st.st_uid, st.st_gid)
                final = os.path.join(self.snapshots, str(info.id))
                if os.path.lexists(final):  # an orphan of a creation that never committed
                    shutil.rmtree(final)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            try:
                return self._mounts(tx, info)
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise

    def _mounts(self, tx: Tx, info: Info) -> list[Mount]:
        parents = tx.parent_ids(info)
        active = info.kind == ACTIVE
        return mounts_for(
            kind_active=active,
            fs=self.fs_path(info.id),
            work=self.work_path(info.id),
            parent_fs=[self.fs_path(p) for p in parents],
            labels=info.labels,
            kernel_overlay=self.kernel_extract and active and is_extract_key(info.name),
            fuse_type=self.fuse_type,
        )

    def _claim(self, name: str) -> str | None:
        """Move snapshots/NAME out of the way (an atomic rename to rm-*) and mark it as being
        removed; None if it is already gone."""
        src = os.path.join(self.snapshots, name)
        if name.startswith("rm-"):
            dst = src
        else:
            dst = tempfile.mkdtemp(prefix=f"rm-{name}-", dir=self.snapshots)
            try:
                os.rename(src, dst)  # onto the empty directory just made
            except FileNotFoundError:
                os.rmdir(dst)
                return None
            except OSError:
                if not os.path.isdir(src):  # a stray file: rename cannot replace a dir
                    os.rmdir(dst)
                    dst = src
                else:
                    raise
        with self._removing_lock:
            self._removing.add(os.path.basename(dst))
        return dst

    def _remove_dir(self, path: str) -> None:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError as e:
            log.warning("cannot remove %s: %s (the next cleanup retries)", path, e)
        finally:
            with self._removing_lock:
                self._removing.discard(os.path.basename(path))


def disk_usage(root: str) -> Usage:
    """Size (allocated blocks) and inode count of a tree, hard links once, root included: as
    containerd's fs.DiskUsage counts."""
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [root]
    while stack:
        path = stack.pop()
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            seen.add(key)
            size += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            try:
                with os.scandir(path) as it:
                    stack.extend(e.path for e in it)
            except FileNotFoundError:
                continue
    return Usage(size, len(seen))
