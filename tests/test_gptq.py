"""gptq.py: GPTQ beats round-to-nearest on the error it minimises; the whole-model pass; calibration text."""

import gzip

import pytest
import torch
import torch.nn as nn

import blitzgen
from blitzgen.checkpoint import save_quantized
from blitzgen.errors import BlitzgenError
from blitzgen.gptq import (DEFAULT_CALIBRATION, calibration_tokens, gptq_quantize_weight, quantize_gptq,
                           read_calibration_text)
from blitzgen.quantize import Int4Linear, Int8Linear, block_linear_names, quantization_metadata


def correlated_layer(N=96, K=256, rows=4096, seed=0):
    """A random weight and inputs whose features are correlated and unequally active, as a
    transformer's activations are (GPTQ's gain comes from exactly that structure)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(K, K, generator=g) / K**0.5
    X = (torch.randn(rows, K, generator=g) @ mixing + 0.1 * torch.randn(rows, K, generator=g))
    X = X * torch.linspace(0.2, 3.0, K)
    W = torch.randn(N, K, generator=g) / K**0.5
    return W, X


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 128])
def test_gptq_reduces_layer_output_error_vs_rtn(act_order, group_size):
    W, X = correlated_layer()
    H = 2 * X.T @ X / len(X)
    linear = nn.Linear(W.shape[1], W.shape[0], bias=False)
    linear.weight.data = W
    rtn = Int4Linear.from_float(linear, group_size).dequantize()
    codes, scales, zeros = gptq_quantize_weight(W, H, group_size, act_order)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and scales.dtype == torch.bfloat16
    gptq = Int4Linear.from_codes(codes, scales, zeros, None).dequantize()
    rtn_error = ((X @ (W - rtn).T) ** 2).mean()
    gptq_error = ((X @ (W - gptq).T) ** 2).mean()
    # Measured: 0.73x (act-order 0.34x) at G = 64 on this layer; demand a clear margin.
    assert gptq_error < 0.85 * rtn_error


def test_dead_inputs_and_rank_deficient_hessian():
    W, X = correlated_layer(N=16, K=64, rows=20)  # 20 rows: H has rank 20 of 64
    X[:, 7] = 0  # an input that never fires
    codes, scales, zeros = gptq_quantize_weight(W, 2 * X.T @ X / len(X), 32)
    assert torch.isfinite(Int4Linear.from_codes(codes, scales, zeros, None).dequantize()).all()


def test_default_calibration_text_is_training_text_only():
    text = read_calibration_text(None)
    assert DEFAULT_CALIBRATION.stat().st_size < 300_000 and len(text) > 400_000
    assert text.count("<|endoftext|>") == 39  # one excerpt per training file
    # Speakers found only in the held-out plays (Twelfth Night, Coriolanus, Henry VI part 2).
    for name in ("MALVOLIO", "SIR TOBY", "VIOLA", "MENENIUS", "AUFIDIUS", "VOLUMNIA", "CADE"):
        assert name not in text


def test_calibration_tokens(tmp_path):
    tokenizer = blitzgen.load().tokenizer
    text = read_calibration_text(None)
    a = calibration_tokens(tokenizer, text, 5, 64)
    assert a.shape == (5, 64) and torch.equal(a, calibration_tokens(tokenizer, text, 5, 64))
    plain = tmp_path / "calib.txt"
    plain.write_text("To be, or not to be")
    assert read_calibration_text(plain) == "To be, or not to be"
    packed = tmp_path / "calib.txt.gz"
    packed.write_bytes(gzip.compress(b"that is the question"))
    assert read_calibration_text(packed) == "that is the question"
    with pytest.raises(BlitzgenError, match="fewer than one sample"):
        calibration_tokens(tokenizer, "To be", 2, 64)
    with pytest.raises(BlitzgenError, match="nope.txt: no such file"):
        read_calibration_text(tmp_path / "nope.txt")


def test_quantize_gptq_default_model(tmp_path):
    gen = blitzgen.load()
    tokens = calibration_tokens(gen.tokenizer, read_calibration_text(None), 8, 96)
    info = quantize_gptq(gen.model, tokens, group_size=64, act_order=True)
    assert info["method"] == "gptq" and info["act_order"] and info["calibration_samples"] == 8
    for name in block_linear_names(gen.model):
        assert isinstance(gen.model.get_submodule(name), Int4Linear)
    assert isinstance(gen.model.output, Int8Linear)
    done = gen.generate(["ROMEO:"], blitzgen.SamplingParams(temperature=0, max_new_tokens=10))[0]
    assert len(done.token_ids) == 10
    # A GPTQ checkpoint is the int4 format: written and reloaded, the same logits.
    save_quantized(gen.model, blitzgen.generate.DEFAULT_MODEL, tmp_path / "g",
                   {"mode": "int4-gptq", **quantization_metadata(gen.model), **info})
    ids = tokens[0].tolist()
    assert torch.equal(blitzgen.load(tmp_path / "g").logits(ids), gen.logits(ids))
