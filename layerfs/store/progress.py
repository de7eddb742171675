"""Progress lines for long imports, commits and verifies, shown only on a terminal.

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """A one-line, self-overwriting byte counter on ``stream`` when it is a terminal.

    Silent otherwise (pipes, tests, logs), so scripted output stays clean.
    """

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = self._stream.isatty() if enabled is None else enabled
        self._label = ""
        self._total = 0
        self._last = 0.0
        self._shown = False

    def start(self, label: str, total: int = 0) -> None:
        self._label, self._total, self._last = label, total, 0.0

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        # Throttled, but the end of a phase is always shown (else a fast phase's line could
        # stop at whatever fraction the last tick happened to show).
        if now - self._last < 0.2 and not (self._total and done >= self._total):
            return
        self._last = now
        text = f"{self._label}: {human_size(done)}"
        if self._total:
            text += f" / {human_size(self._total)} ({min(100, 100 * done // self._total)}%)"
        self._stream.write("\r\x1b[K" + text)
        self._stream.flush()
        self._shown = True

    def finish(self, message: str | None = None) -> None:
        if not self.enabled:
            return
        if self._shown:
            self._stream.write("\r\x1b[K")
        if message:
            self._stream.write(message + "\n")
        self._stream.flush()
        self._shown = False


def human_size(n: int) -> str:
    """``512 B``, ``12.0 KiB``, ``3.4 MiB``: small layers do not show as 0.0 MiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


class LayerLines:
    """One status line per layer, as ``docker pull`` prints them (``1a2b3c4d5e6f: Downloading
    3.1 MiB / 9.8 MiB``). On a terminal the block of lines is redrawn in place; elsewhere each
    change of status (not each byte count) is printed once, so logs stay short. Thread-safe."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None) -> None:
        import threading

        self._stream = stream if stream is not None else sys.stderr
        self.tty = self._stream.isatty() if tty is None else tty
        self._lock = threading.Lock()
        self._lines: dict[str, str] = {}
        self._drawn = 0
        self._last = 0.0

    def status(self, key: str, text: str) -> None:
        """Set the line of ``key`` (a digest) to ``text`` (a status change: always shown)."""
        with self._lock:
            self._lines[key] = text
            if self.tty:
                self._draw()
            else:
                self._stream.write(f"{_short(key)}: {text}\n")
                self._stream.flush()

    def bytes(self, key: str, verb: str, done: int, total: int) -> None:
        """A byte count for ``key``: shown on a terminal (throttled), not in logs."""
        if not self.tty:
            return
        with self._lock:
            self._lines[key] = f"{verb} {human_size(done)} / {human_size(total)}"
            now = time.monotonic()
            if now - self._last >= 0.1 or done >= total:
                self._draw()

    def _draw(self) -> None:
        self._last = time.monotonic()
        out = "\x1b[F" * self._drawn if self._drawn else ""
        for key, text in self._lines.items():
            out += f"\r\x1b[K{_short(key)}: {text}\n"
        self._drawn = len(self._lines)
        self._stream.write(out)
        self._stream.flush()


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]
