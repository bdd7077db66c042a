"""Generator: the one engine behind every front end.

It owns the KV cache, compilation and CUDA-graph capture, prefill, the decode loop,
sampling and stopping. Front ends (CLI, chat, server, bench) only parse, call and format.

Prefill runs one prompt at a time into its cache slot (chunked, so a long prompt never
builds a full T x T mask). A slot remembers which tokens its cache holds, and a new
prompt for that slot only prefills what differs from them: a chat turn re-reads none of
the history.

Decode runs all slots together. On CUDA the step (model + sampler) is compiled with
torch.compile and captured once as a CUDA graph per batch shape; the graph feeds its own
output back as its next input, so the host only launches replays. The host reads step i's
tokens (for streaming and stop checks) after it has launched step i + 1, so the GPU never
waits for Python.
"""

import functools
import time
import types
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from blitzgen import inductor_fix
from blitzgen.cache import KVCache
from blitzgen.checkpoint import load_model
from blitzgen.errors import BlitzgenError
from blitzgen.model import Transformer, gemv_args
from blitzgen.sampling import SamplingParams, params_to_tensors, sample
from blitzgen.tokenizer import StreamDecoder, Tokenizer

DEFAULT_MODEL = Path(__file__).parent / "default_model"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PREFILL_CHUNK = 2048  # tokens per prefill forward: bounds the (T, S) mask and activations


@dataclass
class TokenEvent:
    index: int  # which prompt of the batch
    token_id: int
    text: str  # text that became final with this token ("" while bytes or a possible stop string wait)
    finish_reason: str | None = None  # "stop" (eos or stop string) or "length", on a sequence's last event


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids, the eos id included when that ended the sequence
    text: str  # generated text, without eos and without the stop string
    finish_reason: str


@dataclass
class TokenLogprobs:
    logprob: float  # log-probability of the chosen token under the model (log-softmax of the raw logits)
    top: list[tuple[int, float]]  # the most likely token ids and their log-probabilities, best first

    @classmethod
    def from_row(cls, row: list[float]) -> "TokenLogprobs":
        """One row of token_logprobs(): [log p(token), k best log-probs, their ids]."""
        k = (len(row) - 1) // 2
        return cls(row[0], [(int(t), lp) for t, lp in zip(row[1 + k :], row[1 : 1 + k])])


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
    """(B, 1 + 2k) float64 rows [log p(token), k best log-probs, their ids] of the model's distribution
    (raw logits: before temperature and filters, as OpenAI reports them), packed for one host copy.
    logits (B, V) float32, tokens (B,) int64."""
    logprobs = logits.log_softmax(dim=-1)  # (B, V)
    top = logprobs.topk(k, dim=-1)  # (B, k)
    chosen = logprobs.gather(1, tokens[:, None])  # (B, 1)
    return torch.cat([chosen.double(), top.values.double(), top.indices.double()], dim=1)


@dataclass
class GenerationStats:
    batch_size: int = 1
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually run; fewer when a slot's cache already held a prefix
    new_tokens: int = 0
    time_to_first_token: float = 0.0  # seconds from the call to the first token on the host
    total_time: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first ones, over the time after the first token (all sequences together)."""
        decode_time = self.total_time - self.time_to_first_token
        return 0.0 if decode_time <= 0 else max(self.new_tokens - self.batch_size, 0) / decode_time


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BlitzgenError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise BlitzgenError(f"--device {device!r}: expected cuda, cuda:N or cpu") from None


def load(
    path: str | Path | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    compile: bool | None = None,
    max_seq_len: int | None = None,
    quantize: str | None = None,
    attention_kernel: bool | None = None,
) -> "Generator":
    """Load a Hugging Face checkpoint directory (default: the model shipped in the package).

    dtype: "bf16" | "fp16" | "fp32"; default bf16 on CUDA and fp32 on CPU, where most
    processors emulate bf16 matrix products and run them slower than fp32.
    compile: torch.compile + CUDA graph for decode; default on for CUDA, off for CPU.
    quantize: "int8" | "int4" (group size 128): quantize the weights at load (quantize.py). A
    checkpoint written by `blitzgen quantize` is recognised and loaded quantized without it.
    attention_kernel: decode attention through the split-KV Triton kernel; default on for CUDA.
    """
    dev = resolve_device(device)
    if dtype is None:
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise BlitzgenError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    path = Path(path) if path is not None else DEFAULT_MODEL
    if quantize not in (None, "int8", "int4"):
        raise BlitzgenError(f"--quantize {quantize!r}: expected int8 or int4 (for GPTQ, write a checkpoint "
                            f"with `blitzgen quantize --mode int4-gptq`)")
    model = load_model(path, device=dev, dtype=DTYPES[dtype])
    if quantize is not None:
        from blitzgen.quantize import quantize_model  # imports Triton: only when asked

        quantize_model(model, quantize)
    tokenizer = Tokenizer.from_dir(path)
    return Generator(model, tokenizer, compile=compile, max_seq_len=max_seq_len, attention_kernel=attention_kernel)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Sequence:
    """Host-side state of one prompt being generated: tokens, text, stop checks."""

    def __init__(self, index: int, prompt: list[int], params: SamplingParams, tokenizer: Tokenizer):
        self.index, self.prompt, self.params = index, prompt, params
        self.eos_ids = frozenset() if params.ignore_eos else tokenizer.eos_ids
        self.decoder = StreamDecoder(tokenizer)
        self.tokens: list[int] = []
        self.text = ""  # decoded so far, cut at a stop string once one is found
        self.emitted = 0  # characters of self.text already handed out
        self.finish_reason: str | None = None
        self.longest_stop = max((len(s) for s in params.stop), default=0)

    def add(self, token: int) -> TokenEvent:
        self.tokens.append(token)
        if token in self.eos_ids:
            self.text += self.decoder.flush()
            self.finish_reason = "stop"
        else:
            self.text += self.decoder.push(token)
            if self.params.stop and self._cut_at_stop():
                self.finish_reason = "stop"
            elif len(self.tokens) >= self.params.max_new_tokens:
                self.text += self.decoder.flush()
                self._cut_at_stop()
                self.finish_reason = "length"
        final = self.finish_reason is not None
        safe = len(self.text) if final else len(self.text) - self._held_back()
        delta, self.emitted = self.text[self.emitted : safe], max(self.emitted, safe)
        return TokenEvent(self.index, token, delta, self.finish_reason)

    def _cut_at_stop(self) -> bool:
        start = max(0, self.emitted - self.longest_stop)
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        held = 0
        for s in self.params.stop:
            for n in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:n]):
                    held = n
                    break
        return held


# With the "block" compile scope, also compile the embedding + RoPE and the greedy and sampled tails
# (_compiled_decode_step); False leaves them eager (blitzgen bench --variants base,set:generate.COMPILE_ENDS=False
# compares).
COMPILE_ENDS = True
# Whether Inductor's coordinate-descent tuning (on CUDA) also tunes those small graphs' kernels, or only the
# block's. Off: on an H200 it left the 7B step time unchanged (3.630 vs 3.635 ms sampled, 3.616 both greedy) and
# its 100-250 benchmarked configurations took a sampled cold start from 21.2 s to 12.7 s (BENCHMARKS, session 18).
TUNE_ENDS = False


def _call_block(block, *args):
    return block(*args)


def _call_embed(model, tokens, positions):
    return model.embed(tokens, positions)


def _advance(positions: torch.Tensor, last: int):
    """Each slot's position (a view of cache.lengths) one on, in place, kept inside the cache (`last`: its last
    position): a slot whose own budget ended may run on while others finish, and its writes must stay in the
    cache (its output is ignored and its cache past the finish is never reused)."""
    positions.add_(1).clamp_(max=last)


def _greedy_tail(logits: torch.Tensor, positions: torch.Tensor, last: int) -> torch.Tensor:
    """The end of a greedy step: the (B,) argmax of logits (B, 1, V), and the positions advanced (_advance)."""
    out = logits[:, 0].float().argmax(dim=-1)
    _advance(positions, last)
    return out


def _sample_tail(logits, temperature, top_k, top_p, min_p, seed, positions, last: int, sort: bool) -> torch.Tensor:
    """_greedy_tail for sampled steps: sample() of each row's logits (sort=False: no row uses top-k or top-p),
    then the positions advanced (_advance). Compiled twice, one copy for each value of sort, so that each copy's
    graph cache holds one graph a shape."""
    out = sample(logits[:, 0].float(), temperature, top_k, top_p, min_p, seed, positions, sort=sort)
    _advance(positions, last)
    return out


def _fresh_copy(fn):
    """A copy of fn with its own code object. Dynamo keeps compiled graphs per code object and allows
    8 per object: a private copy per Generator keeps one Generator's shapes (and models) from using up
    another's budget."""
    return types.FunctionType(fn.__code__.replace(), globals(), fn.__name__)


class _DecodeStep:
    """One decode step for every slot, with its inputs in fixed buffers: the next input token and
    the sampling parameters of each slot. Each run writes its output tokens back into `tokens`, so
    consecutive runs need nothing from the host; a new sequence only overwrites its own rows.

    A run can advance only the first `rows` slots (the others keep their state and cost nothing):
    a server whose busy slots are 0..r-1 runs r rows. Each row count is its own static shape: on CUDA
    with compilation, one more captured CUDA graph (made by prepare(), or on first use), replayed.
    With top_logprobs=k the step also writes token_logprobs() of every row into `logprobs`.
    """

    def __init__(self, generator: "Generator", greedy: bool, top_logprobs: int | None = None, sort: bool = True,
                 inputs: "_DecodeStep | None" = None):
        self.cache = cache = generator.cache
        B = cache.batch_size
        if inputs is not None:  # another step over the same slots: the same input and output buffers
            self.tokens, self.sampling, self.logprobs = inputs.tokens, inputs.sampling, inputs.logprobs
        else:
            self.tokens = torch.zeros(B, dtype=torch.int64, device=generator.device)
            self.sampling = params_to_tensors([SamplingParams(temperature=0, seed=0)] * B, generator.device)
            self.logprobs = None
            if top_logprobs is not None:
                self.logprobs = torch.zeros(B, 1 + 2 * top_logprobs, dtype=torch.float64, device=generator.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # rows -> captured step
        fn = generator._decode_step
        if generator.compile:
            fn = generator._compiled_decode_step()
        # Compiled code gets no kv_len: one static shape, no recompilation as sequences grow.
        compiled = generator.compile
        self.compiled, self.capture = compiled, compiled and generator.device.type == "cuda"

        def run(rows: int, kv_len: int | None):
            return fn(self.tokens[:rows], **{name: t[:rows] for name, t in self.sampling.items()},
                      kv_len=None if compiled else kv_len, greedy=greedy, top_logprobs=top_logprobs,
                      rows=None if rows == B else rows, sort=sort)

        self._run = run
        if self.capture:
            self.prepare(B)

    def prepare(self, rows: int):
        """Compile (and on CUDA capture) the step for `rows` rows now rather than on first use."""
        if not self.compiled or rows in self.graphs:
            return
        cache = self.cache
        saved_lengths = cache.lengths.clone()
        # Warm-up runs (compilation, autotuning, cuBLAS workspaces) on a side stream, as capture
        # requires. They write K/V at each slot's current length, a position not live yet and
        # rewritten by the first real step; the lengths they advance are restored below.
        if self.capture:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._run(rows, None)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._store(self._run(rows, None), rows)
            self.graphs[rows] = graph
        else:
            self._run(rows, None)
        cache.lengths.copy_(saved_lengths)

    def set_row(self, slot: int, token: int | torch.Tensor, row: dict[str, torch.Tensor]):
        """Make `token` the next input of `slot`, sampled with the parameters in `row` (1-element tensors)."""
        self.tokens[slot] = token
        for name, t in row.items():
            self.sampling[name][slot] = t[0]

    def _store(self, out, rows: int):
        if self.logprobs is not None:
            out, logprobs = out
            self.logprobs[:rows].copy_(logprobs)
        self.tokens[:rows].copy_(out)

    def run(self, kv_len: int | None = None, rows: int | None = None) -> torch.Tensor:
        """Advance the first `rows` slots (default all) by one token; returns the (B,) next tokens
        (valid until the next run; rows past `rows` unchanged). kv_len: a host-known bound on those
        slots' lengths after the step (eager only; saves work)."""
        rows = rows or self.tokens.shape[0]
        if self.capture:
            if rows not in self.graphs:
                self.prepare(rows)
            self.graphs[rows].replay()
        else:
            self._store(self._run(rows, kv_len), rows)
        return self.tokens


class Generator:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        compile: bool | None = None,
        max_seq_len: int | None = None,
        attention_kernel: bool | None = None,
        rope_kernel: bool = False,
        gemv_kernels: bool | None = None,
    ):
        # Inference only: no autograd graph may grow through the cache. (torch.no_grad rather than
        # inference_mode below: cache tensors made in inference mode could not be updated in place
        # by a caller, e.g. a server thread, outside it.)
        model.requires_grad_(False)
        self.model, self.tokenizer, self.config = model, tokenizer, model.config
        self.device = model.tok_embeddings.weight.device  # the embedding is never quantized
        self.dtype = model.tok_embeddings.weight.dtype
        # Split-KV decode attention (kernels/decode_attention.py) on CUDA; on a CPU its reference is
        # faster than the kernel interpreted.
        for layer in model.layers:
            layer.attention.decode_kernel = (self.device.type == "cuda") if attention_kernel is None else attention_kernel
            # One kernel for a decode step's RoPE + K/V write (kernels/rope_cache.py), with the split-KV
            # kernel, where the GEMV kernels do not take the step (several sequences; one sequence has it
            # in wqkv's epilogue). Off by default: not measured on that path; beside one-row GEMVs it took a
            # step from 3.81 to 3.68 ms, where the fused epilogue gives 3.66 (BENCHMARKS.md, 2026-12-02).
            layer.attention.rope_kernel = rope_kernel
            # Decode steps of one sequence run their products through kernels/gemv.py with norms, gate,
            # residuals and RoPE + the cache write fused in (Block.gemv_decode), on CUDA by default: on an H200 a
            # Llama-2-7B step took 3.66 ms against 4.21-4.36 through Inductor's products, and an int8 one 2.93
            # against 3.05 through gemv_a8 (BENCHMARKS.md, 2026-12-01 / 12-02 sessions 7-8). Several sequences
            # keep Inductor's products (a several-row kernel lost to them by 2.6-3x and was removed); int4
            # layers of fp16 models keep their own kernels.
            products = (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2)
            on = (self.device.type == "cuda") if gemv_kernels is None else gemv_kernels
            layer.gemv_kernels = on and all(gemv_args(m, self.dtype) is not None for m in products)
        self.compile = self.device.type == "cuda" if compile is None else compile
        # The longest sequence (prompt + generated) this generator accepts.
        self.context = min(self.config.max_seq_len, max_seq_len or self.config.max_seq_len)
        self.cache: KVCache | None = None
        self.slot_tokens: list[list[int]] = []  # tokens whose K/V each cache slot holds, from position 0
        self._compiled = None
        self.compile_scope = "block"  # or "step"; see _compiled_decode_step
        self.inductor_options: dict = {}  # extra torch.compile options for the step (blitzgen bench --inductor)
        self.coordinate_descent_tuning = self.device.type == "cuda"  # Inductor tunes its GEMV reductions
        # (greedy-only or sampling, top_logprobs, sorts the vocabulary) variants, built on first use
        self._steps: dict[tuple[bool, int | None, bool], _DecodeStep] = {}
        self.last_stats = GenerationStats()
        self.last_prompts: list[list[int]] = []

    # ---- cache -------------------------------------------------------------------------
    def _ensure_cache(self, batch_size: int, seq_len: int):
        """Grow the cache to hold `batch_size` slots of `seq_len` tokens, keeping what it holds."""
        old = self.cache
        if old is not None and old.batch_size >= batch_size and old.max_seq_len >= seq_len:
            return
        # Capacity grows by doubling so a chat that grows turn by turn recompiles O(log n) times.
        capacity = 256
        while capacity < seq_len:
            capacity *= 2
        capacity = min(capacity, self.context)
        if old is not None:
            capacity = max(capacity, old.max_seq_len)
            batch_size = max(batch_size, old.batch_size)
        new = KVCache(self.config, batch_size, capacity, self.dtype, self.device)
        if old is not None:
            b, s = old.batch_size, old.max_seq_len
            new.k[:, :b, :s].copy_(old.k)
            new.v[:, :b, :s].copy_(old.v)
            new.lengths[:b].copy_(old.lengths)
        self.cache = new
        self.slot_tokens += [[] for _ in range(batch_size - len(self.slot_tokens))]
        self._steps.clear()  # built (and captured) against the old buffers

    def reset(self):
        """Forget what the cache holds (the next prompt prefills from scratch)."""
        self.slot_tokens = [[] for _ in self.slot_tokens]

    # ---- prefill -----------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, slot: int, tokens: list[int], all_logits: bool = False) -> torch.Tensor:
        """Put `tokens` in cache slot `slot`, reusing the prefix it already holds. Returns (V,) logits
        of the last token, float32."""
        cache = self.cache
        # Re-run at least the last token: its logits are what we need.
        start = min(common_prefix(self.slot_tokens[slot], tokens), len(tokens) - 1)
        window = self.config.sliding_window
        logits, pieces = None, []
        for begin in range(start, len(tokens), PREFILL_CHUNK):
            end = min(begin + PREFILL_CHUNK, len(tokens))
            chunk = torch.tensor([tokens[begin:end]], dtype=torch.int64, device=self.device)  # (1, T)
            positions = torch.arange(begin, end, device=self.device)[None]  # (1, T)
            logits = self.model(
                chunk,
                positions,
                cache,
                slots=slice(slot, slot + 1),
                kv_len=end,
                causal_from_zero=begin == 0 and (window is None or end <= window),
                last_only=not all_logits,
            )
            if all_logits:
                pieces.append(logits[0].float())  # (T, V)
        cache.lengths[slot] = len(tokens)
        self.slot_tokens[slot] = list(tokens)
        self.last_stats.prefilled_tokens += len(tokens) - start
        return torch.cat(pieces) if all_logits else logits[0, -1].float()

    def prefill_many(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """prefill() of several slots: (n, V) float32 logits of each prompt's last token.

        Prompts whose new part (after the prefix their slot already holds) fits one chunk go through
        the model together, in one (n, T) forward padded to the longest, rather than one forward each:
        a short prompt's eager prefill costs mostly kernel launches on a GPU, so a burst of requests
        costs little more than one. Padding sits after a prompt's own tokens, so causal attention
        never lets a real token see it, and the K/V it writes lands past the prompt's end (rewritten
        before it is ever read). Longer prompts (compute-bound: nothing to gain), and any whose padding
        would pass its slot's end, are prefilled one by one."""
        cache, window = self.cache, self.config.sliding_window
        starts = [min(common_prefix(self.slot_tokens[s], p), len(p) - 1) for s, p in zip(slots, prompts)]
        short = [j for j, (p, b) in enumerate(zip(prompts, starts)) if len(p) - b <= PREFILL_CHUNK]
        T = max((len(prompts[j]) - starts[j] for j in short), default=0)
        together = [j for j in short if starts[j] + T <= cache.max_seq_len]
        if len(together) < 2:
            together = []
        logits = [None] * len(prompts)
        for j in sorted(set(range(len(prompts))) - set(together)):
            logits[j] = self.prefill(slots[j], prompts[j])
        if together:
            begins = [starts[j] for j in together]
            new = [prompts[j][b:] for j, b in zip(together, begins)]
            tokens = torch.tensor([t + [0] * (T - len(t)) for t in new], dtype=torch.int64,
                                  device=self.device)  # (A, T), padded with token 0
            positions = torch.tensor(begins, device=self.device)[:, None] + torch.arange(T, device=self.device)
            last = torch.tensor([len(t) - 1 for t in new], device=self.device)  # each row's last real token
            rows = torch.tensor([slots[j] for j in together], device=self.device)
            out = self.model(tokens, positions, cache, slots=rows, kv_len=max(begins) + T,
                             causal_from_zero=max(begins) == 0 and (window is None or T <= window),
                             last_index=last)  # (A, 1, V)
            for a, j in enumerate(together):
                logits[j] = out[a, 0].float()
                cache.lengths[slots[j]] = len(prompts[j])
                self.slot_tokens[slots[j]] = list(prompts[j])
                self.last_stats.prefilled_tokens += len(prompts[j]) - starts[j]
        return torch.stack(logits)

    def logits(self, tokens: list[int]) -> torch.Tensor:
        """(T, V) float32 logits of every position of `tokens`, run from position 0 in cache slot 0
        (whatever the slot held is dropped). For scoring text (evaluate.py)."""
        self._ensure_cache(1, len(tokens))
        self.slot_tokens[0] = []  # no prefix reuse: every position's logits are needed
        return self.prefill(0, tokens, all_logits=True)

    def _first_token(self, logits: torch.Tensor, prompt_len: int, params: SamplingParams, row) -> torch.Tensor:
        """(1,) the token after a prefilled prompt, from its (1, V) logits, drawn as a decode step
        draws: keyed by the position of the prompt's last token."""
        if params.greedy:
            return logits.argmax(-1)
        return sample(logits, **row, position=torch.tensor([prompt_len - 1], device=self.device))

    # ---- decode ------------------------------------------------------------------------
    def _decode_step(self, tokens, temperature, top_k, top_p, min_p, seed, kv_len=None, greedy=False, run_block=None,
                     top_logprobs=None, rows=None, run_embed=None, run_tail=None, run_sample=None,
                     run_unsorted_sample=None, sort=True):
        """One token for every slot: (B,) in, (B,) out, and with top_logprobs=k also the (B, 1 + 2k)
        token_logprobs() of those tokens. Compiled and graph-captured on CUDA. rows=r: the inputs are
        those of the first r cache slots, and only those advance. sort=False: no slot uses top-k or
        top-p (see sample())."""
        cache = self.cache
        slots = slice(0, rows)
        positions = cache.lengths[slots]  # (B,) where each slot's input token goes
        logits = self.model(tokens[:, None], positions[:, None], cache, slots=slots, kv_len=kv_len,
                            run_block=run_block, run_embed=run_embed)
        if greedy and top_logprobs is None:
            return (run_tail or _greedy_tail)(logits, positions, cache.max_seq_len - 1)
        if top_logprobs is None:
            tail = (run_sample if sort else run_unsorted_sample) or _sample_tail
            return tail(logits, temperature, top_k, top_p, min_p, seed, positions, cache.max_seq_len - 1, sort)
        logits = logits[:, 0].float()  # (B, V)
        out = logits.argmax(dim=-1) if greedy else sample(logits, temperature, top_k, top_p, min_p, seed, positions)
        _advance(positions, cache.max_seq_len - 1)
        return out, token_logprobs(logits, out, top_logprobs)

    def _compiled_decode_step(self):
        """The decode step with compiled code in it, built once per Generator.

        compile_scope "block" (default) compiles one transformer block and calls that compiled code
        for every layer (the layers are the same code with other weights): compilation time does not
        grow with depth. The embedding with the RoPE rotation, and a greedy step's argmax (or a
        sampled step's sample(), with or without its sort) with the position update, are more small
        compiled graphs: eager, they were ~12 kernels of a few microseconds each in the captured step
        (the sampler 46 more). The output projection (kernels/gemv.py on one row) and the logprobs
        path stay eager. "step" compiles the whole step as one graph, which lets
        Inductor fuse across layer boundaries at the price of a compile time proportional to depth.
        The figures behind the default are in benchmarks/BENCHMARKS.md.
        """
        if self._compiled is None:
            options = {"coordinate_descent_tuning": self.coordinate_descent_tuning, **self.inductor_options}
            if self.coordinate_descent_tuning:
                inductor_fix.install()  # torch < 2.13: a warm start would tune every GEMV again
            if self.compile_scope == "step":
                self._compiled = torch.compile(self._decode_step, fullgraph=True, dynamic=False, options=options)
            else:
                def compiled(fn, options=options):
                    return torch.compile(_fresh_copy(fn), fullgraph=True, dynamic=False, options=options)

                ends = {}
                if COMPILE_ENDS:
                    small = {"coordinate_descent_tuning": self.coordinate_descent_tuning and TUNE_ENDS,
                             **self.inductor_options}
                    ends = {name: compiled(fn, small) for name, fn in [
                        ("run_embed", _call_embed), ("run_tail", _greedy_tail), ("run_sample", _sample_tail),
                        ("run_unsorted_sample", _sample_tail)]}
                self._compiled = functools.partial(self._decode_step, run_block=compiled(_call_block), **ends)
        return self._compiled

    def _step(self, greedy: bool, top_logprobs: int | None = None, sort: bool = True) -> _DecodeStep:
        key = (greedy, top_logprobs, sort and not greedy)
        if key not in self._steps:
            self._steps[key] = _DecodeStep(self, greedy, top_logprobs, key[2])
        return self._steps[key]

    # ---- the public calls ----------------------------------------------------------------
    def _check_prompts(self, prompts: list[list[int]], params: list[SamplingParams], truncate: bool):
        checked = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if len(prompt) == 0:
                raise BlitzgenError(f"prompt {i} is empty (no tokens); give at least one token")
            if any(not 0 <= t < self.config.vocab_size for t in prompt):
                raise BlitzgenError(f"prompt {i} has token ids outside [0, {self.config.vocab_size})")
            room = self.context - p.max_new_tokens
            if len(prompt) > room:
                if not truncate or room < 1:
                    raise BlitzgenError(
                        f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={p.max_new_tokens} that exceeds "
                        f"the context of {self.context} tokens (shorten the prompt, lower max_new_tokens"
                        + (", or truncate)" if room >= 1 else ")")
                    )
                prompt = prompt[-room:]  # keep the end of the prompt, nearest to what comes next
            checked.append(list(prompt))
        return checked

    @torch.no_grad()
    def stream(
        self,
        prompts: list[list[int]] | list[str],
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        truncate: bool = False,
    ):
        """Generate for a batch of prompts (token ids or strings); yields TokenEvents as tokens arrive.

        Prompt i occupies cache slot i. Stats of the call are in `self.last_stats` once it ends.
        """
        t0 = time.perf_counter()
        if not prompts:
            raise BlitzgenError("no prompts given")
        params = params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise BlitzgenError(f"{len(params)} sampling params for {len(prompts)} prompts")
        for p in params:
            p.validate()
        prompts = [self.tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        prompts = self._check_prompts(prompts, params, truncate)
        self.last_prompts = prompts  # the ids this call runs, after any truncation
        B = len(prompts)
        longest = max(len(p) + q.max_new_tokens for p, q in zip(prompts, params))
        self._ensure_cache(B, longest)
        self.last_stats = stats = GenerationStats(prompt_tokens=sum(map(len, prompts)), batch_size=B)
        sampling = params_to_tensors(params, self.device)
        greedy = all(p.greedy for p in params)
        seqs = [Sequence(i, prompt, p, self.tokenizer) for i, (prompt, p) in enumerate(zip(prompts, params))]
        for i in range(B, self.cache.batch_size):
            self.cache.lengths[i] = 0  # idle slots restart at 0 so they never run past the cache
            self.slot_tokens[i] = []
        steps_left = max(p.max_new_tokens for p in params) - 1
        step = self._step(greedy, sort=any(p.sorts for p in params)) if steps_left > 0 else None

        firsts = []
        all_logits = self.prefill_many(list(range(B)), prompts)  # (B, V)
        for i, prompt in enumerate(prompts):
            logits = all_logits[i : i + 1]  # (1, V)
            row = {k: v[i : i + 1] for k, v in sampling.items()}
            first = self._first_token(logits, len(prompt), params[i], row)
            if step is not None:
                step.set_row(i, first[0], row)
            firsts.append(first)
        first_host = torch.cat(firsts).tolist()
        stats.time_to_first_token = time.perf_counter() - t0
        for seq in seqs:
            yield seq.add(first_host[seq.index])

        in_flight = deque()  # (host tensor, event) of steps launched but not read yet
        kv_len = max(len(p) for p in prompts)  # host-side bound on every slot's length, for eager steps
        while any(s.finish_reason is None for s in seqs) and (steps_left > 0 or in_flight):
            if steps_left > 0:
                kv_len = min(kv_len + 1, self.cache.max_seq_len)
                out = step.run(kv_len)
                steps_left -= 1
                event = None
                if self.device.type == "cuda":
                    host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                    host.copy_(out, non_blocking=True)  # queued before the next run overwrites `out`
                    event = torch.cuda.Event()
                    event.record()
                else:
                    host = out.clone()
                in_flight.append((host, event))
                if len(in_flight) < 2 and steps_left > 0:
                    continue  # read step i only once step i + 1 is queued behind it
            host, event = in_flight.popleft()
            if event is not None:
                event.synchronize()
            for seq, token in zip(seqs, host.tolist()):
                if seq.finish_reason is None:
                    yield seq.add(token)
        # What each slot's cache now holds for certain: the prompt and every generated token that
        # was fed back as input (all but the last). Later steps' writes may be garbage, so stop there.
        for seq in seqs:
            self.slot_tokens[seq.index] = seq.prompt + seq.tokens[:-1]
        self.cache.lengths[:B] = torch.tensor([len(t) for t in self.slot_tokens[:B]], device=self.device)
        stats.new_tokens = sum(len(s.tokens) for s in seqs)
        stats.total_time = time.perf_counter() - t0

    # ---- slot-level calls, for a scheduler that batches requests continuously ---------------
    # A fixed batch of slots decodes together; a sequence joins a free slot between steps (prefill
    # + first token) and leaves by being ignored until its slot is reused. Do not mix with stream().
    @torch.no_grad()
    def open_slots(self, batch_size: int, max_seq_len: int | None = None, top_logprobs: int | None = None):
        """Allocate `batch_size` slots of up to `max_seq_len` tokens (default: the context) and build
        the decode step (compiled and CUDA-graph captured on GPU) once, for every later step().
        top_logprobs=k: add_sequence() and step() also compute, inside the step, the log-probability of
        each slot's token and its k most likely alternatives; read them with slot_logprobs()."""
        self._ensure_cache(batch_size, max_seq_len or self.context)
        self.cache.lengths.zero_()
        self.slot_tokens = [[] for _ in range(self.cache.batch_size)]
        self._slot_lengths = [0] * self.cache.batch_size  # host copy of cache.lengths, for eager kv_len
        self._slot_step = self._step(greedy=False, top_logprobs=top_logprobs)  # temperature-0 rows take the argmax
        # The same step without the vocabulary's sort, for the steps in which no busy slot uses top-k or top-p
        # (sample(sort=False): the same tokens, ~50 us less a step); the logprobs step has one tail only.
        self._slot_unsorted_step = None
        if top_logprobs is None:
            self._slot_unsorted_step = _DecodeStep(self, greedy=False, sort=False, inputs=self._slot_step)
        self._slot_sorts = [False] * self.cache.batch_size  # slot -> its request uses top-k or top-p
        for rows in sorted({self._step_rows(r) for r in range(1, self.cache.batch_size + 1)}):
            for step in (self._slot_step, self._slot_unsorted_step):
                if step is not None:
                    step.prepare(rows)  # compile / capture every row count now, not while serving
        self._slot_logprob_rows: list[list[float]] = [[0.0] * (1 + 2 * (top_logprobs or 0))] * self.cache.batch_size

    def check_sequence(self, prompt: list[int], params: SamplingParams) -> list[int]:
        """Raise a BlitzgenError if add_sequence() would refuse this request; the prompt's ids."""
        params.validate()
        (prompt,) = self._check_prompts([prompt], [params], truncate=False)
        if len(prompt) + params.max_new_tokens > self.cache.max_seq_len:
            raise BlitzgenError(f"prompt of {len(prompt)} tokens + max_new_tokens={params.max_new_tokens} "
                                f"exceeds the {self.cache.max_seq_len} tokens of a slot")
        return prompt

    @torch.no_grad()
    def add_sequence(self, slot: int, prompt: list[int], params: SamplingParams) -> int:
        """Prefill `prompt` into `slot` (reusing what the slot already holds) and return its first
        token, which is also the slot's next input."""
        return self.add_sequences([slot], [prompt], [params])[0]

    @torch.no_grad()
    def add_sequences(self, slots: list[int], prompts: list[list[int]], params: list[SamplingParams]) -> list[int]:
        """add_sequence() for several free slots at once, prefilled together (prefill_many)."""
        prompts = [self.check_sequence(p, q) for p, q in zip(prompts, params)]
        self.last_stats = GenerationStats(prompt_tokens=sum(map(len, prompts)), batch_size=len(prompts))
        logits = self.prefill_many(slots, prompts)  # (n, V)
        firsts = []
        for j, (slot, prompt, p) in enumerate(zip(slots, prompts, params)):
            row = params_to_tensors([p], self.device)
            first = self._first_token(logits[j : j + 1], len(prompt), p, row)
            self._slot_step.set_row(slot, first[0], row)
            self._slot_sorts[slot] = p.sorts
            self._slot_lengths[slot] = len(prompt)
            if self._slot_step.logprobs is not None:
                k = (self._slot_step.logprobs.shape[1] - 1) // 2
                self._slot_logprob_rows[slot] = token_logprobs(logits[j : j + 1], first, k)[0].tolist()
            firsts.append(first)
        return torch.cat(firsts).tolist()

    @torch.no_grad()
    def _step_rows(self, rows: int) -> int:
        """Rows a step over slots 0..rows-1 runs: compiled, a power of two (few shapes to compile and
        capture); eager, exactly `rows`."""
        B = self.cache.batch_size
        return min(B, 1 << (rows - 1).bit_length()) if self.compile else rows

    def step(self, rows: int | None = None) -> list[int]:
        """One decode step; the next token of each slot (free slots' values are noise). rows=r: only
        slots 0..r-1 need to advance (the caller keeps its sequences there); the step may run a few
        more, and leaves the others as they are."""
        rows = self._step_rows(rows or self.cache.batch_size)
        lengths = self._slot_lengths
        lengths[:rows] = [min(n + 1, self.cache.max_seq_len - 1) for n in lengths[:rows]]
        step = self._slot_step
        if self._slot_unsorted_step is not None and not any(self._slot_sorts[:rows]):
            step = self._slot_unsorted_step  # (a finished request's slot counts until it is reused)
        tokens = step.run(kv_len=max(lengths[:rows]) + 1, rows=rows).tolist()
        if self._slot_step.logprobs is not None:  # computed by the same step: this copy waits for nothing
            self._slot_logprob_rows = self._slot_step.logprobs.tolist()
        return tokens

    def slot_logprobs(self, slot: int) -> TokenLogprobs:
        """Log-probabilities of the token that add_sequence() or step() last gave `slot`
        (needs open_slots(top_logprobs=k))."""
        assert self._slot_step.logprobs is not None, "open_slots(top_logprobs=k) computes log-probabilities"
        return TokenLogprobs.from_row(self._slot_logprob_rows[slot])

    def generate(self, prompts, params=None, *, truncate: bool = False) -> list[Completion]:
        """Generate to completion; one Completion per prompt, in order."""
        done = [Completion([], [], "", "") for _ in prompts]
        for event in self.stream(prompts, params, truncate=truncate):
            c = done[event.index]
            c.token_ids.append(event.token_id)
            c.text += event.text
            c.finish_reason = event.finish_reason or ""
        for c, prompt in zip(done, self.last_prompts):
            c.prompt_token_ids = prompt
        return done
