"""A decode step's RoPE and K/V cache write in one kernel: the new token's q and k rotated, k and v
stored at the token's cache position.

Math (rotate-half RoPE, the layout of Hugging Face's Llama: pairs (i, i + D/2)), per sequence b
with cos, sin of its position p_b:

    rot(x)[i]         = x[i] cos[i] - x[i + D/2] sin[i]              i < D/2
    rot(x)[i + D/2]   = x[i + D/2] cos[i + D/2] + x[i] sin[i + D/2]
    q_out[b, j]       = rot(q[b, j])                                 each query head j
    k_cache[b, p_b, h] = rot(k[b, h]),  v_cache[b, p_b, h] = v[b, h]  each kv head h

Why: compiled, these few element-wise operations were four small kernels a layer (q's rotation,
k's rotation and scatter, v's scatter), each costing a launch and a DRAM round trip that a step
of a 7B model pays 32 times (measured on an H200: ~4.3 us a layer, BENCHMARKS.md). Here one
program handles one head of one sequence: H + Hkv programs per sequence, one launch.

Contract (the T = 1 dim of the model's (B, 1, ...) tensors may be kept: the kernel reads rows by their
stride, so the decode step passes its tensors as they are, with no view for Inductor to copy):
    qkv         (B, [1,] (H + 2 Hkv) D)  bf16 | fp16 | fp32: the fused q/k/v product, heads in that order
    cos, sin    (B, [1,] D)              qkv's dtype (model.rope_cos_sin)
    positions   (B, [1])                 int64 | int32: the cache position of each new token
    k_cache     (B, S, Hkv, D)           qkv's dtype, last dim contiguous; written at [b, positions[b]]
    v_cache     (B, S, Hkv, D)
    n_heads     H
    returns     (B, H, D)                rotated q, contiguous, qkv's dtype, and
                (B,)                     int64 positions + 1: the live lengths decode attention takes (one
                                         kernel fewer a layer than computing them apart)
The rotation is computed in float32 and rounded once (as Inductor compiles model.apply_rope; the
eager reference rounds each product in 16-bit dtypes, one unit in the last place apart).

Registered as torch.ops.blitzgen.rope_cache_write (torch.library.triton_op, mutating the two
caches in place) on CUDA; on a CPU the kernel runs only under TRITON_INTERPRET=1 (tests), else
rope_cache_write() runs rope_cache_write_ref. On Hopper it is launched as a programmatic dependent
(rope_cache_write_pdl, an opaque op: see kernels/gemv.py), waiting on the wqkv product before its first
read. A one-sequence decode step does this in the wqkv product's epilogue instead (kernels/gemv.py,
gemv_rope_cache: on an H200 a Llama-2-7B step took 3.660 ms that way, 3.676 with this kernel after the
product, 3.806 with Inductor's RoPE and scatter; BENCHMARKS.md 2026-12-02). Here it serves steps of
several sequences (Generator(rope_kernel=True)), off by default: not measured on that path.
"""

import os

import torch

from blitzgen.errors import BlitzgenError
from blitzgen.kernels import define_ops, hopper

try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton
except ImportError:  # a CPU-only install without Triton: the reference is the only path
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PDL = True  # a programmatic dependent launch on Hopper and later (kernels/__init__.py)


def rope_cache_write_ref(qkv, cos, sin, positions, k_cache, v_cache, n_heads: int):
    """Plain-PyTorch twin: returns rotated q (B, H, D) and lengths = positions + 1 (B,) int64; writes
    rotated k and v into the caches. The rotation is the model's own (model.apply_rope)."""
    from blitzgen.model import apply_rope  # here: model.py imports this module

    B, D = qkv.shape[0], k_cache.shape[3]
    q, k, v = qkv.reshape(B, 1, -1, D).split([n_heads, k_cache.shape[2], k_cache.shape[2]], dim=2)
    cos, sin, positions = cos.reshape(B, 1, D), sin.reshape(B, 1, D), positions.reshape(B)
    rows = torch.arange(B, device=qkv.device)
    k_cache[rows, positions] = apply_rope(k, cos, sin)[:, 0]
    v_cache[rows, positions] = v[:, 0]
    return apply_rope(q, cos, sin)[:, 0], (positions + 1).long()


if triton is not None:

    @triton.jit
    def _rotate_and_store(src, dst, cos_row, sin_row, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """dst[0:D] = rot(src[0:D]) for one head, in float32, rounded once to dst's dtype."""
        offs = tl.arange(0, BLOCK_HALF)
        mask = offs < HALF
        lo = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        hi = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        cos_lo = tl.load(cos_row + offs, mask=mask, other=0.0).to(tl.float32)
        cos_hi = tl.load(cos_row + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        sin_lo = tl.load(sin_row + offs, mask=mask, other=0.0).to(tl.float32)
        sin_hi = tl.load(sin_row + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + offs, (lo * cos_lo - hi * sin_lo).to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + HALF + offs, (hi * cos_hi + lo * sin_hi).to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_cache_kernel(
        qkv_ptr,  # (B, (H + 2 Hkv) D): q heads, then k heads, then v heads, each D contiguous
        cos_ptr, sin_ptr,  # (B, D) rows
        positions_ptr,  # (B,) rows, stride stride_pb
        q_out_ptr,  # (B, H, D) contiguous
        lengths_ptr,  # (B,) out: positions + 1, the live keys decode attention reads next
        k_cache_ptr, v_cache_ptr,  # (B, S, Hkv, D)
        stride_xb, stride_cb, stride_sb, stride_pb,
        stride_kcb, stride_kcn, stride_kch, stride_vcb, stride_vcn, stride_vch,
        H: tl.constexpr,  # query heads: programs 0 .. H - 1 rotate q, H .. H + Hkv - 1 write k and v
        HKV: tl.constexpr,
        D: tl.constexpr,
        BLOCK_HALF: tl.constexpr,  # D / 2 rounded up to a power of two
        PDL: tl.constexpr,  # launched as a programmatic dependent launch (Hopper; kernels/__init__.py)
    ):
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()  # qkv is the previous kernel's
        head = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        HALF: tl.constexpr = D // 2
        row = qkv_ptr + b * stride_xb
        # Each store's address is computed from a kernel argument inside its own branch, so
        # torch.compile's analysis of what the kernel writes sees exactly q_out and the two caches.
        if head < H:
            _rotate_and_store(row + head * D, q_out_ptr + (b * H + head) * D, cos_ptr + b * stride_cb,
                              sin_ptr + b * stride_sb, HALF, BLOCK_HALF)
        else:
            h = head - H
            position = tl.load(positions_ptr + b * stride_pb).to(tl.int64)
            _rotate_and_store(row + (H + h) * D, k_cache_ptr + b * stride_kcb + position * stride_kcn + h * stride_kch,
                              cos_ptr + b * stride_cb, sin_ptr + b * stride_sb, HALF, BLOCK_HALF)
            offs = tl.arange(0, 2 * BLOCK_HALF)
            mask = offs < D
            v = tl.load(row + (H + HKV + h) * D + offs, mask=mask)
            tl.store(v_cache_ptr + b * stride_vcb + position * stride_vcn + h * stride_vch + offs, v, mask=mask)
            if h == 0:
                tl.store(lengths_ptr + b, position + 1)


def _rope_cache_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int,
                   pdl: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel (the body of torch.ops.blitzgen.rope_cache_write / rope_cache_write_pdl)."""
    B = qkv.shape[0]
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    q_out = torch.empty((B, n_heads, D), dtype=qkv.dtype, device=qkv.device)
    lengths = torch.empty((B,), dtype=torch.int64, device=qkv.device)
    # PDL needs a launch attribute that Inductor's call of a traced kernel does not pass: launched directly.
    (_rope_cache_kernel if pdl else wrap_triton(_rope_cache_kernel))[(n_heads + Hkv, B)](
        qkv, cos, sin, positions, q_out, lengths, k_cache, v_cache,
        qkv.stride(0), cos.stride(0), sin.stride(0), positions.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        H=n_heads, HKV=Hkv, D=D, BLOCK_HALF=triton.next_power_of_2(D // 2), PDL=pdl,
        **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return q_out, lengths


def _rope_cache_fake(qkv, cos, sin, positions, k_cache, v_cache, n_heads, pdl):
    return (qkv.new_empty((qkv.shape[0], n_heads, k_cache.shape[3])),
            positions.new_empty((qkv.shape[0],), dtype=torch.int64))


if triton is not None:
    define_ops("rope_cache_write", _rope_cache_op, _rope_cache_fake, mutates_args=("k_cache", "v_cache"))


def rope_cache_write(qkv, cos, sin, positions, k_cache, v_cache, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on the new token's q and k and its K/V cache write (see the module docstring) -> rotated
    q (B, H, D) and lengths (B,) int64. The Triton kernel on CUDA (and on CPU under
    TRITON_INTERPRET=1), else the reference."""
    B, Hkv, D = qkv.shape[0], k_cache.shape[2], k_cache.shape[3]
    N = (n_heads + 2 * Hkv) * D
    if (qkv.numel() != B * N or qkv.shape[-1] != N or cos.numel() != B * D or cos.shape[-1] != D
            or sin.shape != cos.shape or positions.numel() != B or positions.shape[0] != B
            or k_cache.shape[0] != B or v_cache.shape != k_cache.shape or D % 2):
        raise BlitzgenError(
            f"rope_cache_write: shapes do not fit: qkv {tuple(qkv.shape)} for {n_heads} heads, cos {tuple(cos.shape)}, "
            f"sin {tuple(sin.shape)}, positions {tuple(positions.shape)}, cache {tuple(k_cache.shape)}")
    if triton is None or not (qkv.is_cuda or (_INTERPRET and qkv.device.type == "cpu")):
        return rope_cache_write_ref(qkv, cos, sin, positions, k_cache, v_cache, n_heads)
    if any(t.stride(-1) != 1 for t in (qkv, cos, sin, k_cache, v_cache)):
        raise BlitzgenError("rope_cache_write: every tensor's last dim must be contiguous")
    pdl = PDL and hopper(qkv)
    op = torch.ops.blitzgen.rope_cache_write_pdl if pdl else torch.ops.blitzgen.rope_cache_write
    return op(qkv, cos, sin, positions, k_cache, v_cache, n_heads, pdl)
