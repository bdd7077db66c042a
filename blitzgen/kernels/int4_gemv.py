"""Weight-only int4 GEMV with group-wise scales and zero points: a few rows times a packed 4-bit matrix.

Format (Int4Linear in quantize.py): each output channel n is cut into groups of G consecutive
input features (G = 32, 64 or 128); code q in [0, 15] stands for

    w[n, k] = q[n, k] * s[n, k // G] + z[n, k // G]

where z is the value of code 0 (the group's minimum, a float zero point). Two codes share a byte:
byte j of row n holds q[n, 2j] in its low nibble and q[n, 2j + 1] in its high nibble, so a row of
K codes is K / 2 contiguous bytes, read with 16-byte vector loads.

Math (x: M rows of K activations, b: optional bias):

    y[m, n] = sum_k x[m, k] * (q[n, k] * s[n, k // G] + z[n, k // G]) + b[n]

Contract:

    x        (M, K)      bf16 | fp16 | fp32; K a multiple of G
    packed   (N, K / 2)  uint8, contiguous
    scales   (N, K / G)  bf16 | fp16 | fp32
    zeros    (N, K / G)  same dtype as scales
    bias     (N,)        or None
    returns  (M, N)      in x.dtype; the sum is accumulated in fp32

One row (_int4_row_words) reads the packed codes as int32 words of 8 codes, makes floats of them
by bit pattern and applies scale and zero point once per group (20-36% -> 24-41% of an H100's read
ceiling against per-code casts: still far from the bandwidth). Otherwise
the kernel dequantizes one (BLOCK_N, BLOCK_K) tile at a time in registers, never the matrix:
the low and high nibbles become the even and odd columns of the tile, scaled per group, and are
multiplied by the even and odd activations (tl.split of the activation tile, which is cheap).
Split-K, the one-row CUDA-core path and the several-row tensor-core path are as in int8_gemv.py.
Registered as `torch.ops.blitzgen.int4_gemv` (torch.library.triton_op) for torch.compile.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from blitzgen.errors import BlitzgenError
from blitzgen.kernels.int4_dequantize import int4_dequantize_ref
from blitzgen.kernels.int8_gemv import finish_partials, plan_split_k, triton_runs_on

GROUP_SIZES = (32, 64, 128)


def int4_gemv_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch twin of int4_gemv (the CPU path and the test oracle), in fp32."""
    y = x.float() @ int4_dequantize_ref(packed, scales, zeros).t()  # (M, N)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def _nibble_times(words, J: tl.constexpr, xj_ptrs, x_mask, EVEN: tl.constexpr):
    """(1 + q / 16) * x for the code q at nibble J of each word of `words` (BLOCK_N, GT, WG): the code
    is moved to the top four mantissa bits of 1.0 (bits 19-22: one shift and one logic op, where an
    int-to-float cast is a quarter-rate instruction on Hopper's CUDA cores) and multiplied by the
    activations of code positions 8w + J, which the launcher laid out contiguously (xj_ptrs)."""
    if 4 * J <= 19:
        u = words << (19 - 4 * J)
    else:
        u = words >> (4 * J - 19)
    f = ((u & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)
    x = tl.load(xj_ptrs) if EVEN else tl.load(xj_ptrs, mask=x_mask, other=0.0)  # (GT, WG) float32
    return f * x[None, :, :]


@triton.jit
def _int4_row_words(
    xp_ptr,  # (M, 8, K / 8) float32 activations by code position: xp[m, j, w] = x[m, 8w + j]
    xw_ptr,  # (M, K / 8) float32 word sums / 16: xw[m, w] = sum_j x[m, 8w + j] / 16
    w_ptr,  # (N, K / 8) int32: word w of a row holds codes 8w .. 8w + 7, low nibble first
    s_ptr,  # (N, K / GROUP) scales
    z_ptr,  # (N, K / GROUP) zero points
    out_ptr,  # (SPLIT_K, M, N) fp32 partial sums
    M, N, K,
    words_per_row,  # K / 8, passed so that Triton sees its divisibility (16-byte loads)
    k_blocks_per_split,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of GROUP
    EVEN: tl.constexpr,  # N a multiple of BLOCK_N and K of BLOCK_K * k_blocks_per_split: no masks
):
    """One activation row, codes read as int32 words. A tile is (BLOCK_N, GT, WG) words: GT groups of
    WG = GROUP / 8 words. Per word the 8 products are summed in registers as t = sum_j (1 + q_j / 16) x_j,
    so with X = sum_j x_j the word's share of its group is

        sum_j q_j x_j = 16 (t - X),    y += s_g * 16 (t - X) + z_g * X,

    two multiply-adds per word for scale and zero point, and no reduction across threads until the
    end. xp and xw are made by the launcher (inside a compiled step Inductor fuses them into the
    kernel that produced x), so every load here is contiguous."""
    WG: tl.constexpr = GROUP // 8
    GT: tl.constexpr = BLOCK_K // GROUP
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    n_groups = K // GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, GT)
    offs_gw = offs_g[:, None] * WG + tl.arange(0, WG)[None, :]  # (GT, WG) word offsets in a tile
    n_mask = offs_n < N
    g_begin = pid_k * k_blocks_per_split * GT
    xp_row = xp_ptr + pid_m * K
    acc = tl.zeros((BLOCK_N, GT, WG), dtype=tl.float32)
    for i in range(k_blocks_per_split):
        g0 = g_begin + i * GT  # first group of the tile
        offs_w = g0 * WG + offs_gw  # (GT, WG)
        w_ptrs = w_ptr + offs_n[:, None, None] * words_per_row + offs_w[None, :, :]
        sz = offs_n[:, None] * n_groups + g0 + offs_g[None, :]  # (BLOCK_N, GT) scale / zero point offsets
        x_mask = offs_w < words_per_row  # K is a multiple of GROUP: masking is by whole groups
        if EVEN:
            words = tl.load(w_ptrs)
            s = tl.load(s_ptr + sz).to(tl.float32)
            z = tl.load(z_ptr + sz).to(tl.float32)
        else:
            g_mask = n_mask[:, None] & (g0 + offs_g < n_groups)[None, :]
            words = tl.load(w_ptrs, mask=n_mask[:, None, None] & x_mask[None, :, :], other=0)
            s = tl.load(s_ptr + sz, mask=g_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + sz, mask=g_mask, other=0.0).to(tl.float32)
        t = _nibble_times(words, 0, xp_row + offs_w, x_mask, EVEN)
        t += _nibble_times(words, 1, xp_row + words_per_row + offs_w, x_mask, EVEN)
        t += _nibble_times(words, 2, xp_row + 2 * words_per_row + offs_w, x_mask, EVEN)
        t += _nibble_times(words, 3, xp_row + 3 * words_per_row + offs_w, x_mask, EVEN)
        t += _nibble_times(words, 4, xp_row + 4 * words_per_row + offs_w, x_mask, EVEN)
        t += _nibble_times(words, 5, xp_row + 5 * words_per_row + offs_w, x_mask, EVEN)
        t += _nibble_times(words, 6, xp_row + 6 * words_per_row + offs_w, x_mask, EVEN)
        t += _nibble_times(words, 7, xp_row + 7 * words_per_row + offs_w, x_mask, EVEN)  # (BLOCK_N, GT, WG)
        if EVEN:
            xw = tl.load(xw_ptr + pid_m * words_per_row + offs_w)[None, :, :]
        else:
            xw = tl.load(xw_ptr + pid_m * words_per_row + offs_w, mask=x_mask, other=0.0)[None, :, :]
        acc += s[:, :, None] * (t - 16.0 * xw) + z[:, :, None] * xw
    y = 16.0 * tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(out_ptr + (pid_k * M + pid_m) * N + offs_n, y, mask=n_mask)


@triton.jit
def _int4_gemv_kernel(
    x_ptr,  # (M, K) activations, contiguous
    w_ptr,  # (N, K / 2) uint8, two 4-bit codes per byte (even k low nibble, odd k high nibble)
    s_ptr,  # (N, K / GROUP) scales
    z_ptr,  # (N, K / GROUP) zero points (the value of code 0)
    out_ptr,  # (SPLIT_K, M, N) fp32 partial sums, one slab per K split
    M,  # activation rows
    N,  # output channels
    K,  # input features, a multiple of GROUP
    k_blocks_per_split,  # BLOCK_K-wide blocks of K each program reduces
    GROUP: tl.constexpr,  # quantization group size along K
    BLOCK_M: tl.constexpr,  # rows per program: 1 (CUDA-core path) or >= 16 (tensor-core dot path)
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # K elements per loop step, a multiple of GROUP (BLOCK_K / 2 bytes per row)
    DOT_IEEE: tl.constexpr,  # fp32 activations: keep the dot in full fp32 (no TF32 rounding)
):
    HALF: tl.constexpr = BLOCK_K // 2
    GROUPS: tl.constexpr = BLOCK_K // GROUP  # groups per tile row
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    n_groups = K // GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    k_begin = pid_k * k_blocks_per_split * BLOCK_K
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)  # reduced across K once, at the end
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(k_blocks_per_split):
        k0 = k_begin + i * BLOCK_K
        offs_b = k0 // 2 + tl.arange(0, HALF)  # byte columns of this tile
        b_mask = offs_b < K // 2  # K is a multiple of GROUP, so masking is by whole groups
        packed = tl.load(w_ptr + offs_n[:, None] * (K // 2) + offs_b[None, :],
                         mask=n_mask[:, None] & b_mask[None, :], other=0)  # (BLOCK_N, HALF) uint8
        offs_g = k0 // GROUP + tl.arange(0, GROUPS)
        g_mask = n_mask[:, None] & (offs_g < n_groups)[None, :]
        s = tl.load(s_ptr + offs_n[:, None] * n_groups + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n[:, None] * n_groups + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
        # Codes -> values, group by group: (BLOCK_N, GROUPS, GROUP / 2) x (BLOCK_N, GROUPS, 1).
        lo = tl.reshape((packed & 0xF).to(tl.float32), (BLOCK_N, GROUPS, GROUP // 2))
        hi = tl.reshape((packed >> 4).to(tl.float32), (BLOCK_N, GROUPS, GROUP // 2))
        w_even = tl.reshape(lo * s[:, :, None] + z[:, :, None], (BLOCK_N, HALF))  # columns k0, k0 + 2, ...
        w_odd = tl.reshape(hi * s[:, :, None] + z[:, :, None], (BLOCK_N, HALF))  # columns k0 + 1, k0 + 3, ...
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)  # (BLOCK_M, BLOCK_K)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, HALF, 2)))  # (BLOCK_M, HALF) each
        if BLOCK_M == 1:
            acc += w_even * x_even.to(tl.float32) + w_odd * x_odd.to(tl.float32)
        elif DOT_IEEE:
            acc += tl.dot(x_even, tl.trans(w_even), input_precision="ieee")
            acc += tl.dot(x_odd, tl.trans(w_odd), input_precision="ieee")
        else:
            acc += tl.dot(x_even, tl.trans(w_even.to(x.dtype)))
            acc += tl.dot(x_odd, tl.trans(w_odd.to(x.dtype)))
    if BLOCK_M == 1:
        tl.store(out_ptr + (pid_k * M + pid_m) * N + offs_n, tl.sum(acc, axis=1), mask=n_mask)
    else:
        out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton_op("blitzgen::int4_gemv", mutates_args=())
def _int4_gemv_op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  bias: torch.Tensor | None, split_k: int, block_m: int, block_n: int, block_k: int,
                  num_warps: int, words: bool) -> torch.Tensor:
    M, K = x.shape
    N = packed.shape[0]
    per_split = triton.cdiv(triton.cdiv(K, block_k), split_k)
    partial = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, block_n), split_k, triton.cdiv(M, block_m))
    group = K // scales.shape[1]
    if words:
        x_words = x.float().view(M, K // 8, 8)
        xp = x_words.transpose(1, 2).contiguous()  # (M, 8, K / 8): xp[m, j, w] = x[m, 8w + j]
        xw = x_words.sum(-1) / 16  # (M, K / 8)
        wrap_triton(_int4_row_words)[grid](
            xp, xw, packed.view(torch.int32), scales, zeros, partial, M, N, K, K // 8, per_split,
            GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k, EVEN=N % block_n == 0 and K % (block_k * per_split) == 0,
            num_warps=num_warps,
        )
    else:
        wrap_triton(_int4_gemv_kernel)[grid](
            x, packed, scales, zeros, partial, M, N, K, per_split,
            GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            DOT_IEEE=x.dtype == torch.float32, num_warps=num_warps,
        )
    return finish_partials(partial, bias, x.dtype)


# Block sizes (block_m, block_n, block_k, num_warps) for one row and for several; block_k is raised
# to the group size when smaller. The most common best of the sweep in benchmarks/quant_bench.py on an
# H100 at Llama-2-7B shapes (BENCHMARKS.md, 2026-11-25); split-K as planned with 8 programs per SM.
ONE_ROW = (1, 64, 128, 4)
MANY_ROWS = (16, 32, 128, 4)
PROGRAMS_PER_SM = 8


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              bias: torch.Tensor | None = None, *, blocks: tuple[int, int, int, int] | None = None,
              split_k: int | None = None, words: bool = True) -> torch.Tensor:
    """y = x @ W.T + bias for x (M, K) and W the int4 matrix (packed, scales, zeros) -> (M, N) in x.dtype.

    blocks (block_m, block_n, block_k, num_warps) and split_k override the defaults (tests, sweeps);
    words=False turns off the one-row path that reads the codes as int32 words (for comparison).
    Falls back to int4_gemv_ref where Triton cannot run (CPU without TRITON_INTERPRET=1).
    """
    if x.dim() != 2 or packed.dim() != 2 or 2 * packed.shape[1] != x.shape[1]:
        raise BlitzgenError(f"int4_gemv: x {tuple(x.shape)} and packed {tuple(packed.shape)} must be (M, K) "
                            f"and (N, K / 2)")
    M, K = x.shape
    N = packed.shape[0]
    if packed.dtype != torch.uint8 or scales.dim() != 2 or scales.shape[0] != N or zeros.shape != scales.shape:
        raise BlitzgenError(f"int4_gemv: expected uint8 packed codes and (N, K / G) scales and zeros, got "
                            f"{packed.dtype}, {tuple(scales.shape)}, {tuple(zeros.shape)}")
    group = K // scales.shape[1]
    if group not in GROUP_SIZES or group * scales.shape[1] != K:
        raise BlitzgenError(f"int4_gemv: K = {K} with {scales.shape[1]} groups per row; the group size must "
                            f"be one of {GROUP_SIZES} and divide K")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise BlitzgenError(f"int4_gemv: activations must be bf16, fp16 or fp32, got {x.dtype}")
    if bias is not None and bias.shape != (N,):
        raise BlitzgenError(f"int4_gemv: bias {tuple(bias.shape)} must be (N,) = ({N},)")
    if not triton_runs_on(x):
        return int4_gemv_ref(x, packed, scales, zeros, bias)
    block_m, block_n, block_k, num_warps = blocks or (ONE_ROW if M == 1 else MANY_ROWS)
    block_k = max(block_k, group)
    if block_k % group or (block_m & (block_m - 1)) or (block_n & (block_n - 1)) or (block_k & (block_k - 1)):
        raise BlitzgenError(f"int4_gemv: blocks {block_m, block_n, block_k} must be powers of two, block_k a "
                            f"multiple of the group size {group}")
    if split_k is None:
        split_k = plan_split_k(x.device, triton.cdiv(N, block_n), triton.cdiv(K, block_k), PROGRAMS_PER_SM)
    split_k = min(split_k, triton.cdiv(K, block_k))
    words = words and block_m == 1  # K / 2 bytes a row is a multiple of 16: whole words
    # The word path keeps ~16 (int8) / ~20 (int4) bits of each partial sum (see its kernel): plenty
    # for 16-bit activations, not for float32 ones, which take the exact path.
    words = words and x.dtype != torch.float32
    return torch.ops.blitzgen.int4_gemv(x.contiguous(), packed.contiguous(), scales, zeros, bias, split_k,
                                        block_m, block_n, block_k, num_warps, words)
