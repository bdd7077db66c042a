"""blitzgen.model.Transformer against transformers' own models, on every tiny variant of conftest.py.

transformers runs each whole sequence at once, without a cache or padding; blitzgen prefills each
prompt into its own cache slot and then decodes all slots together, as the Generator does. The
logits of every position must agree.
"""

import pytest
import torch

from blitzgen.cache import KVCache
from blitzgen.checkpoint import load_model

PROMPT_LENGTHS = (3, 17, 40)  # 17 and 40 are longer than mistral_window's sliding window of 8
DECODE_STEPS = 6
CACHE_LEN = 64
# fp32 on both sides; the two differ only in the order of operations (fused q/k/v and gate/up
# products, SDPA or the grouped einsum against eager matmul + softmax). Measured differences are
# below 1e-5 on logits of std 1-2; every feature under test (window, RoPE scaling, biases, norms)
# moves the logits by more than 0.5, so 1e-4 leaves headroom for rounding and none for a bug.
ATOL = 1e-4


def sequences(vocab_size: int):
    """Three prompts of different lengths and DECODE_STEPS further tokens for each (fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab_size, (n,), generator=generator) for n in PROMPT_LENGTHS]
    continuations = torch.randint(0, vocab_size, (len(prompts), DECODE_STEPS), generator=generator)
    return prompts, continuations


@torch.no_grad()
def reference_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' logits (L, V) for one whole sequence (L,)."""
    return hf_model(tokens[None]).logits[0]


def noisy_cache(config, batch_size: int) -> KVCache:
    """A cache full of noise: positions past a slot's length must never be read."""
    cache = KVCache(config, batch_size=batch_size, max_seq_len=CACHE_LEN, dtype=torch.float32, device="cpu")
    generator = torch.Generator().manual_seed(1)
    cache.k.normal_(generator=generator)
    cache.v.normal_(generator=generator)
    return cache


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor, what: str):
    diff = (ours - theirs).abs().max().item()
    assert diff < ATOL, f"{what}: max |blitzgen - transformers| = {diff:.3g}"


@torch.inference_mode()
def test_prefill_and_batched_decode_match_transformers(tiny_model):
    hf_model, path = tiny_model
    model = load_model(path, dtype=torch.float32)
    config = model.config
    prompts, continuations = sequences(config.vocab_size)
    references = [reference_logits(hf_model, torch.cat([p, c])) for p, c in zip(prompts, continuations)]
    cache = noisy_cache(config, len(prompts))

    for slot, prompt in enumerate(prompts):
        T = len(prompt)
        fits_window = config.sliding_window is None or T <= config.sliding_window
        logits = model(
            prompt[None],
            torch.arange(T)[None],
            cache,
            slots=slice(slot, slot + 1),
            kv_len=T,
            causal_from_zero=fits_window,
        )  # (1, T, V)
        assert logits.shape == (1, T, config.vocab_size)
        assert_logits_close(logits[0], references[slot][:T], f"prefill of prompt {slot} ({T} tokens)")
        cache.lengths[slot] = T

    for step in range(DECODE_STEPS):
        # Alternate between attending over the whole cache and over the tight live bound.
        kv_len = None if step % 2 == 0 else int(cache.lengths.max()) + 1
        logits = model(continuations[:, step : step + 1], cache.lengths[:, None], cache, kv_len=kv_len)  # (3, 1, V)
        for slot, prompt in enumerate(prompts):
            position = len(prompt) + step
            assert_logits_close(logits[slot, 0], references[slot][position], f"decode step {step}, slot {slot}")
        cache.lengths += 1


@pytest.mark.parametrize("ends", [(40,), (1, 40), (9, 40), (20, 33, 40)], ids=lambda e: "-".join(map(str, e)))
@torch.inference_mode()
def test_chunked_prefill_matches_transformers(tiny_model, ends):
    """Prefill in chunks [0, e1), [e1, e2), ... through the masked path (causal_from_zero=False)."""
    hf_model, path = tiny_model
    model = load_model(path, dtype=torch.float32)
    prompt = sequences(model.config.vocab_size)[0][2]  # the 40-token prompt
    assert ends[-1] == len(prompt)
    reference = reference_logits(hf_model, prompt)
    cache = noisy_cache(model.config, 3)
    slot = 1  # a slot other than the first: rows of the cache must not mix

    begin = 0
    for end in ends:
        logits = model(
            prompt[None, begin:end],
            torch.arange(begin, end)[None],
            cache,
            slots=slice(slot, slot + 1),
            kv_len=end,
            causal_from_zero=False,
        )  # (1, end - begin, V)
        assert_logits_close(logits[0], reference[begin:end], f"chunk [{begin}, {end})")
        begin = end


@torch.inference_mode()
def test_last_only_returns_the_last_position(tiny_models):
    hf_model, path = tiny_models("mistral_window")
    model = load_model(path, dtype=torch.float32)
    prompt = sequences(model.config.vocab_size)[0][1]
    cache = noisy_cache(model.config, 1)
    logits = model(prompt[None], torch.arange(len(prompt))[None], cache, kv_len=len(prompt), last_only=True)
    assert logits.shape == (1, 1, model.config.vocab_size)
    assert_logits_close(logits[0, 0], reference_logits(hf_model, prompt)[-1], "last_only prefill")


@torch.inference_mode()
def test_gemv_decode_matches_transformers(tiny_model):
    """Block.gemv_decode (kernels/gemv.py, interpreted on CPU: the norms, gate, biases and residual adds fused
    into the four products, the final norm into the output product, RoPE and the cache write in wqkv's
    epilogue; for qwen3's q/k norms the unfused wqkv + attend() branch) decodes one sequence to transformers'
    logits."""
    hf_model, path = tiny_model
    model = load_model(path, dtype=torch.float32)
    for layer in model.layers:
        layer.gemv_kernels = True
        layer.attention.decode_kernel = True
    prompts, continuations = sequences(model.config.vocab_size)
    prompts, continuations = prompts[1:2], continuations[1:2]  # 17 tokens: past mistral_window's window of 8
    batch = 1
    references = [reference_logits(hf_model, torch.cat([p, c])) for p, c in zip(prompts, continuations)]
    cache = noisy_cache(model.config, batch)
    for slot, prompt in enumerate(prompts):
        model(prompt[None], torch.arange(len(prompt))[None], cache, slots=slice(slot, slot + 1), kv_len=len(prompt))
        cache.lengths[slot] = len(prompt)
    for step in range(DECODE_STEPS):
        logits = model(continuations[:, step : step + 1], cache.lengths[:, None], cache)  # (batch, 1, V)
        for slot, prompt in enumerate(prompts):
            position = len(prompt) + step
            assert_logits_close(logits[slot, 0], references[slot][position], f"gemv decode step {step}, slot {slot}")
        cache.lengths += 1
