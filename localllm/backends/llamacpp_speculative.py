"""Speculative decoding in the batched llama.cpp engine: cheap guesses, checked inside the step's llama_decode.

A decoding sequence normally puts one row into a step: its pending token. With
speculation it puts 1 + k rows: the pending token and k guessed tokens after
it, all with logits. Row i holds the model's view after guess i, so the
engine checks the guesses left to right with the request's own sampler (the
same chain, penalties, grammar and seeded generator as plain decoding): it
draws the token at row 0; if that is guess 1, it draws at row 1, and so on.
The first draw that differs from its guess (or the draw after the last guess)
is kept as well, and the cache cells of the rejected guesses are removed.

Every kept token is exactly what plain decoding would have drawn at that
point: the sampler sees the same history and makes one draw per token, so a
greedy or seeded request gives plain decoding's text (up to llama.cpp's
rounding: a step of several rows adds its sums in another order; on the
starter the tokens came out the same). For sampled requests this is rejection
sampling with a one-hot draft, which keeps the model's distribution; it is
also how llama.cpp's own server checks a draft model's guesses.

The guesses come from prompt lookup or a draft GGUF (llamacpp_guessers.py).
This module decides who guesses how much each step (`Speculation.add_guesses`)
and checks the guesses after the decode (`Speculation.verify`); the engine
runs the rows and keeps the slots' caches (llamacpp_slots.py).

When it pays: on a CPU each extra row costs a share of a step (the output
layer is computed for every row with logits; benchmarks/llamacpp_row_cost.py
and docs/MEASUREMENTS.md), so a long run of guesses pays only when most are kept. Each request therefore sizes its own
guesses (the settings are `SpeculationOptions.llamacpp`): it starts with
`start_tokens`, asks for 2k + 1 after a step that kept all k, and for
2 x kept + 1 after a rejection (copying grows to `most_tokens` guesses a step;
a story that repeats itself now and then settles at one to three). A
request that keeps too few of its guesses stops guessing (the row costs set
where one guess, or three, pay for themselves). Beside other generating
sequences a step is already wide and a row costs nearly its full share, so
there a request guesses only while it keeps nearly everything
(`min_acceptance_beside_others`, after its first checks). Nobody
guesses while more than `max_generating` sequences generate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from localllm.backends.llamacpp_guessers import GuessRequest
from localllm.backends.llamacpp_slots import Slot
from localllm.core.speculation import SpeculationOptions


@dataclass
class SpecRecord:
    """One request's guessing record."""

    k: int  # guesses to ask for next step
    asked: int = 0  # guesses asked for this step (k, or fewer near its token limit)
    enabled: bool = True
    checks: int = 0  # steps in which its guesses were checked
    checked: int = 0  # guesses checked in all
    kept: int = 0  # of those, kept

    def guesses_beside(self, others: int, options: SpeculationOptions) -> bool:
        """Whether to guess in a step where `others` other sequences generate too."""
        if not self.enabled:
            return False
        if others == 0 or self.checks < options.llamacpp.min_steps:
            return True
        return self.kept >= options.llamacpp.min_acceptance_beside_others * self.checked

    def record(self, checked: int, kept: int, options: SpeculationOptions) -> None:
        """After a step: of the guesses the guesser gave, `checked` were checked and `kept` kept."""
        if checked <= 0:
            return
        tuning, most = options.llamacpp, options.llamacpp_most_tokens
        self.checks += 1
        self.checked += checked
        self.kept += kept
        if kept < checked:
            self.k = min(most, 2 * kept + 1)
        elif kept == self.asked:
            self.k = min(most, 2 * self.asked + 1)
        if self.checks >= tuning.min_steps and self.kept < tuning.min_acceptance * self.checked:
            self.enabled = False


@dataclass
class Verdict:
    """What checking one slot's guesses left: the cache holds `verified` tokens; `checked` guesses, `kept` of them."""

    verified: int
    checked: int
    kept: int


class Speculation:
    """The engine's guessing: who guesses how much before a step, and checking the guesses after it."""

    def __init__(self, options: SpeculationOptions, guesser) -> None:
        self.options = options
        self.guesser = guesser  # llamacpp_guessers.py
        self.skip_next = False  # the last step with guesses found the cache full: one step without

    def new_record(self) -> SpecRecord:
        return SpecRecord(min(self.options.llamacpp.start_tokens, self.options.llamacpp_most_tokens))

    def add_guesses(self, single: list[Slot], room: int) -> int:
        """Give generating slots guesses to check this step (`slot.guesses`); the rows they add.

        Only while few sequences generate: each guess costs a row with logits.
        A request's guesses never run past its token limit.
        """
        generating = [s for s in single if s.job.generated]
        if self.skip_next or not generating or len(generating) > self.options.llamacpp.max_generating:
            return 0
        requests, slots = [], []
        for slot in generating:
            job = slot.job
            k = min(job.spec.k, job.limit - job.usage.completion_tokens - 1, room)
            if k <= 0 or not job.spec.guesses_beside(len(generating) - 1, self.options):
                continue
            job.spec.asked = k
            requests.append(GuessRequest(slot.seq_id, job.prompt + job.generated, k, job.request.params, len(job.generated)))
            slots.append(slot)
            room -= k
        if not requests:
            return 0
        added = 0
        for slot, request, guesses in zip(slots, requests, self.guesser.guess(requests)):
            slot.guesses = guesses[: request.k]
            added += len(slot.guesses)
        return added

    def verify(self, slot: Slot, row: int, draw: Callable[[Slot, int], int | None],
               take: Callable[[Slot, int, int], bool]) -> Verdict:
        """Check the slot's guesses against its sampler's draws at rows row, row + 1, ...

        Every drawn token is the request's (`draw` and `take` are the engine's
        plain decoding, so the sampler sees exactly what plain decoding would);
        drawing stops at the first token that is not the next guess, after the
        last guess, or when the request ends. The caller removes the cells
        past `verified`.
        """
        job, guesses = slot.job, slot.guesses
        slot.guesses = []
        verified = len(slot.cached) - len(guesses)  # the pending token and what came before
        kept = checked = 0
        for i in range(len(guesses) + 1):
            token = draw(slot, row + i)
            if token is None:
                break
            is_guess = i < len(guesses) and token == guesses[i]
            if i < len(guesses):
                checked += 1
                kept += is_guess
                job.usage.draft_tokens += 1
                job.usage.accepted_draft_tokens += is_guess
            if not take(slot, token, row + i):
                break
            if not is_guess:
                slot.todo = [token]
                break
        job.spec.record(checked, kept, self.options)
        return Verdict(verified + kept, checked, kept)

    def close(self) -> None:
        self.guesser.close()
