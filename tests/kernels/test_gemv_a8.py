"""gemv_a8 (Triton, under TRITON_INTERPRET=1 on CPU; its dp4a spelt out there, PTX on a GPU) against its
float64 references, and the references against the weight-only products they approximate."""

import pytest
import torch

from blitzgen.errors import BlitzgenError
from blitzgen.kernels.gemv_a8 import (gemv_a8, int4_gemv_a8_ref, int8_gemv_a8_ref, quantize_activations)
from blitzgen.kernels.int4_gemv import int4_gemv_ref
from blitzgen.kernels.int8_gemv import int8_gemv_ref
from kernel_checks import random_int4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _int8(N, K, g):
    return (torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g),
            (torch.rand(N, generator=g) * 0.02 + 1e-3).bfloat16())


def _close(y, ref):
    # The kernel sums exact int32 block dots in float32 (the reference in float64): ~1e-6 relative to
    # the output's scale, plus the output's own rounding (2 ulps of a 16-bit dtype).
    eps = max(torch.finfo(y.dtype).eps, 1e-6)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2 * eps, atol=2 * eps * ref.float().abs().max().item())


# N not a multiple of any block; K a multiple of 32 (int4: of G) but not of the tiles; rows 1..8.
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("N,K", [(37, 96), (20, 544)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matches_reference(M, N, K, dtype):
    g = torch.Generator().manual_seed(M * K)
    x = torch.randn(M, K, generator=g).to(dtype)
    w, s = _int8(N, K, g)
    b = torch.randn(N, generator=g).to(dtype)
    x, w, s, b = (t.to(DEVICE) for t in (x, w, s, b))
    xw, xs, _ = quantize_activations(x)
    _close(gemv_a8(x, w, s, bias=b), int8_gemv_a8_ref(xw, xs, w, s, b, dtype))


@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("N,K,G", [(37, 96, 32), (50, 320, 64), (9, 640, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_matches_reference(M, N, K, G, dtype):
    g = torch.Generator().manual_seed(M * K)
    x = torch.randn(M, K, generator=g).to(dtype)
    packed, scales, zeros = random_int4(N, K, G, g)
    x, packed, scales, zeros = (t.to(DEVICE) for t in (x, packed, scales, zeros))
    xw, xs, xbs = quantize_activations(x, sums=True)
    _close(gemv_a8(x, packed, scales, zeros), int4_gemv_a8_ref(xw, xs, xbs, packed, scales, zeros, None, dtype))


@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize("blocks", [(16, 64, 4), (8, 256, 4), (32, 128, 2)])
def test_split_k_and_blocks(split_k, blocks):
    g = torch.Generator().manual_seed(split_k)
    x = torch.randn(5, 448, generator=g).to(DEVICE)
    w, s = (t.to(DEVICE) for t in _int8(41, 448, g))
    packed, scales, zeros = (t.to(DEVICE) for t in random_int4(41, 448, 64, g))
    xw, xs, _ = quantize_activations(x)
    _close(gemv_a8(x, w, s, blocks=blocks, split_k=split_k), int8_gemv_a8_ref(xw, xs, w, s))
    xw, xs, xbs = quantize_activations(x, sums=True)
    _close(gemv_a8(x, packed, scales, zeros, blocks=blocks, split_k=split_k),
           int4_gemv_a8_ref(xw, xs, xbs, packed, scales, zeros))


def test_activation_rounding_is_what_it_costs():
    """The references equal the weight-only products up to the int8 rounding of x: per entry at most
    half a step of its block's scale, so |y_a8 - y| <= sum_k (a_b / 2) |w[n, k]| for every output."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, generator=g) * torch.linspace(0.1, 30, 256)  # blocks of very different size
    w, s = _int8(24, 256, g)
    packed, scales, zeros = random_int4(24, 256, 64, g)
    xw, xs, _ = quantize_activations(x)
    half_step = (xs / 2).repeat_interleave(32, dim=1)  # (M, K)
    bound8 = half_step @ (w.float() * s.float()[:, None]).abs().t()
    err8 = (int8_gemv_a8_ref(xw, xs, w, s) - int8_gemv_ref(x, w, s)).abs()
    assert (err8 <= bound8 * 1.001 + 1e-5).all()
    assert err8.max() > 0  # the rounding is real: the bound is not met trivially by equality
    from blitzgen.kernels.dequantize import int4_dequantize_ref
    xw, xs, xbs = quantize_activations(x, sums=True)
    bound4 = half_step @ int4_dequantize_ref(packed, scales, zeros).abs().t()
    err4 = (int4_gemv_a8_ref(xw, xs, xbs, packed, scales, zeros) - int4_gemv_ref(x, packed, scales, zeros)).abs()
    assert (err4 <= bound4 * 1.001 + 1e-5).all() and err4.max() > 0


def test_quantize_activations_layout():
    """Codes in k order, 4 to a word, one scale and (if asked) one sum of the unrounded x per block of 32."""
    x = torch.arange(1, 65, dtype=torch.float32)[None] * 127 / 64  # block scales 1/2 and 1
    x[0, 32:] = x[0, :32]  # the second block again: scale 0.5, same codes
    xw, xs, xbs = quantize_activations(x, sums=True)
    assert xw.shape == (1, 16) and xw.dtype == torch.int32
    want = torch.round(x[0, :32] * 2).to(torch.int8).tolist()
    assert xw.view(torch.int8).view(-1).tolist() == want * 2
    assert torch.equal(xs, torch.tensor([[0.5, 0.5]])) and torch.equal(xbs, x.view(1, 2, 32).sum(-1))
    assert quantize_activations(x)[2] is None


def test_bad_shapes():
    x = torch.randn(9, 64)
    w, s = _int8(4, 64, torch.Generator().manual_seed(0))
    with pytest.raises(BlitzgenError, match="at most 8 rows"):
        gemv_a8(x, w, s)
    with pytest.raises(BlitzgenError, match="multiple of 32"):
        gemv_a8(torch.randn(1, 48), *_int8(4, 48, torch.Generator().manual_seed(0)))
