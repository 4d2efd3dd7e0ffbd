"""What a reasoning splitter hands on: text that is safe to show now, by kind (reasoning.py, harmony.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Split:
    """Text that is safe to show now, by kind."""

    reasoning: str = ""
    answer: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.answer)
