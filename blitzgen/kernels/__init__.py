"""Triton kernels, each in a file beside the plain-PyTorch reference of the same function.

A kernel file holds, in order: the math and the shape/dtype contract, `<op>_ref` (the CPU path
and the test oracle), the Triton kernels, and the launcher `<op>()` that validates, allocates,
picks the grid and falls back to the reference where Triton cannot run. Each op is registered
as `torch.ops.blitzgen.<op>` so torch.compile traces it into the CUDA-graphed decode step.
No op is imported here: import the module of the op you need. What is below is what several kernel
files share and must not import Triton (a CPU-only install may lack it).

    gemv.py             bf16 / fp16 x one row with RMSNorm, SiLU gate, bias, residual fused; PDL on Hopper
    int8_gemv.py        weight-only int8 (per-channel scales) x a few activation rows, split-K
    int4_gemv.py        weight-only int4 (groups of 32/64/128, scale + zero point), same scheme
    gemv_a8.py          int8 / int4 x one activation row rounded to int8 blocks: dp4a integer dots
    dequantize.py       int8 / packed int4 -> dense matrix in one pass (prefill; eager, not an op)
    decode_attention.py split-KV decode attention over device-side lengths, graph-safe
    rope_cache.py       a decode step's RoPE + K/V cache write in one launch (Generator(rope_kernel=True))
"""

import os

import torch


def triton_runs_on(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on x's device: CUDA, or the CPU under TRITON_INTERPRET=1."""
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def hopper(x: torch.Tensor) -> bool:
    """Whether x is on a GPU that takes programmatic dependent launches (PDL: sm_90 and later). The
    one-row GEMV kernels (gemv.py) and the RoPE + cache-write kernel (rope_cache.py) launch that way
    there: each lets the next kernel start while it finishes, and waits for the previous one
    (griddepcontrol) before reading its output."""
    # ROCm builds report gfx9xx devices as capability 9.x too, but griddepcontrol is NVIDIA's.
    return x.is_cuda and torch.version.hip is None and torch.cuda.get_device_capability(x.device)[0] >= 9


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K / 2) packed int4 bytes -> (N, K) codes in [0, 15]: code 2j in byte j's low nibble, 2j + 1 in its
    high one (quantize.pack_int4's layout, which every int4 kernel reads)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)
