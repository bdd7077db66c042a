"""The continuous-batching scheduler: which waiting sequences take which free cache slots, step by step.

Plain Python: no torch, no threads, no model. The engine loop (engine.py) owns one Scheduler, asks it
for a StepPlan at every step boundary, runs the plan on the Generator and reports each sequence that
finishes or is cancelled, which frees its slot at once for the next plan.

A plan admits waiting sequences first come, first served, into free slots, as long as the prompt
tokens to prefill before this step stay within a budget (at least one sequence is always admitted
when a slot is free, however long its prompt): prefill stalls every running sequence, so a burst of
long prompts is spread over several steps. Every occupied slot, new ones included, then takes one
decode step together.

The decode step runs slots 0..rows-1 only (`StepPlan.rows`, the highest busy slot + 1), so a
sequence goes to the lowest free slot, keeping the busy ones packed at the bottom. One exception: a
slot keeps the K/V of the last prompt it held and the Generator prefills only what a new prompt does
not share with it, so a free slot holding a long prefix of the prompt (a shared system prompt) is
taken instead when that saves at least MIN_PREFIX_REUSE tokens of prefill.

Sequences are any objects with a `prompt` (list of token ids); they are compared by identity.
"""

from collections import deque
from dataclasses import dataclass, field

from blitzgen.generate import common_prefix

# Prefill tokens a slot other than the lowest free one must save to be chosen: fewer cost less to
# recompute than one more row costs in every decode step while the sequence runs.
MIN_PREFIX_REUSE = 32


class QueueFull(Exception):
    """More requests wait for a slot than the queue admits; the server answers 429."""


@dataclass
class StepPlan:
    prefill: list[tuple[int, object]] = field(default_factory=list)  # (slot, sequence) to prefill, in order
    decode: list[tuple[int, object]] = field(default_factory=list)  # (slot, sequence) of every occupied slot
    num_tokens: dict[int, int] = field(default_factory=dict)  # slot -> tokens it runs: uncached prompt + 1

    @property
    def rows(self) -> int:
        """The decode step must run slots 0..rows-1: every busy slot is among them."""
        return max((slot for slot, _ in self.decode), default=-1) + 1

    @property
    def prefill_tokens(self) -> int:
        return sum(self.num_tokens[slot] - 1 for slot, _ in self.prefill)


class Scheduler:
    def __init__(self, num_slots: int, max_queue: int, max_prefill_tokens: int):
        assert num_slots >= 1 and max_queue >= 0 and max_prefill_tokens >= 1
        self.num_slots, self.max_queue, self.max_prefill_tokens = num_slots, max_queue, max_prefill_tokens
        self.slots: list[object | None] = [None] * num_slots  # the sequence in each slot
        self.cached: list[list[int]] = [[] for _ in range(num_slots)]  # the last prompt each slot held
        self.waiting: deque = deque()  # (request number, sequence), first come first served
        self._waiting_per_request: dict[int, int] = {}  # request number -> its sequences still waiting
        self._requests = 0

    # ---- state -----------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for a slot."""
        return len(self.waiting)

    @property
    def waiting_requests(self) -> int:
        return len(self._waiting_per_request)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_running > 0

    # ---- changes ---------------------------------------------------------------------------------
    def submit(self, sequences: list) -> None:
        """Queue one request's sequences (its `n` choices) together; QueueFull when max_queue requests
        already wait. A request that can start at once is never refused."""
        assert sequences
        free = self.num_slots - self.num_running
        if self.waiting_requests >= self.max_queue and (self.waiting or len(sequences) > free):
            raise QueueFull(f"{self.waiting_requests} requests are already waiting for a slot")
        self._requests += 1
        self._waiting_per_request[self._requests] = len(sequences)
        self.waiting.extend((self._requests, s) for s in sequences)

    def finish(self, sequence) -> None:
        """`sequence` is done or cancelled: free its slot, or drop it from the queue. Idempotent."""
        for slot, s in enumerate(self.slots):
            if s is sequence:
                self.slots[slot] = None
                return
        for entry in self.waiting:
            if entry[1] is sequence:
                self.waiting.remove(entry)
                self._count_out(entry[0])
                return

    def _count_out(self, request: int):
        self._waiting_per_request[request] -= 1
        if self._waiting_per_request[request] == 0:
            del self._waiting_per_request[request]

    def plan(self) -> StepPlan:
        """Admit what fits, then every occupied slot decodes one token."""
        plan = StepPlan()
        budget = self.max_prefill_tokens
        while self.waiting:
            free = [slot for slot, s in enumerate(self.slots) if s is None]
            if not free:
                break
            request, sequence = self.waiting[0]
            shared = {f: common_prefix(self.cached[f], sequence.prompt) for f in free}
            best = max(free, key=shared.get)  # the lowest among equals
            slot = best if shared[best] - shared[free[0]] >= MIN_PREFIX_REUSE else free[0]
            # The Generator always re-runs a prompt's last token (its logits give the first new token).
            reused = min(shared[slot], len(sequence.prompt) - 1)
            tokens = len(sequence.prompt) - reused
            if plan.prefill and tokens > budget:
                break
            budget -= tokens
            self.waiting.popleft()
            self._count_out(request)
            self.slots[slot] = sequence
            self.cached[slot] = list(sequence.prompt)
            plan.prefill.append((slot, sequence))
            plan.num_tokens[slot] = tokens + 1
        for slot, sequence in enumerate(self.slots):
            if sequence is not None:
                plan.decode.append((slot, sequence))
                plan.num_tokens.setdefault(slot, 1)
        return plan

    def forget_cached(self) -> None:
        """The Generator's slots were rebuilt empty (after an engine error): nothing is cached."""
        self.cached = [[] for _ in range(self.num_slots)]
