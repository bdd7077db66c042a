"""int8_dequantize and int4_dequantize (Triton, under TRITON_INTERPRET=1 on CPU) against their references."""

import pytest
import torch

from blitzgen.errors import BlitzgenError
from blitzgen.kernels.dequantize import int4_dequantize, int4_dequantize_ref, int8_dequantize, int8_dequantize_ref
from kernel_checks import random_int4

INTERPRETED = not torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check_rounded_once(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == dtype
    if dtype == torch.float32 or not INTERPRETED:
        # Both compute in fp32 and round once to dtype (to nearest): identical.
        assert torch.equal(out, ref.to(dtype))
    else:
        # Triton 3.9's interpreter truncates fp32 -> bf16 instead of rounding: one bf16 step apart at most.
        torch.testing.assert_close(out.float(), ref, rtol=2**-7, atol=0)


# Neither N nor K a multiple of the kernel's 16 x 256 tile; K = 1 and one row.
@pytest.mark.parametrize("N,K", [(37, 300), (1, 1), (20, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_dequantize_matches_reference(N, K, dtype):
    g = torch.Generator().manual_seed(N + K)
    weight = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g).to(DEVICE)
    scales = (torch.rand(N, generator=g) * 0.01 + 1e-3).bfloat16().to(DEVICE)
    _check_rounded_once(int8_dequantize(weight, scales, dtype), int8_dequantize_ref(weight, scales), dtype)


def test_int8_dequantize_rejects_other_shapes():
    with pytest.raises(BlitzgenError, match=r"int8_dequantize: expected \(N, K\) int8 and \(N,\) scales"):
        int8_dequantize(torch.zeros(4, 8, dtype=torch.int8), torch.ones(8))


@pytest.mark.parametrize("N,K,G", [(37, 96, 32), (20, 1152, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_dequantize_matches_reference(N, K, G, dtype):
    g = torch.Generator().manual_seed(N + K)
    packed, scales, zeros = (t.to(DEVICE) for t in random_int4(N, K, G, g))
    _check_rounded_once(int4_dequantize(packed, scales, zeros, dtype), int4_dequantize_ref(packed, scales, zeros), dtype)
