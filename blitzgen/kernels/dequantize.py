"""Dense float matrices from the quantized formats in one pass (the prefill paths of Int8Linear and
Int4Linear).

A prompt of hundreds of tokens is compute-bound, so prefill multiplies by a dense matrix with
cuBLAS; what must stay cheap is making that matrix. Done with PyTorch operations int4 takes half a
dozen passes with fp32 temporaries, and even int8's single cast (`codes.to(bf16)`) runs PyTorch's
unvectorised copy for that dtype pair (231 us for a 22016 x 4096 matrix on an H200, against 79 us
for int8_dequantize; BENCHMARKS.md, session 6), plus a pass scaling the (T, N) output. These kernels
read the codes once and write the output dtype once, computing in fp32 and rounding once: 3 bytes
of traffic per weight for int8 in bf16, 2.5 for int4.

Formats: int8 as in int8_gemv.py, w[n, k] = q[n, k] * s[n]. int4 as in int4_gemv.py: byte j of row
n holds q[n, 2j] (low nibble) and q[n, 2j + 1] (high nibble); w[n, k] = q[n, k] * s[n, k // G] +
z[n, k // G].

Contracts:

    int8_dequantize(weight (N, K) int8, scales (N,))                        -> (N, K) in `dtype`
    int4_dequantize(packed (N, K / 2) uint8, scales (N, K / G), zeros (N, K / G), G in (32, 64, 128))
                                                                             -> (N, K) in `dtype`
    scales / zeros bf16 | fp16 | fp32

Called eagerly on the prefill path only (never inside the compiled decode step), so they are plain
launches rather than registered ops.
"""

import torch
import triton
import triton.language as tl

from blitzgen.errors import BlitzgenError
from blitzgen.kernels import triton_runs_on, unpack_int4


def int8_dequantize_ref(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch twin of int8_dequantize, in fp32: (N, K) codes -> (N, K)."""
    return weight.float() * scales.float()[:, None]


@triton.jit
def _int8_dequantize_kernel(
    w_ptr,  # (N, K) int8 codes, contiguous
    s_ptr,  # (N,) scales
    out_ptr,  # (N, K) output, contiguous
    N,  # rows
    K,  # columns
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # columns per program
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    q = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask, other=0)
    w = q.to(tl.float32) * s[:, None]
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def int8_dequantize(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) matrix in `dtype` from int8 codes and per-row scales; the reference where Triton cannot run."""
    if weight.dtype != torch.int8 or weight.dim() != 2 or scales.shape != weight.shape[:1]:
        raise BlitzgenError(f"int8_dequantize: expected (N, K) int8 and (N,) scales, got {weight.dtype} "
                            f"{tuple(weight.shape)}, {tuple(scales.shape)}")
    if not triton_runs_on(weight):
        return int8_dequantize_ref(weight, scales).to(dtype)
    N, K = weight.shape
    out = torch.empty((N, K), dtype=dtype, device=weight.device)
    block_n, block_k = 16, 256  # 4 KB of codes a program, 16-byte loads: a streaming copy
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _int8_dequantize_kernel[grid](weight.contiguous(), scales, out, N, K, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def int4_dequantize_ref(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch twin of int4_dequantize, in fp32: (N, K / 2) bytes -> (N, K)."""
    N, half = packed.shape
    codes = unpack_int4(packed)  # (N, K)
    group = 2 * half // scales.shape[1]
    codes = codes.float().view(N, -1, group)  # (N, K / G, G)
    return (codes * scales.float()[..., None] + zeros.float()[..., None]).view(N, 2 * half)


@triton.jit
def _int4_dequantize_kernel(
    w_ptr,  # (N, K / 2) uint8 codes
    s_ptr,  # (N, K / GROUP) scales
    z_ptr,  # (N, K / GROUP) zero points
    out_ptr,  # (N, K) output, contiguous
    N,  # rows
    K,  # columns, a multiple of GROUP
    GROUP: tl.constexpr,  # quantization group size along K
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # columns per program, a multiple of GROUP
):
    HALF: tl.constexpr = BLOCK_K // 2
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_mask = offs_n < N
    offs_b = k0 // 2 + tl.arange(0, HALF)
    packed = tl.load(w_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :],
                     mask=n_mask[:, None] & (offs_b < K // 2)[None, :], other=0)  # (BLOCK_N, HALF)
    offs_g = k0 // GROUP + tl.arange(0, GROUPS)
    g_mask = n_mask[:, None] & (offs_g < K // GROUP)[None, :]
    s = tl.load(s_ptr + offs_n[:, None] * (K // GROUP) + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs_n[:, None] * (K // GROUP) + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
    lo = tl.reshape((packed & 0xF).to(tl.float32), (BLOCK_N, GROUPS, GROUP // 2)) * s[:, :, None] + z[:, :, None]
    hi = tl.reshape((packed >> 4).to(tl.float32), (BLOCK_N, GROUPS, GROUP // 2)) * s[:, :, None] + z[:, :, None]
    # Interleave back to column order: (BLOCK_N, HALF, 2) -> (BLOCK_N, BLOCK_K), k = 2j + nibble.
    w = tl.reshape(tl.join(tl.reshape(lo, (BLOCK_N, HALF)), tl.reshape(hi, (BLOCK_N, HALF))), (BLOCK_N, BLOCK_K))
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (offs_k < K)[None, :])


def int4_dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) matrix in `dtype` from the packed int4 format; the reference where Triton cannot run."""
    N, half = packed.shape
    K = 2 * half
    if packed.dtype != torch.uint8 or scales.dim() != 2 or scales.shape[0] != N or zeros.shape != scales.shape:
        raise BlitzgenError(f"int4_dequantize: expected (N, K / 2) uint8 and (N, K / G) scales and zeros, got "
                            f"{packed.dtype} {tuple(packed.shape)}, {tuple(scales.shape)}, {tuple(zeros.shape)}")
    group = K // scales.shape[1]
    if group not in (32, 64, 128) or group * scales.shape[1] != K:
        raise BlitzgenError(f"int4_dequantize: K = {K} with {scales.shape[1]} groups; the group size must be "
                            f"32, 64 or 128 and divide K")
    if not triton_runs_on(packed):
        return int4_dequantize_ref(packed, scales, zeros).to(dtype)
    out = torch.empty((N, K), dtype=dtype, device=packed.device)
    block_n, block_k = 16, max(256, group)
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _int4_dequantize_kernel[grid](packed.contiguous(), scales, zeros, out, N, K,
                                  GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
