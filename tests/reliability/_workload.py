"""A random workload over one owned part of a merged tree, journaled for a crash checker.

Run as ``python _workload.py ROOT JOURNAL SEED OWNER``: worker OWNER (0 or 1) owns the lower
files ``l/**/fNN`` with ``NN % 2 == OWNER`` and the directory ``n/wOWNER``, and keeps an exact
model of them (content and mode per file, directories). Before each operation it journals
``{"b": [[path, before, after, [states if cut short]], ...]}`` and after it
``{"e": [[path, value], ...]}``, so the checker knows every path's value, or the values an
interrupted operation may leave. Values:
``"ABSENT"``, ``"DIR"``, or ``"<xxh3 of content>:<mode>"``. It stops at the first error (the
daemon was killed) with ``{"x": errno}``; a read that disagrees with the model is ``{"bad": ..}``.

Also imported by the tests for ``value_of`` and ``replay``.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import sys
from collections.abc import Iterator, Mapping

import xxhash

ABSENT = "ABSENT"
DIR = "DIR"
RECORD = 16  # bytes per appended record: b"<rec  12345678>\n"

# What a process sees when the daemon dies under it: ENOTCONN for new requests, ECONNABORTED
# for queued ones, and EIO for a request the kernel was copying into the dying daemon's buffer
# (fuse_dev_do_read: the copy of a big write's pages fails once SIGKILL is pending). A bug in
# the daemon also answers EIO, but logs a traceback: the test checks the daemon's log for that.
CRASH_ERRORS = (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)

# A path's new state in the model: (content, mode) for a file, DIR, or None when gone.
Value = tuple[bytes, int] | str | None


def file_value(content: bytes, mode: int) -> str:
    return f"{xxhash.xxh3_128_hexdigest(content)}:{stat.S_IMODE(mode):o}"


def value_of(path: str) -> str:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ABSENT
    if stat.S_ISDIR(st.st_mode):
        return DIR
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as fh:
            return file_value(fh.read(), st.st_mode)
    return f"other:{st.st_mode:o}"


def owned(rel: str, owner: int) -> bool:
    parts = rel.split("/")
    if parts[0] == "n":
        return len(parts) >= 2 and parts[1] == f"w{owner}"
    name = parts[-1]
    return parts[0] == "l" and name.startswith("f") and int(name[1:]) % 2 == owner


def walk(root: str) -> Iterator[str]:
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for n in sorted(dirs + files):
            yield os.path.relpath(os.path.join(d, n), root)


def replay(lines: list[str]) -> tuple[dict[str, set[str]], list[str]]:
    """The values each journaled path may have now, and the problems the journal reports."""
    allowed: dict[str, set[str]] = {}
    problems: list[str] = []
    for line in lines:
        if not line.endswith("\n"):
            break  # cut short by the end of the worker: the op never began
        rec = json.loads(line)
        for path, before, after, *extra in rec.get("b", []):
            allowed[path] = {before, after, *(extra[0] if extra else [])}
        for path, value in rec.get("e", []):
            allowed[path] = {value}
        if "x" in rec and rec["x"] not in CRASH_ERRORS:
            problems.append(f"unexpected error {errno.errorcode.get(rec['x'])}: {rec}")
        if "bad" in rec:
            problems.append(f"read disagreed with the model: {rec['bad']}")
    return allowed, problems


class Worker:
    def __init__(self, root: str, journal: str, seed: int, owner: int) -> None:
        self.root = root
        self.rnd = random.Random(seed)
        self.owner = owner
        self.jfd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.files: dict[str, tuple[bytes, int]] = {}
        self.dirs: set[str] = set()
        self.seq = 0
        self.op = ""
        for rel in walk(root):
            if not owned(rel, owner):
                continue
            st = os.lstat(self.p(rel))
            if stat.S_ISDIR(st.st_mode):
                self.dirs.add(rel)
            else:
                with open(self.p(rel), "rb") as fh:
                    self.files[rel] = (fh.read(), stat.S_IMODE(st.st_mode))
        self.home = f"n/w{owner}"

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def log(self, rec: dict[str, object]) -> None:
        os.write(self.jfd, (json.dumps(rec) + "\n").encode())

    def val(self, rel: str) -> str:
        if rel in self.dirs:
            return DIR
        if rel in self.files:
            return file_value(*self.files[rel])
        return ABSENT

    def change(self, new: Mapping[str, Value], also: Mapping[str, list[str]] | None = None) -> None:
        """Journal the begin (the caller acts, then commits). ALSO: the states an operation of
        several requests can be left in when it is cut short (a create and its writes)."""
        rows = []
        for rel, v in new.items():
            after = v if isinstance(v, str) else (ABSENT if v is None else file_value(*v))
            rows.append([rel, self.val(rel), after, (also or {}).get(rel, [])])
        self.log({"b": rows})

    def commit(self, new: Mapping[str, Value]) -> None:
        for rel, v in new.items():
            self.files.pop(rel, None)
            self.dirs.discard(rel)
            if v == DIR:
                self.dirs.add(rel)
            elif isinstance(v, tuple):
                self.files[rel] = v
        self.log({"e": [[rel, self.val(rel)] for rel in new]})

    def record(self) -> bytes:
        self.seq += 1
        return b"<rec %8d>\n" % self.seq

    def step(self) -> None:
        rnd = self.rnd
        files = sorted(self.files)
        mine = sorted(f for f in files if f.startswith(self.home + "/"))
        dirs = sorted(d for d in self.dirs if d.startswith(self.home))
        new: dict[str, Value]
        op = self.op = rnd.choices(
            [
                "append",
                "create",
                "rename",
                "unlink",
                "chmod",
                "truncate",
                "mkdir",
                "rmdir",
                "rename_dir",
                "read",
            ],
            [30, 15, 10, 4, 8, 6, 5, 3, 4, 19],
        )[0]
        if op == "append" and files:
            rel = rnd.choice(files)
            data, mode = self.files[rel]
            rec = self.record()
            new = {rel: (data + rec, mode)}
            self.change(new)
            with open(self.p(rel), "ab") as fh:
                fh.write(rec)
                if rnd.random() < 0.3:
                    fh.flush()
                    os.fsync(fh.fileno())
            self.commit(new)
        elif op == "create":
            rel = f"{rnd.choice(dirs)}/c{rnd.randrange(40)}"
            if rel in self.dirs:
                return
            data = rnd.randbytes(rnd.choice([0, 100, 5000, 300_000]))
            # O_CREAT's mode applies only to a new file; O_TRUNC keeps an existing file's mode.
            mode = self.files[rel][1] if rel in self.files else 0o644
            new = {rel: (data, mode)}
            # Cut short, the file may be empty or hold a prefix (FUSE splits big writes).
            prefixes = [file_value(data[:k], mode) for k in range(0, len(data), 4096)]
            self.change(new, {rel: prefixes})
            fd = os.open(self.p(rel), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.commit(new)
        elif op == "rename" and mine:
            src = rnd.choice(mine)
            dst = f"{rnd.choice(dirs)}/c{rnd.randrange(40)}"
            if dst in self.dirs or dst == src:
                return
            new = {src: None, dst: self.files[src]}
            self.change(new)
            os.rename(self.p(src), self.p(dst))
            self.commit(new)
        elif op == "unlink" and files:
            rel = rnd.choice(files)
            new = {rel: None}
            self.change(new)
            os.unlink(self.p(rel))
            self.commit(new)
        elif op == "chmod" and files:
            rel = rnd.choice(files)
            data, _mode = self.files[rel]
            mode = rnd.choice([0o600, 0o644, 0o755, 0o640])
            new = {rel: (data, mode)}
            self.change(new)
            os.chmod(self.p(rel), mode)
            self.commit(new)
        elif op == "truncate" and files:
            rel = rnd.choice(files)
            data, mode = self.files[rel]
            size = rnd.randrange(len(data) + 1)
            new = {rel: (data[:size], mode)}
            self.change(new)
            os.truncate(self.p(rel), size)
            self.commit(new)
        elif op == "mkdir":
            rel = f"{rnd.choice(dirs)}/d{rnd.randrange(6)}"
            if rel in self.dirs or rel in self.files or rel.count("/") > 5:
                return
            new = {rel: DIR}
            self.change(new)
            os.mkdir(self.p(rel))
            self.commit(new)
        elif op == "rename_dir":
            # A whole subtree moves (lower directories too: redirects on the upper).
            movable = [d for d in dirs if d != self.home]
            if not movable:
                return
            src = rnd.choice(movable)
            # Over an empty directory too: one whose lower entries were deleted holds their
            # whiteouts, and replacing it must never show them again (issue 16).
            empty = [
                d
                for d in movable
                if d != src
                and not src.startswith(d + "/")
                and not any(x.startswith(d + "/") for x in [*files, *dirs])
            ]
            if empty and rnd.random() < 0.4:
                dst = rnd.choice(empty)
            else:
                dst = f"{rnd.choice(dirs)}/r{rnd.randrange(20)}"
                if dst in self.dirs or dst in self.files:
                    return
            if dst.startswith(src + "/") or dst == src:
                return
            if dst.count("/") > 6:
                return
            new = {}
            for path in [*sorted(self.dirs), *sorted(self.files)]:
                if path == src or path.startswith(src + "/"):
                    moved = dst + path[len(src) :]
                    new[path] = None
                    new[moved] = DIR if path in self.dirs else self.files[path]
            self.change(new)
            os.rename(self.p(src), self.p(dst))
            self.commit(new)
        elif op == "rmdir":
            empty = [
                d
                for d in dirs
                if d != self.home and not any(x.startswith(d + "/") for x in [*files, *dirs])
            ]
            if not empty:
                return
            rel = rnd.choice(empty)
            new = {rel: None}
            self.change(new)
            os.rmdir(self.p(rel))
            self.commit(new)
        elif op == "read" and files:
            rel = rnd.choice(files)
            got = value_of(self.p(rel))
            if got != self.val(rel):
                self.log({"bad": [rel, self.val(rel), got]})
                raise SystemExit(1)


def main() -> int:
    root, journal, seed, owner = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    try:
        w = Worker(root, journal, seed, owner)
    except OSError as e:
        os.write(2, f"workload init failed: {e}\n".encode())
        return 2
    w.log({"e": [[rel, w.val(rel)] for rel in sorted({*w.files, *w.dirs})]})
    w.log({"start": seed})
    try:
        for _ in range(1_000_000):
            w.step()
    except OSError as e:
        w.log({"x": e.errno, "msg": str(e), "op": w.op})
    return 0


if __name__ == "__main__":
    sys.exit(main())
