"""A progress line for long passes over a corpus: documents, tokens, tokens/s, share of the input read, ETA.

On a terminal the line is redrawn in place on stderr twice a second; otherwise (a log file, a batch job) it is
logged every 30 s, so a long preparation leaves a readable trace.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

_TTY_EVERY_S = 0.5
_LOG_EVERY_S = 30.0


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def size(n_bytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{int(n_bytes)} B"


class Progress:
    def __init__(self, what: str, total_bytes: int, log: Callable[[str], None] | None, *, done_bytes: int = 0):
        self.what, self.total, self.log = what, max(total_bytes, 1), log
        self.tty = log is print and sys.stderr.isatty()
        self.start_bytes = done_bytes
        self.started = self.shown = time.perf_counter()
        self.documents = self.tokens = 0
        self.bytes = done_bytes

    def update(self, *, documents: int = 0, tokens: int = 0, bytes_done: int | None = None) -> None:
        self.documents += documents
        self.tokens += tokens
        if bytes_done is not None:
            self.bytes = bytes_done
        now = time.perf_counter()
        if self.log is not None and now - self.shown >= (_TTY_EVERY_S if self.tty else _LOG_EVERY_S):
            self.shown = now
            self._show(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.started, 1e-9)
        share = min(self.bytes / self.total, 1.0)
        read = self.bytes - self.start_bytes
        eta = (self.total - self.bytes) * elapsed / read if read > 0 else None
        parts = [f"{self.documents:,} documents"]
        if self.tokens:
            parts.append(f"{self.tokens:,} tokens, {self.tokens / elapsed:,.0f} tokens/s")
        parts.append(f"{share:.0%} of {size(self.total)}")
        parts.append(f"ETA {duration(eta)}" if eta is not None else "ETA ?")
        return f"{self.what}: " + ", ".join(parts)

    def _show(self, now: float) -> None:
        if self.tty:
            sys.stderr.write("\r" + self.line(now) + "\x1b[K")
            sys.stderr.flush()
        else:
            self.log(self.line(now))

    def close(self) -> None:
        """End the redrawn line so that what is logged next starts on its own."""
        if self.tty and self.shown > self.started:
            sys.stderr.write("\n")
            sys.stderr.flush()
