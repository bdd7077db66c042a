"""What the kernel tests share: random int4 weights, and a kernel's output against its fp32 reference."""

import torch


def assert_matches(y: torch.Tensor, ref: torch.Tensor, ulps: int = 1):
    """Same shape and dtype; fp32: sums of a few hundred terms in another order, relative error ~1e-6 of
    the output's scale; bf16 / fp16: both round an fp32 result to 8 / 11 bits, so `ulps` units in the last
    place of the output's scale (more where the kernel rounds an operand too)."""
    assert y.shape == ref.shape and y.dtype == ref.dtype
    if ref.dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    else:
        eps = ulps * torch.finfo(ref.dtype).eps
        torch.testing.assert_close(y.float(), ref.float(), rtol=eps, atol=eps * ref.float().abs().max().item())


def random_int4(N: int, K: int, G: int, g: torch.Generator):
    """Packed codes (N, K / 2) uint8, scales and zeros (N, K / G) bf16 on the CPU: every byte value, scales
    like a real model's (1e-3 to 2e-2), zeros near -8 scales (codes centred on zero), as quantize.py makes them."""
    packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g)
    scales = (torch.rand(N, K // G, generator=g) * 0.02 + 1e-3).bfloat16()
    zeros = (-8 * scales.float() + torch.randn(N, K // G, generator=g) * 0.01).bfloat16()
    return packed, scales, zeros
