"""SamplingParams validation and the sampler, against transformers' logits warpers.

The sampler draws with an exponential race instead of torch.multinomial, so these tests never
look inside it: they draw many tokens (one row each, in one batch) and compare which tokens
appear, and how often, with the distribution transformers' warpers define.
Frequency tolerances are 5 binomial standard errors, sqrt(p (1 - p) / N), per token: with a few
hundred comparisons the chance of a false alarm is below 1e-4, and the draws are seeded anyway.
"""

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from blitzgen.errors import BlitzgenError
from blitzgen.sampling import SamplingParams, params_to_tensors, sample

DRAWS = 20000


def rows_for(params: list[SamplingParams], seed: int = 0) -> dict[str, torch.Tensor]:
    """sample()'s per-row tensors, every row its own seed (seed, seed + 1, ...), all at position 3."""
    rows = params_to_tensors(params, "cpu")
    rows["seed"] = torch.arange(len(params)) + seed * len(params)
    rows["position"] = torch.full((len(params),), 3)
    return rows


def draw(logits: torch.Tensor, n: int = DRAWS, seed: int = 0, **params) -> torch.Tensor:
    """n tokens from one row of logits (V,), all rows with the same SamplingParams."""
    rows = rows_for([SamplingParams(**params)] * n, seed)
    return sample(logits.float().expand(n, -1).contiguous(), **rows)


def frequencies(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab_size).double() / len(tokens)


def assert_frequencies_match(tokens: torch.Tensor, probs: torch.Tensor):
    """Empirical frequencies within 5 binomial standard errors, and exactly the support of probs."""
    probs = probs.double()
    observed = frequencies(tokens, len(probs))
    assert torch.equal(observed > 0, probs > 0), f"support {observed > 0} != expected {probs > 0}"
    tolerance = 5 * (probs * (1 - probs) / len(tokens)).sqrt()
    excess = (observed - probs).abs() - tolerance
    assert (excess <= 0).all(), f"frequencies {observed.tolist()} vs probabilities {probs.tolist()}"


# ---- SamplingParams ------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5),
    ("temperature", float("nan")),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("min_p", 1.5),
    ("min_p", -0.1),
    ("top_k", -1),
    ("top_k", 2.5),
    ("max_new_tokens", 0),
    ("seed", "42"),
    ("seed", 1.5),
    ("seed", -1),
    ("stop", [""]),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(BlitzgenError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert field in message and "\n" not in message


def test_boundary_params_are_accepted():
    SamplingParams(temperature=0, top_p=1.0, min_p=0.0, top_k=0, max_new_tokens=1, seed=0)
    SamplingParams(min_p=1.0, top_p=1e-6, top_k=1)
    assert SamplingParams(stop="###").stop == ["###"]


def test_validate_catches_later_changes():
    params = SamplingParams()
    params.top_p = 0
    with pytest.raises(BlitzgenError, match="top_p"):
        params.validate()


# ---- greedy --------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax_whatever_the_filters():
    torch.manual_seed(0)
    logits = torch.randn(64, 50)
    params = [SamplingParams(temperature=0, top_k=k, top_p=p, min_p=m)
              for k in (0, 1, 5) for p in (1.0, 0.3) for m in (0.0, 0.5)] * 6
    rows = rows_for(params[:64])
    assert torch.equal(sample(logits, **rows), logits.argmax(dim=-1))


def test_top_k_one_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(1000, 50)
    rows = rows_for([SamplingParams(temperature=1.5, top_k=1)] * 1000)
    assert torch.equal(sample(logits, **rows), logits.argmax(dim=-1))


def test_mixed_greedy_and_sampled_rows():
    torch.manual_seed(0)
    logits = torch.randn(10, 30).repeat(200, 1)  # (2000, 30): 10 distinct rows, 200 times each
    params = [SamplingParams(temperature=0) if i % 2 == 0 else SamplingParams(temperature=1.0)
              for i in range(len(logits))]
    tokens = sample(logits, **rows_for(params))
    greedy = torch.arange(len(logits)) % 2 == 0
    assert torch.equal(tokens[greedy], logits[greedy].argmax(dim=-1))
    # Near-uniform logits at temperature 1: each sampled row of 200 draws takes many values.
    for row in range(1, 10, 2):
        assert len(set(tokens[row::10].tolist())) > 5


# ---- distributions -------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_follow_softmax_of_scaled_logits(temperature):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    tokens = draw(logits, temperature=temperature, seed=1)
    assert_frequencies_match(tokens, (logits / temperature).softmax(-1))


def test_top_k_only_returns_the_k_best():
    torch.manual_seed(0)
    logits = torch.randn(DRAWS, 50)
    rows = rows_for([SamplingParams(temperature=2.0, top_k=5)] * DRAWS)
    tokens = sample(logits, **rows)
    best = logits.topk(5, dim=-1).indices
    assert (best == tokens[:, None]).any(dim=-1).all()
    assert len(set(tokens.tolist())) == 50  # yet every token is somebody's top 5


# Probabilities 0.5, 0.3, 0.15, 0.05, in shuffled order so that the sampler's sort matters.
KNOWN = torch.tensor([0.15, 0.5, 0.05, 0.3])


@pytest.mark.parametrize("top_p, kept", [
    (0.45, [1]),  # 0.5 alone reaches 0.45
    (0.7, [1, 3]),  # 0.5 < 0.7 <= 0.5 + 0.3
    (0.85, [1, 3, 0]),  # 0.8 < 0.85 <= 0.95
    (0.97, [1, 3, 0, 2]),
    (1.0, [1, 3, 0, 2]),
])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    # A token is kept when the mass of the tokens before it is < top_p. The values avoid the exact
    # boundaries (0.5, 0.8, 0.95), where float32 rounding of the cumulative sum would decide.
    expected = torch.zeros(4)
    expected[kept] = KNOWN[kept] / KNOWN[kept].sum()
    assert_frequencies_match(draw(KNOWN.log(), temperature=1.0, top_p=top_p, seed=2), expected)


@pytest.mark.parametrize("min_p, kept", [
    (0.05, [1, 3, 0, 2]),  # threshold 0.025
    (0.2, [1, 3, 0]),  # threshold 0.1 removes 0.05
    (0.5, [1, 3]),  # threshold 0.25 removes 0.15
    (0.9, [1]),
])
def test_min_p_removes_tokens_below_min_p_times_the_best(min_p, kept):
    expected = torch.zeros(4)
    expected[kept] = KNOWN[kept] / KNOWN[kept].sum()
    assert_frequencies_match(draw(KNOWN.log(), temperature=1.0, min_p=min_p, seed=3), expected)


def transformers_probabilities(logits, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """The distribution transformers' generate(do_sample=True) samples from, warpers in its order."""
    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    if min_p:
        warpers.append(MinPLogitsWarper(min_p))
    scores = logits[None].clone()
    for warper in warpers:
        scores = warper(None, scores)
    return scores[0].softmax(-1)


def test_filters_match_transformers_warpers():
    """Random logits and random filter combinations: same support, same probabilities."""
    generator = torch.Generator().manual_seed(4)
    vocab_size = 8
    filtered = 0
    for case in range(24):
        # Logits in [-1, 1] at temperature >= 0.5: every token has probability >= e^-4 / 8 = 0.0023,
        # so a token in the support shows up in 20000 draws except with probability < e^-45.
        logits = torch.rand(vocab_size, generator=generator) * 2 - 1
        pick = lambda options: options[torch.randint(len(options), (1,), generator=generator).item()]  # noqa: E731
        params = dict(temperature=pick([0.5, 0.8, 1.0, 1.7]), top_k=pick([0, 0, 2, 5]),
                      top_p=pick([1.0, 1.0, 0.3, 0.6, 0.9]), min_p=pick([0.0, 0.0, 0.2, 0.6]))
        expected = transformers_probabilities(logits, **params)
        tokens = draw(logits, seed=case, **params)
        try:
            assert_frequencies_match(tokens, expected)
        except AssertionError as error:
            raise AssertionError(f"case {case}, {params}: {error}") from None
        filtered += bool((expected == 0).any())
    assert filtered >= 12  # most cases do remove tokens, so the support comparison means something


def test_same_seed_same_draws():
    logits = torch.randn(50)
    first = draw(logits, n=100, seed=7, temperature=1.0)
    assert torch.equal(first, draw(logits, n=100, seed=7, temperature=1.0))
    assert not torch.equal(first, draw(logits, n=100, seed=8, temperature=1.0))


def test_low_temperature_concentrates_on_the_best():
    logits = torch.tensor([1.0, 0.9, 0.0])
    tokens = draw(logits, temperature=0.01, seed=5)
    # The runner-up has relative mass exp(-0.1 / 0.01) = 4.5e-5: about 0.9 of 20000 draws (Poisson);
    # 10 or more happens with probability below 1e-8. The third token, exp(-100), never.
    assert (tokens == 2).sum() == 0
    assert (tokens == 1).sum() < 10


def test_a_draw_depends_only_on_seed_position_and_logits():
    """The noise is keyed by (seed, position, token id): batch neighbours and row order change nothing."""
    logits = torch.randn(6, 40)
    rows = rows_for([SamplingParams(temperature=1.0)] * 6)
    alone = torch.cat([sample(logits[i : i + 1], **{k: v[i : i + 1] for k, v in rows.items()}) for i in range(6)])
    assert torch.equal(sample(logits, **rows), alone)
    flipped = {k: v.flip(0) for k, v in rows.items()}
    assert torch.equal(sample(logits.flip(0), **flipped), alone.flip(0))
    moved = dict(rows, position=rows["position"] + 1)
    assert not torch.equal(sample(logits, **moved), alone)  # 6 draws from 40 tokens: equal w.p. ~1e-7


def test_hashed_uniform_is_uniform_and_compiles_identically():
    from blitzgen.sampling import hashed_uniform

    u = hashed_uniform(torch.tensor([0, 1, 2**61]), torch.tensor([0, 5, 9]), 100_000)  # (3, 100000)
    # 300000 draws: the mean has standard error 0.29 / sqrt(3e5) = 5.3e-4; allow 5 of them.
    assert abs(u.mean().item() - 0.5) < 2.7e-3 and abs(u.std().item() - 12**-0.5) < 2.7e-3
    assert 0 < u.min() and u.max() < 1
    # Ten equal-width bins, 30000 expected each (standard deviation 164): within 5 standard deviations.
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert (counts - 30000).abs().max() < 820
    compiled = torch.compile(hashed_uniform)(torch.tensor([0, 1, 2**61]), torch.tensor([0, 5, 9]), 100_000)
    assert torch.equal(u, compiled)  # same integer arithmetic in Inductor's generated code


def test_compiled_sample_draws_what_eager_draws():
    """The decode step compiles sample() (fullgraph, with the cumsum as an opaque op): same tokens as eager
    for rows mixing every filter. A float difference could only flip a token sitting exactly on a filter
    boundary or a near-tie of the race; with random logits over 1000 tokens that is practically impossible."""
    torch.manual_seed(0)
    logits = torch.randn(64, 1000) * 3
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)
              for t, k, p, m in zip([0.0, 0.7, 1.0, 1.3] * 16, [0, 0, 5, 50, 0, 200, 0, 1] * 8,
                                    [1.0, 0.9, 0.5, 1.0, 0.95, 1.0, 0.3, 1.0] * 8, [0.0, 0.0, 0.1, 0.0] * 16)]
    rows = rows_for(params)
    compiled = torch.compile(sample, fullgraph=True, dynamic=False)
    eager = sample(logits, **rows)
    assert torch.equal(compiled(logits, **rows), eager)
    assert len(set(eager.tolist())) > 16  # the rows really draw different tokens
    unfiltered = [SamplingParams(temperature=p.temperature, min_p=p.min_p) for p in params]
    rows = rows_for(unfiltered)
    assert torch.equal(compiled(logits, **rows, sort=False), sample(logits, **rows, sort=False))


def test_sampling_without_sort_draws_what_the_sorting_sampler_draws():
    """sort=False (no row uses top-k or top-p) must give exactly the tokens of the sorting path, for any
    temperature and min-p: a seeded request's text may not depend on whether a neighbour in its batch sorts."""
    torch.manual_seed(1)
    logits = torch.randn(200, 3000) * torch.rand(200, 1) * 8  # peaked to flat rows
    params = [SamplingParams(temperature=t, min_p=m) for t, m in zip([0.0, 0.3, 0.8, 1.0, 2.0] * 40,
                                                                     [0.0, 0.0, 0.05, 0.3] * 50)]
    for position in range(3):
        rows = dict(rows_for(params, seed=position), position=torch.full((200,), position))
        sorted_draws = sample(logits, **rows)
        assert torch.equal(sample(logits, **rows, sort=False), sorted_draws)
    assert len(set(sorted_draws.tolist())) > 100


def test_top_p_one_keeps_every_token(monkeypatch):
    """top_p = 1 is off: the cumulative sum's rounding reaching 1 early must not drop the least likely token."""
    from blitzgen import sampling

    logits = torch.zeros(1, 32000)
    logits[0, 0], logits[0, 7] = 5.0, -8.0  # token 7 comes last, after a float32 cumsum that rounds past 1
    # Token 7's noise made so small that it wins the race whenever it is still in it.
    monkeypatch.setattr(sampling, "hashed_uniform",
                        lambda seed, position, v: torch.where(torch.arange(v) == 7, 1 - 2.0**-24, 0.5)[None, :])
    rows = rows_for([SamplingParams(temperature=1.0)])
    assert sample(logits, **rows).item() == 7
    assert sample(logits, **rows, sort=False).item() == 7
    assert sample(logits, **dict(rows, top_p=torch.tensor([0.999]))).item() != 7  # a real top-p drops it


@pytest.mark.parametrize("vocab_size", [1, 63, 64, 65, 1000, 32001])
def test_argmax_rows_is_argmax(vocab_size):
    from blitzgen.sampling import argmax_rows

    x = torch.randn(5, vocab_size)
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    x[:, vocab_size // 2 :] = x.max() + 1  # ties: the first maximum, as argmax
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


def test_only_sampled_requests_with_top_k_or_top_p_sort():
    assert not SamplingParams().sorts  # the defaults: temperature 0.8, top-k and top-p off
    assert SamplingParams(top_k=5).sorts and SamplingParams(top_p=0.9).sorts
    assert not SamplingParams(temperature=0, top_k=5, top_p=0.9).sorts  # greedy takes the argmax
    assert not SamplingParams(min_p=0.1).sorts  # min-p compares with the best token: no sort
