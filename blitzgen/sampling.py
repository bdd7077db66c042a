"""Sampling parameters and the sampler that runs inside the compiled decode step.

`sample` takes one row of parameters per sequence as device tensors, so one captured
graph serves any mix of greedy and sampled sequences and nothing is read back to the host.
Filters apply in the order Hugging Face's generate() applies them: temperature, top-k,
top-p, min-p, each renormalising what the previous one kept. The draw itself is the
exponential race (argmax of p_i / E_i with E_i ~ Exp(1) picks i with probability p_i),
which needs no torch.multinomial and so no host synchronisation. Top-k and top-p need the
vocabulary sorted; a step in which no row uses them skips the sort (sample(sort=False), picked by
the caller, who knows the requests) and draws the same tokens: the default request (top-k and
top-p off) then costs a step no more than greedy decoding (BENCHMARKS.md, session 17).

The exponential noise is not drawn from torch's RNG but hashed from (the sequence's seed, the
position being sampled, the token id), so a seed gives the same text whatever else is in the
batch, on the first call and later ones, eagerly, compiled or replayed in a CUDA graph.
"""

import math
import random
from dataclasses import dataclass, field

import torch

from blitzgen.errors import BlitzgenError


@dataclass
class SamplingParams:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None  # same seed, same prompt => same text; None: a fresh random seed
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # generation ends before the first of these strings
    ignore_eos: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self):
        def bad(name, value, expected):
            raise BlitzgenError(f"invalid {name}={value!r}: expected {expected}")

        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", self.temperature, "a number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", self.top_k, "an integer >= 0 (0 = off)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "a number in (0, 1]")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            bad("min_p", self.min_p, "a number in [0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            bad("seed", self.seed, "a non-negative integer")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "an integer >= 1")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", self.stop, "a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def sorts(self) -> bool:
        """Whether sample() must sort the vocabulary for this request: sampled, with top-k or top-p on."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit integer hash (splitmix64's finaliser, with arithmetic shifts masked to logical ones).
    int64 products wrap modulo 2**64 alike in eager PyTorch, Inductor's C++ and Triton code."""
    x = x ^ ((x >> 30) & 0x3FFFFFFFF)
    x = x * 0x3F58476D1CE4E5B9
    x = x ^ ((x >> 27) & 0x1FFFFFFFFF)
    x = x * 0x14D049BB133111EB
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


def hashed_uniform(seed: torch.Tensor, position: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) float32 uniform in (0, 1), a pure function of (seed[b], position[b], token id)."""
    token = torch.arange(vocab_size, device=seed.device)
    x = _mix(_mix(seed * 0x2545F4914F6CDD1D + position)[:, None] + token)  # (B, V) int64
    return (((x >> 40) & 0xFFFFFF).float() + 0.5) * 2.0**-24


@torch.library.custom_op("blitzgen::cumsum_rows", mutates_args=())
def cumsum_rows(x: torch.Tensor) -> torch.Tensor:
    """x.cumsum(dim=-1), opaque to torch.compile. Inductor's own scan over a (B, V) vocabulary splits
    it across programs, and on CUDA (torch 2.11) that code generation fails for B > 1; this runs
    ATen's cumsum kernel instead, one launch inside the otherwise fused sampler graph."""
    return x.cumsum(dim=-1)


@cumsum_rows.register_fake
def _(x):
    return torch.empty_like(x)


def sample(
    logits: torch.Tensor,  # (B, V) float32
    temperature: torch.Tensor,  # (B,) float32, 0 = greedy
    top_k: torch.Tensor,  # (B,) int64, 0 = off
    top_p: torch.Tensor,  # (B,) float32, 1 = off
    min_p: torch.Tensor,  # (B,) float32, 0 = off
    seed: torch.Tensor,  # (B,) int64
    position: torch.Tensor,  # (B,) int64, position of the token whose logits these are
    sort: bool = True,  # False: no row uses top-k or top-p (the caller knows), so the vocabulary is not sorted
) -> torch.Tensor:
    """Next token per row (B,) int64. Either value of `sort` draws the same token for a row without top-k
    and top-p: the race compares exp(v - max) / E per token id, the same float operations in both."""
    B, V = logits.shape
    greedy = logits.argmax(dim=-1)
    scaled = logits / temperature.clamp_min(1e-6)[:, None]
    # Noise per token id (not per sorted rank), so filters never change which draw a token gets.
    exponential = -hashed_uniform(seed, position, V).log()  # (B, V) ~ Exp(1)
    if not sort:
        # Unnormalised probabilities: the race's argmax does not change by a common factor, and min-p compares
        # with the best token's, which is exp(0) = 1.
        weights = (scaled - scaled.amax(dim=-1, keepdim=True)).exp()
        weights = weights.masked_fill(weights < min_p[:, None], 0.0)
        return torch.where(temperature == 0, greedy, argmax_rows(weights / exponential))
    values, order = scaled.sort(dim=-1, descending=True)  # (B, V), best first
    rank = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k, V)
    values = values.masked_fill(rank >= k[:, None], float("-inf"))
    probs = values.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
    # top_p = 1 is off exactly (as in transformers): over a large vocabulary the float32 cumsum rounds past 1
    # before its last tokens.
    before = cumsum_rows(probs) - probs
    values = values.masked_fill((before >= top_p[:, None]) & (top_p[:, None] < 1), float("-inf"))
    weights = (values - values[:, :1]).exp()  # as without sort: values[:, 0] is the row's maximum
    weights = weights.masked_fill(weights < min_p[:, None], 0.0)
    race = weights / exponential.gather(1, order)
    return torch.where(temperature == 0, greedy, order.gather(1, argmax_rows(race)[:, None])[:, 0])


# Programs a row's argmax is spread over: Inductor gives a (1, V) argmax one program, ~28 us over 32000 tokens
# with the race's hash in it; in pieces every SM takes a share. 1 = a plain argmax.
ARGMAX_PIECES = 64


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) of a (B, V) tensor as the maximum of ARGMAX_PIECES pieces of each row, then of those
    (the first maximum on ties, as argmax)."""
    B, V = x.shape
    if ARGMAX_PIECES == 1:
        return x.argmax(dim=-1)
    n = -(-V // ARGMAX_PIECES)  # tokens a piece
    pieces = torch.nn.functional.pad(x, (0, n * ARGMAX_PIECES - V), value=float("-inf")).view(B, ARGMAX_PIECES, n)
    best, at = pieces.max(dim=-1)  # (B, ARGMAX_PIECES)
    piece = best.argmax(dim=-1, keepdim=True)  # (B, 1)
    return piece[:, 0] * n + at.gather(1, piece)[:, 0]


def params_to_tensors(params: list[SamplingParams], device) -> dict[str, torch.Tensor]:
    """Per-row parameter tensors for `sample`, one row per sequence."""
    return {
        "temperature": torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
        "top_k": torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
        "top_p": torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
        "min_p": torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device),
        "seed": torch.tensor([random.getrandbits(62) if p.seed is None else p.seed for p in params], device=device),
    }
