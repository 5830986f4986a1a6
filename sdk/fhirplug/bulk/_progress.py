"""Progress on stderr: a tqdm bar on a terminal (when tqdm is installed), else a plain line every few seconds."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]

_EVERY_S = 10.0


class Progress:
    """Lines done out of ``total``, with notes/s and the time left."""

    def __init__(self, total: int, done: int = 0, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.done = done
        self._resumed_at = done
        self.notes = 0
        self.enabled = enabled
        self.started = time.monotonic()
        self._last = self.started
        self._bar: Any = None
        if enabled and self.stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # the runtime does not need tqdm; the plain line does the job
                pass
            else:
                self._bar = tqdm(total=total, initial=done, unit="line", file=self.stream, dynamic_ncols=True)

    def update(self, lines: int, notes: int) -> None:
        self.done += lines
        self.notes += notes
        rate = self.notes / max(time.monotonic() - self.started, 1e-9)
        if self._bar is not None:
            self._bar.set_postfix_str(f"{rate:,.1f} notes/s", refresh=False)
            self._bar.update(lines)
            return
        now = time.monotonic()
        if self.enabled and now - self._last >= _EVERY_S:
            self._last = now
            line_rate = (self.done - self._resumed_at) / max(now - self.started, 1e-9)
            left = (self.total - self.done) / line_rate if line_rate > 0 else 0.0
            print(
                f"score: {self.done:,}/{self.total:,} lines, {self.notes:,} notes, {rate:,.1f} notes/s, "
                f"about {left:,.0f} s left",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
