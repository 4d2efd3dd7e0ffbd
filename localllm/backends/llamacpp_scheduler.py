"""Which requests the llama.cpp engine runs, and which tokens each slot runs in a step.

The same seam as native/scheduler.py: this module decides, the engine applies.

* Admission: waiting requests take idle slots oldest first, each where its
  longest cached prefix is (`SlotTable.plan`).
* A step: first the one pending token of every generating sequence (with its
  guesses, when speculating), then prompt tokens, shortest remaining prompt
  first, up to `n_batch` tokens, and `prefill_chunk` while anyone is
  generating, so running streams keep flowing while a long prompt is chunked.
* A full cache: the engine first drops idle caches; then the youngest running
  request is preempted, sent back to the head of the queue with its prompt
  and output so far, and nothing is admitted until a running request ends
  (or it would come straight back and fill the cache again).
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from localllm.backends.llamacpp_slots import Admission, Slot, SlotTable

AddGuesses = Callable[[list[Slot], int], int]  # (generating slots, room) -> rows the guesses take


class Scheduler:
    def __init__(self, slots: SlotTable, n_batch: int, prefill_chunk: int) -> None:
        self.slots = slots
        self.n_batch = n_batch
        self.prefill_chunk = prefill_chunk
        self.waiting: collections.deque[Any] = collections.deque()  # the engine's Jobs, oldest first
        self.held = False  # after a preemption, admit nothing until a running request ends
        self.preemptions = 0  # requests sent back to wait because the KV cache was full

    def next_admission(self) -> tuple[Any, Admission] | None:
        """The oldest waiting request and where it starts; None while it must wait."""
        if self.held or not self.waiting:
            return None
        job = self.waiting[0]
        plan = self.slots.plan(job.prompt + job.generated)  # a preempted request resumes where it was
        if plan is None:
            return None
        self.waiting.popleft()
        return job, plan

    def schedule(self, add_guesses: AddGuesses | None) -> list[tuple[Slot, list[int]]]:
        """The tokens each slot runs this step: every pending output token (and its guesses), then prompt chunks."""
        busy = [s for s in self.slots.busy() if s.todo]
        single = [s for s in busy if len(s.todo) == 1]
        prompts = sorted((s for s in busy if len(s.todo) > 1), key=lambda s: (len(s.todo), s.admitted_at))
        budget = self.n_batch - len(single)
        if add_guesses is not None:
            budget -= add_guesses(single, budget)
        work = [(s, s.todo + s.guesses) for s in single]
        if any(s.job.generated for s in single):
            budget = min(budget, self.prefill_chunk)  # keep the streams flowing
        for slot in prompts:
            if budget <= 0:
                break
            chunk = slot.todo[:budget]
            work.append((slot, chunk))
            budget -= len(chunk)
        return work

    def preempt_youngest(self) -> Slot | None:
        """Send the most recently admitted request back to wait; its slot (the caller drops the cache).

        None when fewer than two requests run: the only one has filled the context alone.
        """
        busy = sorted(self.slots.busy(), key=lambda s: s.admitted_at)
        if len(busy) <= 1:
            return None
        youngest = busy[-1]
        self.preemptions += 1
        self.held = True
        self.waiting.appendleft(youngest.job)
        youngest.job, youngest.todo = None, []
        return youngest
