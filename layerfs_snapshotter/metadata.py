"""Snapshot metadata in sqlite: one row per snapshot, the rules of containerd's storage package.

Every change is one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, WAL, synchronous=FULL), so a
crash leaves the database either before or after it. Directories are not in the database: the
snapshotter names them by row id and removes those without a row (Snapshotter.cleanup).

A parent is referenced by row id, so committing a snapshot (a new key, the same id) keeps its
children's links. Rules and error kinds follow containerd's snapshots/storage (bolt.go).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from layerfs_snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

ACTIVE, VIEW, COMMITTED = "active", "view", "committed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent_id INTEGER REFERENCES snapshots(id),
    kind TEXT NOT NULL CHECK (kind IN ('active', 'view', 'committed')),
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""


@dataclass(frozen=True)
class Info:
    id: int
    name: str
    parent: str
    kind: str
    created_ns: int
    updated_ns: int
    labels: dict[str, str] = field(default_factory=dict)
    size: int = 0
    inodes: int = 0


class MetaStore:
    """The database. Thread-safe: one connection, one transaction at a time."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[Tx]:
        """A transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield Tx(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")


_COLUMNS = (
    "s.id, s.key, COALESCE(p.key, ''), s.kind, s.created_ns, s.updated_ns, s.labels, "
    "s.size, s.inodes"
)
_FROM = "snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"


def _labels(labels: Mapping[str, str]) -> str:
    """As stored: a label set to "" is no label (containerd's boltutil.WriteLabels)."""
    return json.dumps({k: v for k, v in sorted(labels.items()) if v})


def _info(row: tuple[int, str, str, str, int, int, str, int, int]) -> Info:
    labels = json.loads(row[6])
    return Info(row[0], row[1], row[2], row[3], row[4], row[5], labels, row[7], row[8])


class Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def get(self, key: str) -> Info:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM {_FROM} WHERE s.key = ?", (key,)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {key} does not exist")
        return _info(row)

    def all(self) -> list[Info]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM {_FROM} ORDER BY s.id").fetchall()
        return [_info(r) for r in rows]

    def ids(self) -> set[int]:
        return {r[0] for r in self._db.execute("SELECT id FROM snapshots")}

    def parent_ids(self, info: Info) -> list[int]:
        """The ids of INFO's ancestors, nearest first."""
        out: list[int] = []
        row = self._db.execute(
            "SELECT parent_id FROM snapshots WHERE id = ?", (info.id,)
        ).fetchone()
        pid = row[0] if row else None
        while pid is not None:
            out.append(pid)
            row = self._db.execute(
                "SELECT parent_id FROM snapshots WHERE id = ?", (pid,)
            ).fetchone()
            pid = row[0] if row else None
        return out

    def create(self, kind: str, key: str, parent: str, labels: Mapping[str, str]) -> Info:
        if kind not in (ACTIVE, VIEW):
            raise InvalidArgument(f"snapshot type {kind} invalid: only active or view")
        parent_id = None
        if parent:
            try:
                p = self.get(parent)
            except NotFound:
                raise NotFound(f"missing parent {parent!r}") from None
            if p.kind != COMMITTED:
                raise InvalidArgument(f"parent {parent!r} is not a committed snapshot")
            parent_id = p.id
        if self.exists(key):
            raise AlreadyExists(f"snapshot {key} already exists")
        now = time.time_ns()
        self._db.execute(
            "INSERT INTO snapshots (key, parent_id, kind, created_ns, updated_ns, labels) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (key, parent_id, kind, now, now, _labels(labels)),
        )
        return self.get(key)

    def commit(
        self, key: str, name: str, labels: Mapping[str, str], size: int, inodes: int
    ) -> Info:
        if self.exists(name):
            raise AlreadyExists(f"committed snapshot {name} already exists")
        info = self.get(key)
        if info.kind != ACTIVE:
            raise FailedPrecondition(f"snapshot {key} is not active")
        now = time.time_ns()
        self._db.execute(
            "UPDATE snapshots SET key = ?, kind = ?, created_ns = ?, updated_ns = ?, labels = ?, "
            "size = ?, inodes = ? WHERE id = ?",
            (name, COMMITTED, now, now, _labels(labels), size, inodes, info.id),
        )
        return self.get(name)

    def remove(self, key: str) -> Info:
        info = self.get(key)
        child = self._db.execute(
            "SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (info.id,)
        ).fetchone()
        if child is not None:
            raise FailedPrecondition(f"cannot remove snapshot {key} with child")
        self._db.execute("DELETE FROM snapshots WHERE id = ?", (info.id,))
        return info

    def update(self, key: str, labels: Mapping[str, str], fieldpaths: list[str]) -> Info:
        """Update labels as containerd does: no paths replaces them all; "labels" too;
        "labels.K" sets one (absent from LABELS: removes it); any other path is invalid."""
        info = self.get(key)
        new = dict(info.labels)
        if not fieldpaths:
            new = dict(labels)
        for path in fieldpaths:
            if path.startswith("labels."):
                k = path.removeprefix("labels.")
                new[k] = labels.get(k, "")
            elif path == "labels":
                new = dict(labels)
            else:
                raise InvalidArgument(f"cannot update {path!r} field on snapshot {key!r}")
        self._db.execute(
            "UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
            (_labels(new), time.time_ns(), info.id),
        )
        return self.get(key)

    def exists(self, key: str) -> bool:
        return (
            self._db.execute("SELECT 1 FROM snapshots WHERE key = ?", (key,)).fetchone() is not None
        )
