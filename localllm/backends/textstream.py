"""Turning a stream of token bytes into safe text deltas.

Two things must never reach a user: half of a UTF-8 character (a token may end
mid-character) and the beginning of a stop string that later completes. So the
stream holds back exactly the bytes and characters that might still turn into
either, and nothing more.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field


@dataclass
class StopScan:
    """Result of feeding text: what may be shown now, and whether a stop string matched."""

    text: str
    stopped: bool


@dataclass
class TextStream:
    stop: list[str] = field(default_factory=list)
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    _pending: str = ""  # decoded text held back because it may begin a stop string
    _stopped: bool = False
    matched: str | None = None  # the stop string that ended the text, once one has

    def feed(self, piece: bytes) -> StopScan:
        """Add one token's bytes; return the text that is now safe to show."""
        if self._stopped:
            return StopScan("", True)
        self._pending += self._decoder.decode(piece)
        return self._scan(final=False)

    def flush(self) -> str:
        """At the end of generation: everything still held back (never a whole stop string)."""
        if self._stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._scan(final=True).text

    def _scan(self, *, final: bool) -> StopScan:
        text = self._pending
        cut = _first_stop(text, self.stop)
        if cut is not None:
            self._stopped = True
            self.matched = next(s for s in self.stop if text.find(s) == cut)
            self._pending = ""
            return StopScan(text[:cut], True)
        keep = 0 if final else _longest_stop_prefix_suffix(text, self.stop)
        self._pending = text[len(text) - keep :] if keep else ""
        return StopScan(text[: len(text) - keep], False)


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string begins, if any occurs."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _longest_stop_prefix_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the start of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
