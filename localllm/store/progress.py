"""Progress of a pull: speed and ETA from recent bytes, and the bar the CLI draws.

The numbers never go backwards: a bar that shrinks (a server that ignored a
resume and restarted the file, say) is worse than a bar that pauses, so the
bar shows the most bytes ever reached, and speed is measured over the last
few seconds only, so a resumed download does not boast the resumed bytes.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, TextIO

from localllm.core.units import human_bytes

NUMBERS_WIDTH = 46  # room kept for " 253.1 MB/4.7 GB  112.4 MB/s  12m05s left"


@dataclass
class PullProgress:
    status: str  # "resolving", "downloading", "verifying", "done" (Ollama-like words)
    file: str | None  # file being transferred
    completed: int  # bytes done across all files of this pull (monotonic)
    total: int  # bytes in all files of this pull
    speed_bps: float | None
    eta_s: float | None


class RateMeter:
    """Bytes per second over a sliding window of (time, bytes done) samples."""

    def __init__(self, window_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self.samples: deque[tuple[float, int]] = deque()

    def update(self, done: int) -> None:
        now = self.clock()
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def restart(self) -> None:
        """Forget history (bytes counted before a pause, or read from disk, are not speed)."""
        self.samples.clear()

    def speed(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        if t1 - t0 < 0.2 or d1 < d0:
            return None
        return (d1 - d0) / (t1 - t0)

    def eta(self, remaining: int) -> float | None:
        speed = self.speed()
        if not speed:
            return None
        return max(0.0, remaining / speed)


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def bar_line(p: PullProgress, width: int = 80) -> str:
    """One line: percent, bar, bytes, speed, time left; the bar takes the width that is left."""
    total = max(p.total, 1)
    frac = min(1.0, p.completed / total)
    numbers = f" {human_bytes(p.completed)}/{human_bytes(p.total)}"
    if p.speed_bps:
        numbers += f"  {human_bytes(p.speed_bps)}/s"
    if p.status == "downloading":
        numbers += f"  {human_duration(p.eta_s)} left" if p.eta_s is not None else ""
    head = f"{int(frac * 100):3d}% "
    room = max(10, min(40, width - len(head) - NUMBERS_WIDTH - 2))  # fixed, so the bar does not jitter
    filled = int(frac * room)
    bar = "█" * filled + " " * (room - filled)
    return f"{head}▕{bar}▏{numbers}"


class ProgressBar:
    """A PullProgress callback that draws on a terminal (or logs plain lines when piped).

    On a terminal the line is redrawn in place at most ten times a second; in a
    log there is one line per status change and per 10% of the bytes.
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None, clock=time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.clock = clock
        self.status: str | None = None
        self.file: str | None = None
        self.best = 0  # most bytes shown so far: the bar never goes back
        self.last_draw = 0.0
        self.last_decile = -1
        self.last_speed: float | None = None  # shown on the finished bar, where no speed is measured
        self.drawn = False

    def __call__(self, p: PullProgress) -> None:
        if p.completed < self.best:
            p = _replace(p, completed=self.best)
        self.best = p.completed
        if p.speed_bps:
            self.last_speed = p.speed_bps
        elif p.status != "downloading" and self.last_speed:
            p = _replace(p, speed_bps=self.last_speed, eta_s=None)
        if p.file != self.file and p.file and p.status == "downloading":
            self._end_line()
            self._print(f"pulling {p.file}")
            self.file = p.file
        if p.status != self.status:
            self._status_changed(p)
            self.status = p.status
            return
        if p.status == "downloading":
            self._draw(p)

    def _status_changed(self, p: PullProgress) -> None:
        if p.status == "downloading":
            self._draw(p, force=True)
        elif p.status == "verifying":
            if self.drawn:
                self._draw(p, force=True)
            self._end_line()
            # before any byte streamed, it is a partial file from an earlier try being re-hashed
            self._print("verifying sha256" if self.status == "downloading" else "verifying the bytes already on disk")
        elif p.status == "done":
            if self.drawn:
                self._draw(p, force=True)
            self._end_line()
        elif p.status == "resolving":
            self._end_line()

    def _draw(self, p: PullProgress, force: bool = False) -> None:
        now = self.clock()
        if self.tty:
            if not force and now - self.last_draw < 0.1:
                return
            width = shutil.get_terminal_size((80, 24)).columns
            self.stream.write("\r" + bar_line(p, width - 1).ljust(width - 1))
            self.stream.flush()
            self.drawn = True
            self.last_draw = now
            return
        decile = int(10 * p.completed / p.total) if p.total else 0
        if force or decile > self.last_decile:
            self.last_decile = decile
            self._print(bar_line(p).rstrip())

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _end_line(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
        self.drawn = False

    def close(self) -> None:
        """End a line left open (after an interruption)."""
        self._end_line()


def _replace(p: PullProgress, **changes) -> PullProgress:
    from dataclasses import replace

    return replace(p, **changes)
