"""quantize.py: round-trip bounds, forward against dequantize() + matmul at awkward shapes, whole models
(the default model and tiny transformers checkpoints with biases and tied embeddings), quantized
checkpoints written and reloaded, and the one-line errors of the CLI."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import blitzgen
from blitzgen import quantize as quant
from blitzgen.checkpoint import save_quantized
from blitzgen.cli import main
from blitzgen.errors import BlitzgenError
from blitzgen.generate import DEFAULT_MODEL
from blitzgen.quantize import (Int4Linear, Int8Linear, check_mode, pack_int4, quantization_metadata,
                               quantize_model, unpack_int4)

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"


def random_linear(N, K, bias=False, seed=0):
    """Weights of std 1/sqrt(K) plus what stresses a quantizer: an all-zero row, a row with one
    outlier, a row of one constant value, a row of negative values only."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(K, N, bias=bias)
    w = torch.randn(N, K, generator=g) * K**-0.5
    w[0] = 0
    w[1, 5] = 40 * K**-0.5
    w[2] = 0.3
    w[3] = -w[3].abs() - 0.1
    linear.weight.data = w
    if bias:
        linear.bias.data = torch.randn(N, generator=g)
    return linear.requires_grad_(False)


def test_int8_round_trip_within_half_a_step():
    linear = random_linear(37, 300)
    m = Int8Linear.from_float(linear)
    assert m.weight.dtype == torch.int8 and m.scales.dtype == torch.bfloat16
    w, scales = linear.weight, m.scales.float()
    assert (scales >= w.abs().amax(1) / 127).all()  # rounded up: nothing is clipped
    # Within half a step; the 1e-6 relative slack is the fp32 rounding of w / s.
    assert ((w - m.dequantize()).abs() <= scales[:, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_within_half_a_step(group_size):
    linear = random_linear(19, 384, seed=group_size)
    m = Int4Linear.from_float(linear, group_size)
    assert m.packed.shape == (19, 192) and m.packed.dtype == torch.uint8
    assert m.scales.shape == m.zeros.shape == (19, 384 // group_size)
    step = m.scales.float().repeat_interleave(group_size, dim=1)  # (N, K): each weight's group scale
    groups = linear.weight.view(19, -1, group_size)
    assert (m.zeros.float() <= groups.amin(-1)).all()  # zero point rounded down, scale up: no clipping
    assert (m.zeros.float() + 15 * m.scales.float() >= groups.amax(-1)).all()
    assert ((linear.weight - m.dequantize()).abs() <= step / 2 * (1 + 1e-6)).all()


def test_pack_unpack_inverse():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    assert pack_int4(codes)[0, 0] == codes[0, 0] | (codes[0, 1] << 4)  # even k low nibble, odd k high


def _compare(y, ref):
    if y.dtype == torch.float32:
        # Same products summed in another order (and, for int8, the scale applied after the sum).
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    else:
        # A half-precision matmul of half-precision inputs: a few units in the last place.
        eps = torch.finfo(y.dtype).eps
        torch.testing.assert_close(y.float(), ref.float(), rtol=4 * eps, atol=4 * eps * ref.float().abs().max().item())


def _module(kind, linear):
    return Int8Linear.from_float(linear) if kind == "int8" else Int4Linear.from_float(linear, 32)


# Rows 1, 3, 8 and 20 take the decode path on CUDA, 40 the prefill path; N = 37 matches no block size.
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 8), (2, 10), (4, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_dequantize_matmul(kind, shape, dtype):
    linear = random_linear(37, 96, bias=True)
    m = _module(kind, linear).to(dtype=None)
    m.bias = m.bias.to(dtype)
    x = torch.randn(*shape, 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = F.linear(x.float(), m.dequantize(), m.bias.float()).to(dtype)
    _compare(m(x), ref)


@pytest.mark.skipif(not quant.HAVE_TRITON, reason="needs triton (its interpreter on CPU)")
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 8, 20, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_kernel_paths(monkeypatch, kind, rows, dtype):
    # What forward() runs on CUDA (GEMV kernels up to DECODE_MAX_ROWS = 32 rows, the dequantize kernels +
    # matmul past that), here under TRITON_INTERPRET=1 (no bf16: the interpreter's bf16 tl.dot is wrong).
    # The weight-only kernels: the one-row int8-activation paths are test_forward_activations_int8's.
    monkeypatch.setattr(quant, "_kernels_apply", lambda x: True)
    monkeypatch.setattr(quant, "INT8_ACTIVATIONS_INT8", False)
    monkeypatch.setattr(quant, "INT4_ACTIVATIONS_INT8", False)
    linear = random_linear(37, 128, bias=True, seed=rows)
    m = _module(kind, linear)
    m.bias = m.bias.to(dtype)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(2)).to(dtype)
    _compare(m(x), F.linear(x.float(), m.dequantize(), m.bias.float()).to(dtype))


@pytest.mark.skipif(not quant.HAVE_TRITON, reason="needs triton (its interpreter on CPU)")
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows,dtype", [(1, torch.float16), (1, torch.bfloat16), (8, torch.float16),
                                        (1, torch.float32)])
def test_forward_activations_int8(monkeypatch, kind, rows, dtype):
    # *_ACTIVATIONS_INT8: 16-bit one-row steps take gemv_a8 (x rounded to int8 blocks), so they equal its
    # exactly computed reference; several rows or float32 keep the weight-only kernels.
    from blitzgen.kernels.gemv_a8 import int4_gemv_a8_ref, int8_gemv_a8_ref, quantize_activations

    monkeypatch.setattr(quant, "_kernels_apply", lambda x: True)
    monkeypatch.setattr(quant, "INT8_ACTIVATIONS_INT8", True)  # the defaults, set here for the test's sake
    monkeypatch.setattr(quant, "INT4_ACTIVATIONS_INT8", True)
    linear = random_linear(37, 128, bias=True, seed=rows)
    m = _module(kind, linear)
    m.bias = m.bias.to(dtype)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(2)).to(dtype)
    if rows > 1 or dtype == torch.float32:
        want = F.linear(x.float(), m.dequantize(), m.bias.float()).to(dtype)
    elif kind == "int8":
        want = int8_gemv_a8_ref(*quantize_activations(x)[:2], m.weight, m.scales, m.bias, dtype)
    else:
        want = int4_gemv_a8_ref(*quantize_activations(x, sums=True), m.packed, m.scales, m.zeros, m.bias, dtype)
    _compare(m(x), want)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("compiled", [False, True])
def test_one_row_expressions_match_dequantize_matmul(kind, compiled):
    """The plain expressions handed to Inductor for one-row decode (ONE_ROW_BY_INDUCTOR), eager and
    compiled (on the CPU here), compute the module's product. fp32 sums in another order: 1e-5."""
    linear = random_linear(37, 256, bias=False, seed=3)
    m = _module(kind, linear)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(4))
    if kind == "int8":
        fn, args = quant.int8_one_row, (m.weight, m.scales)
    else:
        fn, args = quant.int4_one_row, (m.packed, m.scales, m.zeros)
    fn = torch.compile(fn, fullgraph=True) if compiled else fn
    torch.testing.assert_close(fn(x, *args), F.linear(x, m.dequantize()), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not quant.HAVE_TRITON, reason="needs triton")
def test_kernel_references_agree_with_the_modules():
    from blitzgen.kernels.dequantize import int4_dequantize_ref, int8_dequantize_ref
    from blitzgen.kernels.int8_gemv import int8_gemv_ref

    linear = random_linear(37, 256, bias=True)
    m8, m4 = Int8Linear.from_float(linear), Int4Linear.from_float(linear, 64)
    x = torch.randn(3, 256)
    _compare(int8_gemv_ref(x, m8.weight, m8.scales, m8.bias), F.linear(x, m8.dequantize(), m8.bias))
    assert torch.equal(int4_dequantize_ref(m4.packed, m4.scales, m4.zeros), m4.dequantize())
    assert torch.equal(int8_dequantize_ref(m8.weight, m8.scales), m8.dequantize())


def test_bad_modes_and_group_sizes():
    assert check_mode("int8", None) is None and check_mode("int4", None) == 128 and check_mode("int4-gptq", 32) == 32
    with pytest.raises(BlitzgenError, match="--mode 'int3'"):
        check_mode("int3", None)
    with pytest.raises(BlitzgenError, match="--group-size 100"):
        check_mode("int4", 100)
    with pytest.raises(BlitzgenError, match="int4 modes only"):
        check_mode("int8", 64)
    with pytest.raises(BlitzgenError, match="not a multiple of the group size"):
        Int4Linear.from_float(random_linear(8, 100), 32)


@pytest.fixture(scope="module")
def default_logits():
    gen = blitzgen.load(dtype="fp32")  # fp32 on a GPU too: the bound below is about quantization alone
    ids = gen.tokenizer.encode(PROMPT)
    return ids, gen.logits(ids)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_default_model_quantized_end_to_end(mode, default_logits):
    ids, float_logits = default_logits
    gen = blitzgen.load(quantize=mode, dtype="fp32")
    model = gen.model
    for name in quant.block_linear_names(model):
        assert isinstance(model.get_submodule(name), Int8Linear if mode == "int8" else Int4Linear)
    assert isinstance(model.output, Int8Linear) and type(model.tok_embeddings) is nn.Embedding
    assert model.tok_embeddings.weight.dtype == torch.float32 and gen.dtype == torch.float32
    meta = quantization_metadata(model)
    assert meta["linears"] == mode and meta["output"] == "int8" and meta["group_size"] == (128 if mode == "int4" else None)
    # Quantization moves the logits a little, not a lot (relative to their spread over the vocabulary).
    error = (gen.logits(ids) - float_logits).norm() / float_logits.norm()
    assert error < (0.02 if mode == "int8" else 0.15)
    done = gen.generate([PROMPT, "JULIET:"], blitzgen.SamplingParams(temperature=0, max_new_tokens=12))
    assert all(len(c.token_ids) == 12 and c.text for c in done)
    with pytest.raises(BlitzgenError, match="already quantized"):
        quantize_model(model, "int8")


@pytest.mark.parametrize("variant", ["llama_bias", "qwen2"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_biases_and_tied_embeddings(tiny_models, variant, mode, tmp_path):
    # llama_bias: biases on q/k/v and o; qwen2: q/k/v bias and a tied output projection.
    hf_model, path = tiny_models(variant)
    ids = list(range(3, 40))
    gen = blitzgen.load(path, device="cpu", dtype="fp32")
    model = quantize_model(gen.model, mode, 32 if mode == "int4" else None)
    assert model.layers[0].attention.wqkv.bias is not None
    # The oracle: the float model with every quantized matrix replaced by its dequantize() (which
    # unties a tied output projection from the embedding, as quantization does), biases untouched.
    oracle = blitzgen.load(path, device="cpu", dtype="fp32")
    for name in quant.block_linear_names(model) + ["output"]:
        oracle.model.get_submodule(name).weight = nn.Parameter(model.get_submodule(name).dequantize())
    # fp32, the same products in another order (int8 scales its outputs instead of its weights).
    torch.testing.assert_close(gen.logits(ids), oracle.logits(ids), rtol=1e-4, atol=1e-4)
    # Written and reloaded (in another dtype too), the same numbers.
    save_quantized(model, path, tmp_path / "q", {"mode": mode, **quantization_metadata(model), "method": "rtn"})
    assert torch.equal(blitzgen.load(tmp_path / "q", device="cpu", dtype="fp32").logits(ids), gen.logits(ids))
    reloaded = blitzgen.load(tmp_path / "q", device="cpu", dtype="bf16")
    assert reloaded.model.layers[0].attention.wqkv.bias.dtype == torch.bfloat16


@pytest.mark.parametrize("mode,group_size", [("int8", None), ("int4", 64)])
def test_cli_checkpoint_reloads_with_identical_logits(tmp_path, capsys, mode, group_size, default_logits):
    ids, _ = default_logits
    out = tmp_path / mode
    args = ["quantize", "--mode", mode, "--out", str(out)] + (["--group-size", str(group_size)] if group_size else [])
    assert main(args) == 0
    hf = json.loads((out / "config.json").read_text())
    assert hf["quantization"]["mode"] == mode and hf["quantization"]["group_size"] == group_size
    assert hf["quantization"]["linears"] == mode and hf["quantization"]["method"] == "rtn"
    assert (out / "tokenizer.json").is_file() and not (out / "calib.txt.gz").exists()
    in_memory = blitzgen.load(quantize=mode if mode == "int8" else None)
    if mode == "int4":
        quantize_model(in_memory.model, "int4", group_size)
    reloaded = blitzgen.load(out)  # no mode given: read from config.json
    assert type(reloaded.model.output) is Int8Linear
    assert torch.equal(reloaded.logits(ids), in_memory.logits(ids))
    with pytest.raises(BlitzgenError, match="already quantized"):
        blitzgen.load(out, quantize="int8")
    assert main(["generate", "--model", str(out), "--prompt", "JULIET:", "--max-new-tokens", "5"]) == 0


def one_line_error(capsys, *args):
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("blitzgen: error: ") and "Traceback" not in "".join(err)
    return err[-1]


def test_cli_errors_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "--mode 'int5'" in one_line_error(capsys, "quantize", "--mode", "int5", "--out", out)
    assert "--group-size 48" in one_line_error(capsys, "quantize", "--mode", "int4", "--group-size", "48", "--out", out)
    assert "--group-size applies" in one_line_error(capsys, "quantize", "--mode", "int8", "--group-size", "64",
                                                    "--out", out)
    assert "missing.txt: no such file" in one_line_error(capsys, "quantize", "--mode", "int4-gptq", "--calib",
                                                         str(tmp_path / "missing.txt"), "--out", out)
    assert "int4-gptq only" in one_line_error(capsys, "quantize", "--mode", "int8", "--calib", "x", "--out", out)
    assert "not an empty directory" in one_line_error(capsys, "quantize", "--mode", "int8", "--out", str(DEFAULT_MODEL))
    assert "--quantize 'int3'" in one_line_error(capsys, "generate", "--quantize", "int3", "--prompt", "a")
