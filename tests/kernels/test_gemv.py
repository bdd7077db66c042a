"""gemv (Triton, under TRITON_INTERPRET=1 on CPU) against gemv_ref and against transformers' own Llama
RMSNorm / MLP, at sizes that are multiples of no block."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from blitzgen.errors import BlitzgenError
from blitzgen.kernels.gemv import gemv, gemv_ref, gemv_rope_cache, gemv_rope_cache_ref
from blitzgen.model import rope_cos_sin
from kernel_checks import assert_matches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = not torch.cuda.is_available()
EPS = 1e-5


def _rand(*shape, dtype, seed, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + offset).to(dtype).to(DEVICE)


def _fused(M, N, K, dtype, fusion, seed):
    """x (M, K), the weight and gemv's keyword arguments for one fusion: plain, bias, norm, residual, joined
    by '+', or gate_up (with the norm, as the decode step calls it)."""
    gate_up = fusion == "gate_up"
    x = _rand(M, K, dtype=dtype, seed=seed)
    w = _rand(2 * N if gate_up else N, K, dtype=dtype, seed=seed + 1, scale=K ** -0.5)
    kw = {"gate_up": gate_up}
    if "bias" in fusion:
        kw["bias"] = _rand(N, dtype=dtype, seed=seed + 2)
    if "norm" in fusion or gate_up:
        kw.update(norm_weight=_rand(K, dtype=dtype, seed=seed + 3, scale=0.2, offset=1.0), eps=EPS)
    if "residual" in fusion:
        kw["residual"] = _rand(M, N, dtype=dtype, seed=seed + 4)
    return x, w, kw


@pytest.mark.parametrize("N,K", [(37, 300), (5, 1000), (130, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fusion", ["plain", "bias", "norm", "norm+bias", "residual", "bias+residual", "gate_up"])
def test_matches_reference(N, K, dtype, fusion):
    x, w, kw = _fused(1, N, K, dtype, fusion, seed=0)
    assert_matches(gemv(x, w, **kw), gemv_ref(x, w, **kw))


def _int8(w):
    """quantize.py's int8 format of a float weight: codes (N, K) int8 and per-row bf16 scales."""
    from blitzgen.quantize import int8_quantize

    codes, scales = int8_quantize(w.float().cpu())
    return codes.to(DEVICE), scales.to(DEVICE)


def _int4(w, group=64):
    """quantize.py's int4 format of a float weight: packed codes (N, K / 2) uint8, group scales and zeros."""
    from blitzgen.quantize import Int4Linear

    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.float().cpu()
    m = Int4Linear.from_float(linear, group).to(DEVICE)
    return m.packed, m.scales, m.zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fusion", ["bias", "norm", "bias+residual", "gate_up"])
def test_int8_codes_match_reference(monkeypatch, dtype, fusion):
    """int8 weight codes with per-row scales (quantize.Int8Linear's format): the codes made floats in the
    kernel by the conversion path (INT8_WORDS off; fp32 activations always take it), the scales applied to
    the sums. Against gemv_ref, and against the product with the dequantized matrix, which Int8Linear
    stands for."""
    import blitzgen.kernels.gemv as gemv_module

    monkeypatch.setattr(gemv_module, "INT8_WORDS", False)
    monkeypatch.setattr(gemv_module, "INT8_A8", False)
    x, w, kw = _fused(1, 45, 300, dtype, fusion, seed=50)
    codes, scales = _int8(w)
    for blocks in (None, (16, 64, 4)):
        assert_matches(gemv(x, codes, scales=scales, blocks=blocks, **kw), gemv_ref(x, codes, scales=scales, **kw))
    dense = (codes.float() * scales.float()[:, None]).to(dtype)  # exact in fp32; in bf16 one more rounding
    if dtype == torch.float32:
        assert_matches(gemv(x, codes, scales=scales, **kw), gemv_ref(x, dense, **kw))


@pytest.mark.parametrize("fusion", ["bias", "norm", "bias+residual", "gate_up"])
def test_int8_codes_as_words_match_reference(monkeypatch, fusion):
    """gemv.INT8_WORDS: int8 codes read as int32 words and bf16 activations as int64 quads, both made fp32 by bit
    operations. K = 300 and 1000 leave a partial tile of (16, 64) and (4, 1024) blocks; K = 302 is no multiple of
    4 and takes the default path. Every code -128..127 at each of a word's four bytes comes out exactly."""
    import blitzgen.kernels.gemv as gemv_module

    monkeypatch.setattr(gemv_module, "INT8_WORDS", True)
    monkeypatch.setattr(gemv_module, "INT8_A8", False)
    for K, blocks in ((300, (16, 64, 4)), (1000, None), (302, None)):
        x, w, kw = _fused(1, 45, K, torch.bfloat16, fusion, seed=K)
        codes, scales = _int8(w)
        assert_matches(gemv(x, codes, scales=scales, blocks=blocks, **kw), gemv_ref(x, codes, scales=scales, **kw))
    codes = (torch.arange(256 * 4) % 256 - 128).to(torch.int8).view(64, 16)  # row r: codes 16 r .. 16 r + 15
    one_hot = torch.zeros(1, 16)
    for j in range(4):  # x picks column j + 4 of each row: byte j of its second word
        one_hot.zero_()
        one_hot[0, j + 4] = 1.0
        y = gemv(one_hot.to(DEVICE, torch.bfloat16), codes.to(DEVICE), scales=torch.ones(64, dtype=torch.bfloat16,
                 device=DEVICE), blocks=(16, 16, 4))
        assert torch.equal(y.float().cpu()[0], codes[:, j + 4].float())


def test_rope_cache_epilogue_with_int8_words(monkeypatch):
    import blitzgen.kernels.gemv as gemv_module

    monkeypatch.setattr(gemv_module, "INT8_WORDS", True)
    monkeypatch.setattr(gemv_module, "INT8_A8", False)
    x, w, b, kw, cache = _rope_case(6, 2, 20, 152, torch.bfloat16, True, position=3, seed=62)
    codes, scales = _int8(w)
    ref_cache = cache.clone()
    q, _ = gemv_rope_cache(x, codes, b, **kw, scales=scales, blocks=(16, 64, 4))
    q_ref, _ = gemv_rope_cache_ref(x, codes, b, **dict(kw, k_cache=ref_cache[0, 1, 1:2], v_cache=ref_cache[1, 1, 1:2]),
                                   scales=scales)
    assert_matches(q, q_ref)
    assert_matches(cache, ref_cache)


@pytest.mark.parametrize("blocks", [(1, 32, 1), (4, 64, 4), (16, 16, 2), (2, 512, 8)])
def test_block_sizes(blocks):
    # 45 rows, K = 252: every block size leaves a partial row block and a partial K tile.
    x, w = _rand(1, 252, dtype=torch.float32, seed=5), _rand(90, 252, dtype=torch.float32, seed=6, scale=0.06)
    nw = _rand(252, dtype=torch.float32, seed=7, scale=0.2, offset=1.0)
    for kw in (dict(residual=_rand(1, 90, dtype=torch.float32, seed=8)), dict(norm_weight=nw, eps=EPS, gate_up=True)):
        assert_matches(gemv(x, w, blocks=blocks, **kw), gemv_ref(x, w, **kw))


def _hf_layer_half(dim, inter, dtype):
    config = LlamaConfig(hidden_size=dim, intermediate_size=inter, rms_norm_eps=EPS, hidden_act="silu")
    torch.manual_seed(0)
    norm, mlp = LlamaRMSNorm(dim, eps=EPS), LlamaMLP(config)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm.to(DEVICE, dtype), mlp.to(DEVICE, dtype)


@pytest.mark.parametrize("dim,inter", [(64, 176), (96, 40)])
def test_feed_forward_half_matches_transformers(dim, inter):
    """h + LlamaMLP(LlamaRMSNorm(h)) in fp32, as the decode step computes it with two launches."""
    norm, mlp = _hf_layer_half(dim, inter, torch.float32)
    h = _rand(1, dim, dtype=torch.float32, seed=9)
    w13 = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])  # (2 I, C): gate rows first, as FeedForward.w13
    with torch.no_grad():
        expected = h + mlp(norm(h))
        act = gemv(h, w13, norm_weight=norm.weight, eps=EPS, gate_up=True)  # (1, I)
        out = gemv(act, mlp.down_proj.weight, residual=h)
    assert_matches(out, expected)


def test_norm_matches_transformers_in_bf16():
    """In bf16 the norm is folded in after the product, where transformers rounds x * r to bf16 and scales
    it by g in bf16 first: the outputs may differ by that rounding, a few bf16 ulps of each product."""
    dim, N = 256, 64
    norm, _ = _hf_layer_half(dim, 8, torch.bfloat16)
    x = _rand(1, dim, dtype=torch.bfloat16, seed=10, scale=3.0)
    w = _rand(N, dim, dtype=torch.bfloat16, seed=11, scale=dim ** -0.5)
    with torch.no_grad():
        expected = (norm(x).float() @ w.float().t())
    y = gemv(x, w, norm_weight=norm.weight, eps=EPS).float()
    # x * r is rounded to 8 bits (relative 2^-8) and scaled by g, rounded again: each product term carries
    # a relative error up to ~2^-7, and a sum of `dim` terms of random sign grows like sqrt(dim) of them.
    tol = 2 ** -7 * (w.float().abs() @ norm(x).float().abs().t()).max().item()
    assert (y - expected).abs().max().item() <= tol


@pytest.mark.parametrize("call, message", [
    (lambda x, w: gemv(x.expand(2, -1), w), "x (2, 64) and weight (8, 64) must be (1, K) and (N, K)"),
    (lambda x, w: gemv(x, w.half()), "the weight must be x's dtype (torch.float32) without scales, int8 codes"),
    (lambda x, w: gemv(x, w, scales=w[:, 0]), "got torch.float32 with scales"),
    (lambda x, w: gemv(x, w.to(torch.int8)), "int8 weight codes need scales of shape (8,), got None"),
    (lambda x, w: gemv(x, w.to(torch.int8), scales=w[0]), "int8 weight codes need scales of shape (8,), got (64,)"),
    (lambda x, w: gemv(x.long(), w), "x must be bf16, fp16 or fp32, got torch.int64"),
    (lambda x, w: gemv(x, w[:5], gate_up=True), "even number of weight rows"),
    (lambda x, w: gemv(x, w, bias=w[0]), "bias (64,) must be (8,)"),
    (lambda x, w: gemv(x, w, norm_weight=x[0, :3]), "norm_weight (3,) must be (64,)"),
    (lambda x, w: gemv(x, w, residual=x), "residual (1, 64) must be (1, 8)"),
    (lambda x, w: gemv(x, w, blocks=(3, 64, 4)), "must be powers of two"),
])
def test_errors(call, message):
    x, w = _rand(1, 64, dtype=torch.float32, seed=0), _rand(8, 64, dtype=torch.float32, seed=1)
    with pytest.raises(BlitzgenError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(x, w)


def _rope_case(H, Hkv, D, K, dtype, bias, position, seed):
    """x, wqkv, bias and the keyword arguments of gemv_rope_cache; the caches are one sequence's rows of a
    (L, B, S, Hkv, D) cache (strided views, as the model passes them), filled with noise."""
    N = (H + 2 * Hkv) * D
    x = _rand(1, K, dtype=dtype, seed=seed)
    w = _rand(N, K, dtype=dtype, seed=seed + 1, scale=K ** -0.5)
    b = _rand(N, dtype=dtype, seed=seed + 2) if bias else None
    positions = torch.tensor([[position]], device=DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, device=DEVICE).float() / D))
    cos, sin = rope_cos_sin(inv_freq, positions, dtype)  # (1, 1, D)
    cache = _rand(2, 2, 2, 11, Hkv, D, dtype=dtype, seed=seed + 3)  # (k / v, layer, slot, S, Hkv, D)
    kw = dict(norm_weight=_rand(K, dtype=dtype, seed=seed + 4, scale=0.2, offset=1.0), eps=EPS, cos=cos, sin=sin,
              positions=positions, k_cache=cache[0, 1, 1:2], v_cache=cache[1, 1, 1:2], n_heads=H)
    return x, w, b, kw, cache


@pytest.mark.parametrize("H,Hkv,D", [(4, 4, 16), (6, 2, 20), (8, 1, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_rope_cache_epilogue_matches_reference(H, Hkv, D, dtype, bias):
    """gemv_rope_cache against gemv_ref + rope_cache_write_ref: rotated q, lengths, the cache rows written at the
    position and nothing else. MHA / GQA 3 / MQA; D = 20: half a head (10 rows) is not a multiple of the 8 rows
    of a program's half, so the last program of each head is partial. In bf16 the reference rounds the product
    to bf16 before rotating it, the kernel rotates the fp32 sums: two units in the last place."""
    x, w, b, kw, cache = _rope_case(H, Hkv, D, 150, dtype, bias, position=7, seed=30)
    ref_cache = cache.clone()
    ref_kw = dict(kw, k_cache=ref_cache[0, 1, 1:2], v_cache=ref_cache[1, 1, 1:2])
    for blocks in (None, (4, 32, 2)):
        q, lengths = gemv_rope_cache(x, w, b, **kw, blocks=blocks)
        q_ref, lengths_ref = gemv_rope_cache_ref(x, w, b, **ref_kw)
        assert_matches(q, q_ref, ulps=2)
        assert lengths.tolist() == lengths_ref.tolist() == [8] and lengths.dtype == torch.int64
        assert_matches(cache[:, 1, 1, 7], ref_cache[:, 1, 1, 7], ulps=2)  # the token's k and v
        written = torch.zeros(cache.shape[:4], dtype=torch.bool)
        written[:, 1, 1, 7] = True
        assert torch.equal(cache[~written], ref_cache[~written])  # every other row as it was (bit for bit)


def test_rope_cache_epilogue_with_int8_codes():
    x, w, b, kw, cache = _rope_case(6, 2, 20, 150, torch.float32, True, position=3, seed=60)
    codes, scales = _int8(w)
    ref_cache = cache.clone()
    q, lengths = gemv_rope_cache(x, codes, b, **kw, scales=scales)
    q_ref, _ = gemv_rope_cache_ref(x, codes, b, **dict(kw, k_cache=ref_cache[0, 1, 1:2], v_cache=ref_cache[1, 1, 1:2]),
                                   scales=scales)
    assert_matches(q, q_ref)
    assert_matches(cache, ref_cache)


def test_rope_cache_errors():
    x, w, b, kw, _ = _rope_case(4, 2, 16, 64, torch.float32, True, position=0, seed=40)
    with pytest.raises(BlitzgenError, match="shapes do not fit"):
        gemv_rope_cache(x, w[:-16], b, **kw)
    with pytest.raises(BlitzgenError, match="shapes do not fit"):
        gemv_rope_cache(x.expand(2, -1), w, b, **kw)
    with pytest.raises(BlitzgenError, match="the weight must be x's dtype"):
        gemv_rope_cache(x, w.half(), b, **kw)
    with pytest.raises(BlitzgenError, match="int8 weight codes need scales"):
        gemv_rope_cache(x, w.to(torch.int8), b, **kw)
    with pytest.raises(BlitzgenError, match="block_n must be >= 2"):
        gemv_rope_cache(x, w, b, **kw, blocks=(1, 64, 4))


@pytest.mark.parametrize("fusion", ["bias", "norm", "bias+residual", "gate_up"])
def test_int8_activations_match_reference(monkeypatch, fusion):
    """gemv.INT8_A8 (int8 codes) and packed int4 codes: the activations rounded to int8 blocks of 32 in the kernel,
    dp4a products. Against gemv_ref(a8=True), which rounds the same way; both round the output to bf16 and may
    round a code differently at a tie, hence 2 ulps. K = 320 leaves partial tiles; the blocks take 1, 2, 4 and 8
    words a thread (dp4a chains of 1, 2 and 4 words; int4 with 8 codes a word needs 64 words a row for 8)."""
    import blitzgen.kernels.gemv as gemv_module

    monkeypatch.setattr(gemv_module, "INT8_A8", True)
    for K, blocks in ((320, (4, 256, 4, 1)), (320, (8, 256, 2, 2)), (320, (2, 512, 4, 4)), (320, (4, 256, 1, 8)),
                      (1024, None)):
        x, w, kw = _fused(1, 45, K, torch.bfloat16, fusion, seed=K + 7)
        codes, scales = _int8(w)
        assert_matches(gemv(x, codes, scales=scales, blocks=blocks, **kw),
                       gemv_ref(x, codes, scales=scales, a8=True, **kw), ulps=2)
        packed, scales, zeros = _int4(w)
        assert_matches(gemv(x, packed, scales=scales, zeros=zeros, blocks=blocks, **kw),
                       gemv_ref(x, packed, scales=scales, zeros=zeros, a8=True, **kw), ulps=2)


@pytest.mark.parametrize("fmt", ["float", "int8", "int4"])
def test_activations_loaded_ahead_give_the_same_products(monkeypatch, fmt):
    """gemv.X_AHEAD only moves the activation loads one tile earlier: the same arithmetic in the same order, so the
    products are equal bit for bit either way (bf16 codes, int8 codes in the a8 loop, packed int4), for every
    fusion and for the RoPE + cache epilogue. K = 320 ends in a partial tile; (4, 128) tiles give every program
    three of them, N = 19 a partial last program."""
    import blitzgen.kernels.gemv as gemv_module

    def weights(w):
        if fmt == "int8":
            codes, scales = _int8(w)
            return codes, {"scales": scales}
        if fmt == "int4":
            packed, scales, zeros = _int4(w)
            return packed, {"scales": scales, "zeros": zeros}
        return w, {}

    blocks = (4, 128, 4) if fmt == "float" else (4, 128, 4, 2)
    for fusion in ["bias+residual", "gate_up"]:  # without and with the norm weight; the RoPE product below has it too
        x, w, kw = _fused(1, 19, 320, torch.bfloat16, fusion, seed=90)
        weight, quant = weights(w)
        outs = []
        for ahead in (False, True):
            monkeypatch.setitem(gemv_module.X_AHEAD, fmt, ("plain", "norm", "gate_up") if ahead else ())
            outs.append(gemv(x, weight, blocks=blocks, **kw, **quant))
        assert torch.equal(outs[0], outs[1]), fusion
    x, w, b, kw, cache = _rope_case(6, 2, 20, 320, torch.bfloat16, True, position=3, seed=91)
    weight, quant = weights(w)
    results = []
    for ahead in (False, True):
        monkeypatch.setitem(gemv_module.X_AHEAD, fmt, ("norm",) if ahead else ())
        q, _ = gemv_rope_cache(x, weight, b, **kw, **quant, blocks=blocks)
        results.append((q, cache.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_activations_ahead_are_chosen_by_format_and_fusion(monkeypatch):
    import blitzgen.kernels.gemv as gemv_module

    monkeypatch.setitem(gemv_module.X_AHEAD, "int8", ("plain",))
    monkeypatch.setitem(gemv_module.X_AHEAD, "float", ("norm", "gate_up"))
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    codes, floats = torch.zeros(8, 64, dtype=torch.int8), torch.zeros(8, 64, dtype=torch.bfloat16)
    scales = torch.ones(8, dtype=torch.bfloat16)
    chosen = {(fmt, kind): gemv_module._operands(gemv_module._mode(x, w, None), x, w, None, s, None, kind)[3]["X_AHEAD"]
              for fmt, w, s in (("int8", codes, scales), ("float", floats, None))
              for kind in ("plain", "norm", "gate_up")}
    assert chosen == {("int8", "plain"): True, ("int8", "norm"): False, ("int8", "gate_up"): False,
                      ("float", "plain"): False, ("float", "norm"): True, ("float", "gate_up"): True}
