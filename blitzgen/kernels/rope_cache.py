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

Contract:
    q           (B, H, D)        bf16 | fp16 | fp32, last dim contiguous (a view of the qkv product)
    k, v        (B, Hkv, D)      q's dtype, last dim contiguous
    cos, sin    (B, D)           q's dtype (model.rope_cos_sin), last dim contiguous
    positions   (B,)             int64 | int32 on q's device: the cache position of each new token
    k_cache     (B, S, Hkv, D)   q's dtype, last dim contiguous; written at [b, positions[b]]
    v_cache     (B, S, Hkv, D)
    returns     (B, H, D)        rotated q, contiguous, q's dtype
The rotation is computed in float32 and rounded once (as Inductor compiles model.apply_rope; the
eager reference rounds each product in 16-bit dtypes, one unit in the last place apart).

Registered as torch.ops.blitzgen.rope_cache_write (torch.library.triton_op, mutating the two
caches in place) on CUDA; on a CPU the kernel runs only under TRITON_INTERPRET=1 (tests), else
rope_cache_write() runs rope_cache_write_ref.
"""

import os

import torch

from blitzgen.errors import BlitzgenError

try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton
except ImportError:  # a CPU-only install without Triton: the reference is the only path
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, D), cos / sin (B, D): rotate-half RoPE."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def rope_cache_write_ref(q, k, v, cos, sin, positions, k_cache, v_cache) -> torch.Tensor:
    """Plain-PyTorch twin: returns rotated q (B, H, D); writes rotated k and v into the caches."""
    rows = torch.arange(q.shape[0], device=q.device)
    k_cache[rows, positions] = _rotate(k, cos, sin)
    v_cache[rows, positions] = v
    return _rotate(q, cos, sin)


if triton is not None:

    @triton.jit
    def _rope_cache_kernel(
        q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, positions_ptr,
        q_out_ptr,  # (B, H, D) contiguous
        k_cache_ptr, v_cache_ptr,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cb, stride_sb,
        stride_kcb, stride_kcn, stride_kch, stride_vcb, stride_vcn, stride_vch,
        H: tl.constexpr,  # query heads: programs 0 .. H - 1 rotate q, H .. H + Hkv - 1 write k and v
        D: tl.constexpr,
        BLOCK_HALF: tl.constexpr,  # D / 2 rounded up to a power of two
    ):
        head = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        HALF: tl.constexpr = D // 2
        offs = tl.arange(0, BLOCK_HALF)
        mask = offs < HALF
        cos_lo = tl.load(cos_ptr + b * stride_cb + offs, mask=mask, other=0.0).to(tl.float32)
        cos_hi = tl.load(cos_ptr + b * stride_cb + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        sin_lo = tl.load(sin_ptr + b * stride_sb + offs, mask=mask, other=0.0).to(tl.float32)
        sin_hi = tl.load(sin_ptr + b * stride_sb + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        if head < H:
            src = q_ptr + b * stride_qb + head * stride_qh
            dst = q_out_ptr + (b * H + head) * D
        else:
            h = head - H
            position = tl.load(positions_ptr + b).to(tl.int64)
            src = k_ptr + b * stride_kb + h * stride_kh
            dst = k_cache_ptr + b * stride_kcb + position * stride_kcn + h * stride_kch
            v_src = v_ptr + b * stride_vb + h * stride_vh
            v_dst = v_cache_ptr + b * stride_vcb + position * stride_vcn + h * stride_vch
            tl.store(v_dst + offs, tl.load(v_src + offs, mask=mask), mask=mask)
            tl.store(v_dst + HALF + offs, tl.load(v_src + HALF + offs, mask=mask), mask=mask)
        lo = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        hi = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        out_lo = lo * cos_lo - hi * sin_lo
        out_hi = hi * cos_hi + lo * sin_hi
        tl.store(dst + offs, out_lo.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + HALF + offs, out_hi.to(dst.dtype.element_ty), mask=mask)


def _rope_cache_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    B, H, D = q.shape
    Hkv = k.shape[1]
    q_out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    wrap_triton(_rope_cache_kernel)[(H + Hkv, B)](
        q, k, v, cos, sin, positions, q_out, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        H=H, D=D, BLOCK_HALF=triton.next_power_of_2(D // 2),
    )  # fmt: skip
    return q_out


if triton is not None:
    _MUTATES = ("k_cache", "v_cache")
    if _INTERPRET:  # interpreted kernels cannot be traced: an opaque op (see decode_attention.py)
        torch.library.custom_op("blitzgen::rope_cache_write", _rope_cache_op, mutates_args=_MUTATES)
        torch.library.register_fake("blitzgen::rope_cache_write")(lambda q, *_: torch.empty_like(q).contiguous())
    else:
        torch.library.triton_op("blitzgen::rope_cache_write", _rope_cache_op, mutates_args=_MUTATES)


def rope_cache_write(q, k, v, cos, sin, positions, k_cache, v_cache) -> torch.Tensor:
    """RoPE on the new token's q and k and its K/V cache write (see the module docstring) -> rotated
    q (B, H, D). The Triton kernel on CUDA (and on CPU under TRITON_INTERPRET=1), else the reference."""
    B, H, D = q.shape
    Hkv = k.shape[1]
    if (k.shape != (B, Hkv, D) or v.shape != k.shape or cos.shape != (B, D) or sin.shape != (B, D)
            or positions.shape != (B,) or k_cache.shape[0] != B or k_cache.shape[2:] != (Hkv, D)
            or v_cache.shape != k_cache.shape or D % 2):
        raise BlitzgenError(
            f"rope_cache_write: shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"cos {tuple(cos.shape)}, positions {tuple(positions.shape)}, cache {tuple(k_cache.shape)}")
    if triton is None or not (q.is_cuda or (_INTERPRET and q.device.type == "cpu")):
        return rope_cache_write_ref(q, k, v, cos, sin, positions, k_cache, v_cache)
    if any(t.stride(-1) != 1 for t in (q, k, v, cos, sin, k_cache, v_cache)):
        raise BlitzgenError("rope_cache_write: every tensor's last dim must be contiguous")
    return torch.ops.blitzgen.rope_cache_write(q, k, v, cos, sin, positions, k_cache, v_cache)
