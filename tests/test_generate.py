"""The Generator (blitzgen.generate) end to end: tokens against transformers' generate(), stopping,
streaming, seeds, prefix reuse, context limits, and torch.compile on CPU.

Every checkpoint directory comes from conftest.py with a real tokenizer saved beside the weights,
and is loaded with blitzgen.generate.load as a user would.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import blitzgen.generate
import blitzgen.model
from blitzgen.errors import BlitzgenError
from blitzgen.generate import Generator, load
from blitzgen.sampling import SamplingParams
from blitzgen.tokenizer import Tokenizer

PROMPT_LENGTHS = (3, 17, 40)  # 17 and 40 are longer than mistral_window's sliding window of 8
NEW_TOKENS = 32


def greedy(max_new_tokens=NEW_TOKENS, **kwargs):
    return SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True, **kwargs)


def make_prompts(lengths=PROMPT_LENGTHS, seed=0, vocab_size=300) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab_size, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module")
def hf_greedy():
    """hf_greedy(hf_model, prompt, n) -> transformers' greedy continuation (memoised per module)."""
    memo = {}

    @torch.no_grad()
    def run(hf_model, prompt, n=NEW_TOKENS):
        key = (id(hf_model), tuple(prompt), n)
        if key not in memo:
            ids = torch.tensor([prompt])
            # The in-memory generation config has no eos (conftest), so this always makes n tokens.
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
            memo[key] = out[0, len(prompt):].tolist()
            assert len(memo[key]) == n
        return memo[key]

    return run


def generator_for(path, **kwargs):
    return load(path, device="cpu", dtype="fp32", **kwargs)


# ---- tokens against transformers -----------------------------------------------------------------


def test_greedy_batch_matches_transformers(tiny_model, hf_greedy):
    hf_model, path = tiny_model
    prompts = make_prompts()
    completions = generator_for(path).generate(prompts, greedy())
    for prompt, completion in zip(prompts, completions):
        assert completion.prompt_token_ids == prompt
        assert completion.token_ids == hf_greedy(hf_model, prompt), f"prompt of {len(prompt)} tokens"
        assert completion.finish_reason == "length"


def test_greedy_rows_unaffected_by_sampled_rows(tiny_models, hf_greedy):
    hf_model, path = tiny_models("llama_gqa2")
    prompts = make_prompts()
    params = [greedy(), SamplingParams(temperature=1.0, max_new_tokens=NEW_TOKENS, seed=3), greedy()]
    completions = generator_for(path).generate(prompts, params)
    for i in (0, 2):
        assert completions[i].token_ids == hf_greedy(hf_model, prompts[i])
    assert len(completions[1].token_ids) == NEW_TOKENS


def test_smaller_batch_after_a_larger_one(tiny_models, hf_greedy):
    """The cache keeps its 3 slots; a batch of 1 then decodes beside idle slots."""
    hf_model, path = tiny_models("qwen3")
    prompts = make_prompts()
    generator = generator_for(path)
    generator.generate(prompts, greedy())
    other = make_prompts(lengths=(11,), seed=5)[0]
    assert generator.generate([other], greedy())[0].token_ids == hf_greedy(hf_model, other)


def test_different_max_new_tokens_in_one_batch(tiny_models, hf_greedy):
    """A long prompt that wants few tokens beside a short one that wants many, in a tight context.

    Each prompt fits the context on its own terms (60 + 4 and 3 + 50 <= 64); the batch must not
    run the long prompt's slot past the end of its cache while the short one is still going.
    """
    hf_model, path = tiny_models("llama_gqa2")
    long_prompt, short_prompt = make_prompts(lengths=(60, 3), seed=6)
    generator = generator_for(path, max_seq_len=64)
    completions = generator.generate([long_prompt, short_prompt], [greedy(4), greedy(50)])
    assert completions[0].token_ids == hf_greedy(hf_model, long_prompt, 4)
    assert completions[1].token_ids == hf_greedy(hf_model, short_prompt, 50)
    assert [c.finish_reason for c in completions] == ["length", "length"]


@pytest.mark.parametrize("variant", ["llama_gqa2", "mistral_window"])
def test_chunked_prefill_in_the_generator(tiny_models, hf_greedy, monkeypatch, variant):
    """Prompts longer than the prefill chunk (shrunk from 2048 to 7 here) prefill chunk by chunk."""
    monkeypatch.setattr(blitzgen.generate, "PREFILL_CHUNK", 7)
    hf_model, path = tiny_models(variant)
    prompts = make_prompts()
    completions = generator_for(path).generate(prompts, greedy(8))
    for prompt, completion in zip(prompts, completions):
        assert completion.token_ids == hf_greedy(hf_model, prompt, 8)


def test_growing_the_batch_keeps_what_slot_0_holds(tiny_models, hf_greedy):
    hf_model, path = tiny_models("llama_gqa2")
    generator = generator_for(path)
    first_prompt, other_a, other_b = make_prompts(seed=13)
    first = generator.generate([first_prompt], greedy(8))[0]
    extended = first_prompt + first.token_ids + [5, 6, 7]
    completions = generator.generate([extended, other_a, other_b], greedy(8))  # the cache grows to 3 slots
    reused = len(first_prompt) + len(first.token_ids) - 1
    assert generator.last_stats.prefilled_tokens == len(extended) - reused + len(other_a) + len(other_b)
    for prompt, completion in zip([extended, other_a, other_b], completions):
        assert completion.token_ids == hf_greedy(hf_model, prompt, 8)


# ---- stopping ------------------------------------------------------------------------------------


def test_max_new_tokens_gives_length(tiny_models):
    path = tiny_models("llama_gqa1")[1]
    generator = generator_for(path)
    prompts = make_prompts()
    for n in (1, 2, 7):
        completions = generator.generate(prompts, greedy(n))
        assert [len(c.token_ids) for c in completions] == [n] * 3
        assert {c.finish_reason for c in completions} == {"length"}
        for c in completions:
            assert c.text == generator.tokenizer.decode(c.token_ids, skip_special_tokens=True)


@pytest.fixture
def eos_model(tiny_models, hf_greedy, tmp_path):
    """The llama_gqa2 checkpoint whose eos id is a token greedy decoding of prompt 1 makes at step >= 5.

    Returns (path, eos_id, the transformers greedy continuations of the three prompts).
    """
    hf_model, saved = tiny_models("llama_gqa2")
    prompts = make_prompts()
    references = [hf_greedy(hf_model, p) for p in prompts]
    tokens = references[1]
    step = next(s for s in range(5, NEW_TOKENS) if tokens[s] not in tokens[:s])
    eos_id = tokens[step]
    path = tmp_path / "eos"
    shutil.copytree(saved, path)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((path / name).read_text())
        config["eos_token_id"] = eos_id
        (path / name).write_text(json.dumps(config))
    return path, eos_id, references


def test_eos_stops_generation(eos_model):
    path, eos_id, references = eos_model
    generator = generator_for(path)
    eos_ids = generator.tokenizer.eos_ids
    assert eos_id in eos_ids
    completions = generator.generate(make_prompts(), SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS))
    stopped = 0
    for completion, reference in zip(completions, references):
        stop = next((i for i, t in enumerate(reference) if t in eos_ids), None)
        if stop is None:
            assert completion.token_ids == reference and completion.finish_reason == "length"
            continue
        stopped += 1
        assert completion.token_ids == reference[: stop + 1]
        assert completion.token_ids[-1] in eos_ids and completion.finish_reason == "stop"
        # The eos token is not part of the text: the text is exactly that of the tokens before it.
        assert completion.text == generator.tokenizer.decode(completion.token_ids[:-1], skip_special_tokens=True)
    assert stopped >= 1 and len(completions[1].token_ids) >= 6


def test_ignore_eos_runs_to_max_new_tokens(eos_model):
    path, eos_id, references = eos_model
    completion = generator_for(path).generate([make_prompts()[1]], greedy())[0]
    assert eos_id in completion.token_ids and completion.token_ids == references[1]
    assert completion.finish_reason == "length"


@pytest.mark.parametrize("stop_length", [1, 3])
def test_stop_string_ends_before_it(tiny_models, stop_length):
    path = tiny_models("llama_gqa1")[1]
    generator = generator_for(path)
    prompt = make_prompts()[1]
    full = generator.generate([prompt], greedy())[0]
    text = full.text
    # A stop string from the second half of the text, free of U+FFFD (incomplete UTF-8 sequences).
    start = next(i for i in range(len(text) // 2, len(text) - stop_length)
                 if "\ufffd" not in text[i : i + stop_length] and text.find(text[i : i + stop_length]) > 0)
    stop = text[start : start + stop_length]
    cut = text.find(stop)

    params = greedy(stop=[stop, "this never appears"])
    events = list(generator.stream([prompt], params))
    completion = generator.generate([prompt], params)[0]
    assert completion.text == text[:cut] and stop not in completion.text
    assert completion.finish_reason == "stop"
    assert completion.token_ids == full.token_ids[: len(completion.token_ids)]
    assert len(completion.token_ids) < NEW_TOKENS
    decode = generator.tokenizer.decode
    # The last token is the one that completed the stop string.
    assert stop in decode(completion.token_ids, skip_special_tokens=True)[cut:]
    assert stop not in decode(completion.token_ids[:-1], skip_special_tokens=True)[cut:]
    # Streaming hands out exactly the final text, and no piece of the stop string on the way.
    assert "".join(e.text for e in events) == completion.text
    assert [e.token_id for e in events] == completion.token_ids
    assert [e.finish_reason for e in events] == [None] * (len(events) - 1) + ["stop"]


def test_streamed_text_matches_final_text_for_a_batch(tiny_models):
    path = tiny_models("mistral_window")[1]
    generator = generator_for(path)
    prompts = make_prompts()
    pieces = {i: [] for i in range(len(prompts))}
    finished = {}
    for event in generator.stream(prompts, greedy()):
        assert event.index not in finished, "event after the sequence finished"
        pieces[event.index].append(event.text)
        if event.finish_reason:
            finished[event.index] = event.finish_reason
    completions = generator.generate(prompts, greedy())
    assert finished == {0: "length", 1: "length", 2: "length"}
    for i, completion in enumerate(completions):
        assert "".join(pieces[i]) == completion.text


# ---- seeds ---------------------------------------------------------------------------------------


def test_seed_reproduces_sampling(tiny_models):
    path = tiny_models("llama_gqa1")[1]  # untied output layer: logits of std ~1, close to uniform
    generator = generator_for(path)
    prompts = make_prompts()

    def tokens(seed, gen=generator):
        params = SamplingParams(temperature=1.0, max_new_tokens=NEW_TOKENS, seed=seed, ignore_eos=True)
        return [c.token_ids for c in gen.generate(prompts, params)]

    first = tokens(1234)
    assert tokens(1234) == first  # same generator, cache now warm: prefix reuse must not change the draws
    assert tokens(1234, generator_for(path)) == first  # a fresh generator
    # 3 x 32 draws over 300 tokens: a different seed repeating all of them is practically impossible.
    assert tokens(4321) != first
    # A seeded request draws the same tokens alone as in a batch, and compiled as eager.
    params = SamplingParams(temperature=1.0, max_new_tokens=NEW_TOKENS, seed=1234, ignore_eos=True)
    assert generator.generate(prompts[1:2], params)[0].token_ids == first[1]
    assert generator_for(path, compile=True).generate(prompts, params)[1].token_ids == first[1]


# ---- prefix reuse --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llama_gqa2", "mistral_window"])
def test_prefix_reuse_prefills_only_new_tokens(tiny_models, hf_greedy, variant):
    hf_model, path = tiny_models(variant)
    generator = generator_for(path)
    first_prompt = make_prompts(lengths=(17,), seed=8)[0]
    first = generator.generate([first_prompt], greedy(8))[0]
    assert generator.last_stats.prefilled_tokens == len(first_prompt)

    # A chat's next turn: the prompt and the reply, then more. The slot holds the prompt and all
    # generated tokens but the last (that one was never fed back), so the prefill starts there.
    extension = make_prompts(lengths=(5,), seed=9)[0]
    second_prompt = first_prompt + first.token_ids + extension
    second = generator.generate([second_prompt], greedy(8))[0]
    held = len(first_prompt) + len(first.token_ids) - 1
    assert generator.last_stats.prefilled_tokens == len(second_prompt) - held
    assert generator.last_stats.prompt_tokens == len(second_prompt)
    fresh = generator_for(path).generate([second_prompt], greedy(8))[0]
    assert second.token_ids == fresh.token_ids == hf_greedy(hf_model, second_prompt, 8)

    # A prompt that diverges from the slot's tokens after 10 of them prefills from there.
    third_prompt = second_prompt[:10] + make_prompts(lengths=(12,), seed=12)[0]
    assert third_prompt[10] != second_prompt[10]
    third = generator.generate([third_prompt], greedy(8))[0]
    assert generator.last_stats.prefilled_tokens == len(third_prompt) - 10
    assert third.token_ids == hf_greedy(hf_model, third_prompt, 8)


# ---- context -------------------------------------------------------------------------------------


def test_prompt_beyond_context_is_an_error_or_truncated(tiny_models, hf_greedy):
    hf_model, path = tiny_models("llama_gqa2")
    generator = generator_for(path, max_seq_len=64)
    prompt = make_prompts(lengths=(60,), seed=11)[0]
    with pytest.raises(BlitzgenError) as info:
        generator.generate([prompt], greedy(8))
    message = str(info.value)
    assert "context" in message and "64" in message and "\n" not in message

    completion = generator.generate([prompt], greedy(8), truncate=True)[0]
    # The end of the prompt is kept, 56 + 8 = 64 tokens: what follows is what follows those 56.
    assert completion.token_ids == hf_greedy(hf_model, prompt[-56:], 8)
    assert generator.last_stats.prompt_tokens == 56
    assert completion.finish_reason == "length"


def test_truncated_completion_reports_the_prompt_it_ran(tiny_models):
    """Completion.prompt_token_ids is the prompt the tokens follow: after truncation, its end."""
    generator = generator_for(tiny_models("llama_gqa2")[1], max_seq_len=64)
    prompt = make_prompts(lengths=(60,), seed=11)[0]
    completion = generator.generate([prompt], greedy(8), truncate=True)[0]
    assert completion.prompt_token_ids == prompt[-56:]


def test_bad_prompts_are_errors(tiny_models):
    generator = generator_for(tiny_models("llama_gqa2")[1])
    for prompts, words in [([[]], ["empty"]), ([[1, 300]], ["300"]), ([], ["no prompts"])]:
        with pytest.raises(BlitzgenError) as info:
            generator.generate(prompts, greedy())
        assert all(w in str(info.value) for w in words)


def test_load_rejects_bad_dtype_and_device(tiny_models):
    path = tiny_models("llama_gqa2")[1]
    with pytest.raises(BlitzgenError, match="fp8"):
        load(path, device="cpu", dtype="fp8")
    with pytest.raises(BlitzgenError, match="tpu"):
        load(path, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BlitzgenError, match="CUDA"):
            load(path, device="cuda")


def test_text_prompts_are_encoded_by_the_checkpoint_tokenizer(tiny_models, hf_greedy):
    hf_model, path = tiny_models("qwen2")
    generator = generator_for(path)
    text = "Once upon a time"
    ids = Tokenizer.from_dir(path).encode(text)
    completion = generator.generate([text], greedy(8))[0]
    assert completion.prompt_token_ids == ids
    assert completion.token_ids == hf_greedy(hf_model, ids, 8)


# ---- torch.compile -------------------------------------------------------------------------------


def test_compiled_decode_matches_eager(tiny_models):
    """torch.compile on CPU (Inductor, C++ backend): the same greedy tokens as eager."""
    path = tiny_models("qwen3")[1]
    prompts = make_prompts()
    eager = generator_for(path, compile=False).generate(prompts, greedy())
    compiled_generator = generator_for(path, compile=True)
    compiled = compiled_generator.generate(prompts, greedy())
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    # A second call reuses the compiled step (and its cache) and must still agree.
    again = compiled_generator.generate(prompts[::-1], greedy())
    assert [c.token_ids for c in again] == [c.token_ids for c in eager[::-1]]


# ---- slot-level API (continuous batching) --------------------------------------------------------


def test_sequences_joining_a_running_batch_match_generating_alone(tiny_models, hf_greedy):
    """Sequences added to slots while others decode produce exactly transformers' greedy tokens."""
    hf_model, path = tiny_models("llama_gqa2")
    prompts = make_prompts()
    generator = generator_for(path)
    generator.open_slots(4, 128)
    params = greedy()
    got = {0: [generator.add_sequence(0, prompts[0], params)]}
    for _ in range(5):  # slot 0 runs ahead alone
        got[0].append(generator.step()[0])
    got[3] = [generator.add_sequence(3, prompts[1], params)]
    got[1] = [generator.add_sequence(1, prompts[2], params)]
    for _ in range(NEW_TOKENS):
        tokens = generator.step()
        for slot in got:
            got[slot].append(tokens[slot])
    for slot, prompt in [(0, prompts[0]), (3, prompts[1]), (1, prompts[2])]:
        assert got[slot][:NEW_TOKENS] == hf_greedy(hf_model, prompt, NEW_TOKENS)
    # A finished slot is reused for a new sequence while the others keep going.
    got[0] = [generator.add_sequence(0, prompts[2], params)]
    for _ in range(NEW_TOKENS - 1):
        got[0].append(generator.step()[0])
    assert got[0] == hf_greedy(hf_model, prompts[2], NEW_TOKENS)


@pytest.mark.parametrize("compile", [False, True])
def test_slot_steps_with_and_without_top_p_neighbours_draw_the_same_tokens(tiny_models, compile):
    """A seeded request in a slot draws what it draws alone (stream()), whether its neighbours make the step
    sort the vocabulary (top-p) or not: the slot API switches between the sorting and the unsorted step
    (compiled: two compiled sampling tails)."""
    path = tiny_models("llama_gqa1")[1]  # logits close to uniform: every draw is a real choice
    prompts = make_prompts()
    plain = SamplingParams(temperature=1.0, max_new_tokens=NEW_TOKENS, seed=11, ignore_eos=True)
    nucleus = SamplingParams(temperature=1.0, top_p=0.8, max_new_tokens=NEW_TOKENS, seed=12, ignore_eos=True)
    generator = generator_for(path, compile=compile)
    alone = generator.generate([prompts[0]], plain)[0].token_ids
    nucleus_alone = generator.generate([prompts[1]], nucleus)[0].token_ids
    generator.open_slots(2, 128)
    got = [generator.add_sequence(0, prompts[0], plain)]
    for _ in range(10):  # no slot sorts: the unsorted step
        got.append(generator.step(rows=1)[0])
    other = [generator.add_sequence(1, prompts[1], nucleus)]
    for _ in range(NEW_TOKENS - 11):  # slot 1 uses top-p: the sorting step for both
        tokens = generator.step()
        got.append(tokens[0])
        other.append(tokens[1])
    assert got == alone
    assert other == nucleus_alone[: len(other)]


@pytest.mark.parametrize("variant", ["llama_gqa2", "mistral_window", "qwen3"])
@pytest.mark.parametrize("rope_kernel", [False, True])
def test_split_kv_attention_kernel_in_the_model_matches_transformers(tiny_models, hf_greedy, variant, rope_kernel,
                                                                    monkeypatch):
    """The decode step with the Triton split-KV kernel (interpreted on CPU; tests/conftest.py sets
    TRITON_INTERPRET=1 without CUDA), and with the RoPE + cache-write kernel too (qwen3's q/k norms
    keep the Inductor path), gives transformers' greedy tokens, eager and compiled."""
    hf_model, path = tiny_models(variant)
    prompts = make_prompts()[:2]
    calls, fused = [], blitzgen.model.rope_cache_write
    for compile in (False, True):
        gen = generator_for(path, attention_kernel=True, compile=compile)
        for layer in gen.model.layers:
            layer.attention.rope_kernel = rope_kernel
        with monkeypatch.context() as patch:
            if not compile:  # count the fused calls eagerly (a patched global would make Dynamo recompile)
                patch.setattr(blitzgen.model, "rope_cache_write", lambda *a: calls.append(1) or fused(*a))
            done = gen.generate(prompts, greedy(12))
        assert [c.token_ids for c in done] == [hf_greedy(hf_model, p, 12) for p in prompts], compile
    assert bool(calls) == (rope_kernel and variant != "qwen3")


@pytest.mark.parametrize("variant", ["llama_bias", "mistral_window", "qwen3"])
def test_gemv_kernels_in_the_model_match_transformers(tiny_models, hf_greedy, variant, monkeypatch):
    """Generator(gemv_kernels=True): a one-sequence decode step's products go through kernels/gemv.py
    (interpreted on CPU), the norms, gate and residual adds fused in (llama_bias: the q/k/v and output
    biases in its epilogue too; qwen3: q/k norms between; the others: RoPE and the cache write in wqkv's
    epilogue), the final norm folded into the output product, and greedy tokens equal transformers', eager
    and compiled. Several sequences take Block.forward's own path and match too."""
    hf_model, path = tiny_models(variant)
    prompts = make_prompts()[:2]
    calls, fused, fused_rope = [], blitzgen.model.gemv, blitzgen.model.gemv_rope_cache
    for compile in (False, True):
        gen = load(path, device="cpu", dtype="fp32", compile=compile)
        gen = Generator(gen.model, gen.tokenizer, compile=compile, attention_kernel=True, gemv_kernels=True)
        assert all(layer.gemv_kernels for layer in gen.model.layers)
        with monkeypatch.context() as patch:
            if not compile:  # count the kernel calls eagerly (a patched global would make Dynamo recompile)
                patch.setattr(blitzgen.model, "gemv", lambda *a, **k: calls.append("gemv") or fused(*a, **k))
                patch.setattr(blitzgen.model, "gemv_rope_cache",
                              lambda *a, **k: calls.append("rope") or fused_rope(*a, **k))
            one = gen.generate(prompts[:1], greedy(12))
            assert one[0].token_ids == hf_greedy(hf_model, prompts[0], 12), compile
            if not compile:  # 11 decode steps x 2 layers x 4 products, and 12 output products (the prefill's
                # last token too); the prefill's layers take the batched path
                assert len(calls) == 11 * 2 * 4 + 12
                assert calls.count("rope") == (0 if variant == "qwen3" else 11 * 2)
            both = gen.generate(prompts, greedy(12))
        assert [c.token_ids for c in both] == [hf_greedy(hf_model, p, 12) for p in prompts], compile


def test_gemv_kernels_stay_off_for_int4_layers_of_fp32_models(tiny_model):
    from blitzgen.quantize import quantize_model

    gen = generator_for(tiny_model[1])
    quantize_model(gen.model, "int4", group_size=32)
    gen = Generator(gen.model, gen.tokenizer, compile=False, gemv_kernels=True)
    assert not any(layer.gemv_kernels for layer in gen.model.layers)


def test_gemv_kernels_read_int4_codes(tiny_models, monkeypatch):
    """A bf16 int4 model's decode steps through kernels/gemv.py (packed codes, group scales and zeros read by the
    kernel, activations rounded to int8 blocks in it; interpreted) give the greedy tokens of Int4Linear's own
    path, which rounds the activations to the same blocks (kernels/gemv_a8.py)."""
    from blitzgen.quantize import quantize_model

    monkeypatch.setattr(blitzgen.model, "GEMV_INT4", True)
    _, path = tiny_models("llama_gqa2")
    prompts = make_prompts()[:1]
    gen = load(path, device="cpu", dtype="bf16", compile=False)
    quantize_model(gen.model, "int4", group_size=32)
    expected = Generator(gen.model, gen.tokenizer, compile=False, gemv_kernels=False).generate(prompts, greedy(8))
    kernels = Generator(gen.model, gen.tokenizer, compile=False, attention_kernel=True, gemv_kernels=True)
    assert all(layer.gemv_kernels for layer in kernels.model.layers)
    assert [c.token_ids for c in kernels.generate(prompts, greedy(8))] == [c.token_ids for c in expected]
    # The flag is read when the kernels are turned on: turning it off later (a bench variant restoring it) leaves
    # this generator's layers on their path instead of failing in them.
    monkeypatch.setattr(blitzgen.model, "GEMV_INT4", False)
    kernels.reset()  # the same prefill again, not only the prompt's last token against the cached rest
    assert [c.token_ids for c in kernels.generate(prompts, greedy(8))] == [c.token_ids for c in expected]


def test_gemv_kernels_read_int8_codes(tiny_models, monkeypatch):
    """An int8 model's decode steps through kernels/gemv.py (codes and scales read by the kernel, interpreted)
    give the greedy tokens of Int8Linear's own path, eager and compiled; the output product (int8 in every
    mode) too."""
    from blitzgen.quantize import quantize_model

    _, path = tiny_models("llama_bias")
    prompts = make_prompts()[:1]
    gen = generator_for(path)
    quantize_model(gen.model, "int8")
    expected = Generator(gen.model, gen.tokenizer, compile=False, gemv_kernels=False).generate(prompts, greedy(12))
    calls, fused = [], blitzgen.model.gemv_rope_cache
    for compile in (False, True):
        kernels = Generator(gen.model, gen.tokenizer, compile=compile, attention_kernel=True, gemv_kernels=True)
        assert all(layer.gemv_kernels for layer in kernels.model.layers)
        with monkeypatch.context() as patch:
            if not compile:
                patch.setattr(blitzgen.model, "gemv_rope_cache", lambda *a, **k: calls.append(k["scales"]) or fused(*a, **k))
            done = kernels.generate(prompts, greedy(12))
        assert [c.token_ids for c in done] == [c.token_ids for c in expected], compile
    assert calls and all(s is not None for s in calls)


# ---- batched prefill ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["llama_gqa2", "mistral_window", "qwen3"])
@pytest.mark.parametrize("chunk, kernel", [(5, False), (5, True), (2048, False)])
def test_prefill_many_equals_one_by_one(tiny_models, variant, chunk, kernel, monkeypatch):
    """Prompts prefilled together (one padded forward) give the same last-token logits and the same
    live K/V as the same prompts prefilled one at a time, including a slot that reuses a cached prefix
    and a prompt whose only new token is its last; with chunk 5 the prompts with more new tokens than
    that go one by one and the rest still together: slots 1 and 4, one new token each, which is the
    decode attention path (kernel=True: the split-KV kernel, interpreted, on the gathered rows).
    fp32: the same products in other batch shapes, 1e-5."""
    monkeypatch.setattr(blitzgen.generate, "PREFILL_CHUNK", chunk)
    _, path = tiny_models(variant)
    prompts = make_prompts([23, 1, 40, 9], seed=3)
    prefix = make_prompts([12], seed=4)[0]
    prompts[3] = prefix + prompts[3]  # slot 3 will hold `prefix` already
    gens = [generator_for(path, attention_kernel=kernel), generator_for(path)]
    for gen in gens:
        gen._ensure_cache(5, 64)
        gen.prefill(3, prefix)
        gen.prefill(4, prompts[2][:39] + [7])  # slot 4 holds all but the last token of a prompt
    slots = [0, 1, 2, 3, 4]
    batch = prompts + [prompts[2][:39] + [8]]
    alone_slots, one = [], gens[0].prefill
    monkeypatch.setattr(gens[0], "prefill", lambda slot, p: alone_slots.append(slot) or one(slot, p))
    together = gens[0].prefill_many(slots, batch)
    new_tokens = [23, 1, 40, 9, 1]  # what each slot does not hold yet
    assert sorted(alone_slots) == [s for s, n in zip(slots, new_tokens) if n > chunk]
    alone = torch.stack([gens[1].prefill(s, p) for s, p in zip(slots, batch)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    for s, p in zip(slots, batch):
        n = len(p)
        for a, b in ((gens[0].cache.k, gens[1].cache.k), (gens[0].cache.v, gens[1].cache.v)):
            torch.testing.assert_close(a[:, s, :n], b[:, s, :n], atol=1e-5, rtol=1e-5)
        assert int(gens[0].cache.lengths[s]) == n and gens[0].slot_tokens[s] == p


def test_prefill_many_past_a_slots_capacity_goes_one_by_one(tiny_models, monkeypatch):
    """A short prompt padded to a long one's length would write past its slot's end when it starts
    deep in a cached prefix: that prompt goes alone (and so, with one left, does the other), with the
    same result."""
    monkeypatch.setattr(blitzgen.generate, "PREFILL_CHUNK", 2048)
    _, path = tiny_models("llama_gqa2")
    gen, ref = generator_for(path), generator_for(path)
    long_prefix = make_prompts([250], seed=5)[0]
    for g in (gen, ref):
        g._ensure_cache(2, 256)
        g.prefill(0, long_prefix)
    batch = [long_prefix + [3, 4, 5], make_prompts([60], seed=6)[0]]  # row 0 begins at 250, padded to 60
    calls = []
    one = gen.prefill
    monkeypatch.setattr(gen, "prefill", lambda slot, p: calls.append(slot) or one(slot, p))
    torch.testing.assert_close(gen.prefill_many([0, 1], batch),
                               torch.stack([ref.prefill(0, batch[0]), ref.prefill(1, batch[1])]), atol=1e-5, rtol=1e-5)
    assert calls == [0, 1]


def test_cpu_generation_without_triton():
    """A CPU-only install may lack Triton (torch's CPU wheels do not ship it): the package still imports, and
    the built-in model generates through the plain-PyTorch paths."""
    script = ("import sys; sys.modules['triton'] = None\n"
              "from blitzgen.generate import load\n"
              "from blitzgen.sampling import SamplingParams\n"
              "out = load(device='cpu').generate([[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))\n"
              "print(len(out[0].token_ids))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "4"
