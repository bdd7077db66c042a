"""The engine loop: one thread owns the Generator and runs continuous batching over its slots.

The Generator keeps a fixed batch of cache slots (`open_slots`): its decode step is built (compiled
and CUDA-graph captured on GPU) once, for that batch, and every step advances all slots together.
Between steps the loop asks the Scheduler for a StepPlan: waiting sequences are prefilled into free
slots (`add_sequence`, or on a GPU `add_sequences` for all of them at once; both give the first
tokens), then one `step()` gives the next token of every slot; idle slots compute noise that nobody
reads. `step()` reads its tokens back once, so the loop waits for the device once per step;
everything else here is host work on those tokens.

HTTP handlers run on the asyncio event loop in another thread. They talk to the engine through
`submit` and `cancel` (which take the scheduler's lock for a few microseconds, never across a model
call), and receive tokens through their request's asyncio queue, filled with
`loop.call_soon_threadsafe` once per step. A sequence that ends (eos, stop string, length) or is
cancelled leaves its slot at once; the next plan can give the slot to a waiting sequence.

An exception while serving one request fails that request (500) and the loop goes on; an exception in
the shared decode step fails the requests running in it and rebuilds the slots.
"""

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from blitzgen.generate import Generator, Sequence, TokenLogprobs
from blitzgen.sampling import SamplingParams
from blitzgen.server.metrics import Metrics
from blitzgen.server.scheduler import QueueFull, Scheduler

log = logging.getLogger("blitzgen.server")


@dataclass
class Delta:
    """What one token adds to one choice of a request."""

    index: int  # choice index in the response
    token_id: int
    text: str  # text that became final with this token (possibly "")
    logprobs: TokenLogprobs | None
    finish_reason: str | None


class EngineError(Exception):
    """A failure inside the engine while serving a request; the server answers 500 (or 503)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class Choice:
    """One sequence of a request (one of its `n` choices): what the scheduler places in a slot."""

    request: "Request"
    index: int
    prompt: list[int]
    params: SamplingParams
    state: Sequence  # text, stop strings and eos, shared with Generator.stream
    done: bool = False
    last_token_time: float | None = None


@dataclass(eq=False)
class Request:
    """One HTTP request as the engine sees it. Deltas arrive on `queue` (lists of Delta, or an
    EngineError), consumed by the handler on the event loop."""

    loop: asyncio.AbstractEventLoop
    want_logprobs: bool = False
    arrival: float = field(default_factory=time.perf_counter)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    choices: list[Choice] = field(default_factory=list)

    def add_choice(self, prompt: list[int], params: SamplingParams, tokenizer) -> Choice:
        index = len(self.choices)
        choice = Choice(self, index, prompt, params, Sequence(index, prompt, params, tokenizer))
        self.choices.append(choice)
        return choice

    @property
    def done(self) -> bool:
        return all(c.done for c in self.choices)


class Engine:
    def __init__(
        self,
        generator: Generator,
        *,
        max_batch_size: int,
        max_queue: int,
        max_prefill_tokens: int,
        top_logprobs: int | None,
        metrics: Metrics,
    ):
        self.generator, self.metrics = generator, metrics
        self.max_batch_size, self.top_logprobs = max_batch_size, top_logprobs
        # New sequences of a step boundary prefilled in one batch (add_sequences) on a GPU, where a
        # short prompt's eager prefill costs mostly launches, so a batch costs little more than one
        # prompt. On a CPU the batch costs as much as the prompts one by one, and each first token
        # would wait for the whole batch: measured with the default model at 32 streams, aggregate
        # +20% but median time to first token +60%, so one by one there (BENCHMARKS.md).
        self.batch_prefill = generator.device.type == "cuda"
        self._open_slots()
        self.scheduler = Scheduler(max_batch_size, max_queue, max_prefill_tokens)
        self._cond = threading.Condition()  # guards the scheduler and `Choice.done`
        self._stopping = False
        self._outbox: dict[Request, list[Delta]] = {}
        self._thread: threading.Thread | None = None

    def _open_slots(self):
        # Every slot can hold a whole context; the Generator checks each prompt + max_tokens against it.
        self.generator.open_slots(self.max_batch_size, self.generator.context, top_logprobs=self.top_logprobs)

    # ---- called from the event loop's thread ------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, request: Request) -> None:
        """Queue every choice of `request`; QueueFull when too many requests wait already."""
        if not self.alive:
            raise EngineError("the engine is not running", status=503)
        with self._cond:
            self.scheduler.submit(request.choices)
            self.metrics.queue_depth.set(self.scheduler.num_waiting)
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """The client went away: drop its waiting choices and free its slots now."""
        with self._cond:
            for choice in request.choices:
                if not choice.done:
                    choice.done = True
                    self.scheduler.finish(choice)
                    self.metrics.cancelled.inc()

    def start(self):
        self._thread = threading.Thread(target=self._run, name="blitzgen-engine", daemon=True)
        self._thread.start()

    def stop(self):
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    # ---- the engine thread ----------------------------------------------------------------------
    def _run(self):
        with torch.no_grad():  # grad mode is per thread, and this thread only ever runs inference
            self._loop()

    def _loop(self):
        while True:
            with self._cond:
                while not self._stopping and not self.scheduler.has_work():
                    self._cond.wait()
                if self._stopping:
                    break
                plan = self.scheduler.plan()
                self.metrics.queue_depth.set(self.scheduler.num_waiting)
                self.metrics.batch_size.set(len(plan.decode))
            try:
                self._run_plan(plan)
            except Exception:  # a bug of ours outside any one request: log it, keep serving
                log.exception("engine loop error")
            self._flush()
        for request in {c.request for c in self.scheduler.slots if c is not None} | {
            c.request for _, c in self.scheduler.waiting
        }:
            self._fail(request, EngineError("the server is shutting down", status=503))
        self._flush()

    def _run_plan(self, plan):
        generator = self.generator
        admitted = []  # the plan's new sequences that pass the checks a slot makes
        for slot, choice in plan.prefill:
            if choice.done:  # cancelled since the plan was made
                continue
            try:
                generator.check_sequence(choice.prompt, choice.params)
                admitted.append((slot, choice))
            except Exception as exc:
                log.exception("request refused in prefill")
                self._fail(choice.request, exc)
        tokens = None
        if self.batch_prefill and len(admitted) > 1:
            try:
                tokens = generator.add_sequences([s for s, _ in admitted], [c.prompt for _, c in admitted],
                                                 [c.params for _, c in admitted])
            except Exception:
                # One request's failure must not fail the others: prefill them one by one below (a
                # failed batch leaves each slot's cached prefix intact; add_sequence rewrites the rest).
                log.exception("batched prefill failed; prefilling one by one")
        for i, (slot, choice) in enumerate(admitted):
            try:
                token = tokens[i] if tokens is not None else generator.add_sequence(slot, choice.prompt, choice.params)
                self._emit(choice, token, generator.slot_logprobs(slot) if choice.request.want_logprobs else None)
            except Exception as exc:
                log.exception("request failed in prefill")
                self._fail(choice.request, exc)
            self._flush()  # its first token goes out now, not after the other prefills and the step
        running = [(slot, c) for slot, c in plan.decode if not c.done]
        if not running:
            return
        try:
            tokens = generator.step(plan.rows)  # slots past the highest busy one stay still
        except Exception as exc:
            log.exception("decode step failed; rebuilding the slots")
            for request in {c.request for _, c in running}:
                self._fail(request, exc)
            self._open_slots()
            with self._cond:
                self.scheduler.forget_cached()
            return
        for slot, choice in running:
            if choice.done:  # cancelled during the step
                continue
            try:
                logprobs = generator.slot_logprobs(slot) if choice.request.want_logprobs else None
                self._emit(choice, tokens[slot], logprobs)
            except Exception as exc:
                log.exception("request failed after a decode step")
                self._fail(choice.request, exc)

    def _emit(self, choice: Choice, token: int, logprobs: TokenLogprobs | None):
        event = choice.state.add(token)
        now = time.perf_counter()
        if choice.last_token_time is None:
            self.metrics.time_to_first_token.observe(now - choice.request.arrival)
        else:
            self.metrics.inter_token_latency.observe(now - choice.last_token_time)
        choice.last_token_time = now
        self.metrics.generation_tokens.inc()
        self._outbox.setdefault(choice.request, []).append(
            Delta(choice.index, token, event.text, logprobs, event.finish_reason))
        if event.finish_reason is not None:
            with self._cond:
                choice.done = True
                self.scheduler.finish(choice)

    def _fail(self, request: Request, exc: Exception):
        self.cancel(request)
        if not isinstance(exc, EngineError):
            # One line, naming nothing but the failure itself (never another request's text).
            first_line = (str(exc).splitlines() or [""])[0]
            exc = EngineError(f"internal error while generating: {type(exc).__name__}: {first_line}")
        self._outbox[request] = [exc]  # deltas not yet delivered are dropped with the request

    def _flush(self):
        """Hand this step's deltas to each request's handler, one call per request."""
        outbox, self._outbox = self._outbox, {}
        for request, items in outbox.items():
            payload = items[0] if isinstance(items[0], Exception) else items
            try:
                request.loop.call_soon_threadsafe(request.queue.put_nowait, payload)
            except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
                pass


__all__ = ["Choice", "Delta", "Engine", "EngineError", "QueueFull", "Request"]
