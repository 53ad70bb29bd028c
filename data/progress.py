"""A progress bar with rate and ETA for long builds, on stderr.

On a terminal it redraws one line; in a log (not a tty) it prints a line every `log_every` seconds,
so a batch job's log still shows how far the build is and when it will end.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    def __init__(self, total: int, label: str, unit: str, *, stream: TextIO | None = None, enabled: bool = True,
                 log_every: float = 10.0, clock=time.monotonic):
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.every = 0.2 if self.tty else log_every
        self.clock = clock
        self.start = self.last = clock()
        self.done = 0
        self.notes: dict[str, int] = {}

    def update(self, n: int = 1, **notes: int) -> None:
        """Adds `n` finished units; `notes` are counters shown after the bar (e.g. bad=2)."""
        self.done += n
        for key, value in notes.items():
            self.notes[key] = self.notes.get(key, 0) + value
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self._show()

    def line(self) -> str:
        elapsed = self.clock() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        fraction = self.done / self.total if self.total else 1.0
        width = 24
        bar = "#" * int(width * fraction) + "." * (width - int(width * fraction))
        eta = format_seconds((self.total - self.done) / rate) if rate > 0 else "?"
        notes = "".join(f"  {k} {v}" for k, v in self.notes.items() if v)
        return (f"{self.label} [{bar}] {self.done}/{self.total} {self.unit} {fraction:4.0%}  {rate:.1f} {self.unit}/s"
                f"  elapsed {format_seconds(elapsed)}  ETA {eta}{notes}")

    def close(self) -> None:
        self._show(final=True)

    def _show(self, final: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
