"""Triton kernels, each in a file beside the plain-PyTorch reference of the same function.

A kernel file holds, in order: the math and the shape/dtype contract, `<op>_ref` (the CPU path
and the test oracle), the Triton kernels, and the launcher `<op>()` that validates, allocates,
picks the grid and falls back to the reference where Triton cannot run. Each op is registered
as `torch.ops.blitzgen.<op>` so torch.compile traces it into the CUDA-graphed decode step.
No op is imported here: import the module of the op you need. What is below is what several kernel
files share and must not import Triton (a CPU-only install may lack it).

    gemv.py             bf16 / fp16 / int8 codes x one row with RMSNorm, SiLU gate, bias, residual fused,
                        wqkv with RoPE + the K/V cache write (gemv_rope_cache); PDL on Hopper
    int8_gemv.py        weight-only int8 (per-channel scales) x a few activation rows, split-K
    int4_gemv.py        weight-only int4 (groups of 32/64/128, scale + zero point), same scheme
    gemv_a8.py          int8 / int4 x one activation row rounded to int8 blocks: dp4a integer dots
    dequantize.py       int8 / packed int4 -> dense matrix in one pass (prefill; eager, not an op)
    decode_attention.py split-KV decode attention over device-side lengths, graph-safe
    rope_cache.py       a decode step's RoPE + K/V cache write in one launch, for several sequences
                        (Generator(rope_kernel=True))
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


def define_ops(name: str, launch, fake, mutates_args: tuple[str, ...] = ()) -> None:
    """Registers `launch`, a Triton launcher annotated for torch.library whose last argument `pdl` says whether
    it launches its kernel as a programmatic dependent (see hopper()), as two ops (Triton must be installed):

        torch.ops.blitzgen.<name>      called with pdl=False: a triton_op, which torch.compile traces into
                                       the kernels it launches, so Inductor launches them in the graph
        torch.ops.blitzgen.<name>_pdl  called with pdl=True: opaque to torch.compile, because the launch
                                       attribute PDL needs is not passed by Inductor's call of a traced kernel

    Under TRITON_INTERPRET=1 (the CPU tests) interpreted kernels cannot be traced, so <name> is opaque too and
    there is no _pdl op. `fake` gives the outputs' shapes, for torch.compile's tracing of the opaque ones."""
    from torch.library import custom_op, register_fake, triton_op

    if os.environ.get("TRITON_INTERPRET") == "1":
        custom_op(f"blitzgen::{name}", launch, mutates_args=mutates_args)
        register_fake(f"blitzgen::{name}")(fake)
        return
    triton_op(f"blitzgen::{name}", launch, mutates_args=mutates_args)
    custom_op(f"blitzgen::{name}_pdl", launch, mutates_args=mutates_args)
    register_fake(f"blitzgen::{name}_pdl")(fake)
