"""strace attached to a running daemon: the calls it makes during one operation, as lines.

Counting one kind of call per operation (the syncs of a copy-up, FICLONE attempts, the
``impure`` mark) shows a cost, or a guarantee, that no file left on disk shows.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .mounts import mount_layerfs


class Strace:
    """``strace -f -e trace=CALLS`` attached to PID; ``stop`` detaches and returns the calls,
    one line per call (the ``resumed`` halves of calls another thread interrupted dropped)."""

    def __init__(self, pid: int, out: Path, calls: str) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            ["strace", "-f", "-qq", "-e", f"trace={calls}", "-o", str(out), "-p", str(pid)],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # strace says nothing when attached (-qq); wait until every thread is traced
        deadline = time.monotonic() + 10
        tasks = set(os.listdir(f"/proc/{pid}/task"))
        while time.monotonic() < deadline and self.proc.poll() is None:
            traced = set()
            for t in tasks:
                try:
                    status = Path(f"/proc/{pid}/task/{t}/status").read_text()
                except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
                    continue
                if f"TracerPid:\t{self.proc.pid}\n" in status:
                    traced.add(t)
            if traced == tasks:
                return
            time.sleep(0.02)
        self.proc.kill()
        self.proc.wait()
        raise AssertionError("strace did not attach")

    def stop(self) -> list[str]:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        lines = self.out.read_text().splitlines()
        return [ln for ln in lines if "resumed>" not in ln and "+++" not in ln]


@contextlib.contextmanager
def traced_layerfs(
    stack: dict[str, Path],
    calls: str,
    *,
    options: Sequence[str] = (),
    listed: str = "",
) -> Iterator[tuple[Path, list[str]]]:
    """A layerfs mount of STACK (``lower``, ``upper``, ``work``, ``merged``) whose daemon's
    CALLS are traced for the block: yields the mount point and the list of lines, filled as
    the block ends. The directory LISTED (the root by default) is listed before, so that the
    lookups it makes are not counted."""
    with mount_layerfs(
        [stack["lower"]], stack["upper"], stack["work"], stack["merged"], options=options
    ) as m:
        assert m.proc is not None
        os.listdir(m.mnt / listed)
        lines: list[str] = []
        tracer = Strace(m.proc.pid, stack["merged"].parent / "strace.out", calls)
        try:
            yield m.mnt, lines
        finally:
            lines += tracer.stop()
