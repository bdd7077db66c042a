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
On an H200 the one-row path reads only 17-33% of the bandwidth (compute-bound): one-row bf16 / fp16
decode takes gemv_a8.py instead (activations rounded to int8, integer dot products; quantize.py's
INT4_ACTIVATIONS_INT8), and this kernel serves several rows, float32 and exact activations. (A
one-row tensor-core variant, codes made 16-bit floats by bit pattern and rows padded to 16, was
measured there at 12-24% and removed: BENCHMARKS.md, 2026-12-01 session 5. Several bf16 rows with the
codes themselves as the dot's operand, made 16-bit floats by bit pattern (0x4300 | q is 128 + q) and
scale and zero point applied once per group after a per-group dot, read 11-19% of the bandwidth
against this tile dequantization's 14-25% (each 7B shape ~25% slower at 2-8 rows), and batch 8
decode 179.1 against 206.9 tokens/s: removed, session 9. So was a CUDA-core path for 2..8 rows, each
tile dequantized once and multiplied by every row: its time grew with the rows, 2.4x this one's at 8.
This path's time is flat from 2 to 8 rows because its cost is the per-code dequantization, which does not
depend on the rows: its sm_90 SASS streams the packed tiles through shared memory with cp.async (Triton's
pipeline, 3 stages), then spends an int-to-float conversion and a multiply-add per code and two barriers an
iteration on the tile's exchange into the tensor cores' operand layout.)
So several bf16 / fp16 rows (the default, PAIRS) make the tile's weights in 16-bit pairs by bit operations
(_nibble_weights: a byte permute and a lop3 give OFFSET + q for two codes, two paired fmas remove OFFSET and
apply scale and zero point), with no conversion instruction, on larger tiles (PAIRS_ROWS). On an H200 at
Llama-2-7B shapes that reads 25-34% of the bandwidth against 14-22% for the fp32 dequantization, and a batch-8
int4 decode step takes 3.43 ms against 4.83 (bf16: 4.85; BENCHMARKS.md, 2026-12-02 session 10). float32 rows
keep the fp32 dequantization (MANY_ROWS).
Registered as `torch.ops.blitzgen.int4_gemv` (torch.library.triton_op) for torch.compile.
"""

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from blitzgen.errors import BlitzgenError
from blitzgen.kernels.dequantize import int4_dequantize_ref
from blitzgen.kernels import triton_runs_on
from blitzgen.kernels.int8_gemv import finish_partials, plan_split_k

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

GROUP_SIZES = (32, 64, 128)


def int4_gemv_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch twin of int4_gemv (the CPU path and the test oracle), in fp32."""
    y = x.float() @ int4_dequantize_ref(packed, scales, zeros).t()  # (M, N)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def _nibble_times(words, SHIFT: tl.constexpr, x):
    """(4-bit code of `words` at bit SHIFT, as a float) * x[None, :]. The float32 with bits
    0x4B000000 | q is 2^23 + q exactly: integer and add instructions at full rate, where casting an
    integer to float is a quarter-rate instruction on Hopper's CUDA cores."""
    u = ((words >> SHIFT) & 0xF) | 0x4B000000
    return (u.to(tl.float32, bitcast=True) - 8388608.0) * x[None, :]


@triton.jit
def _int4_row_words(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, k_blocks_per_split,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One activation row. Per group g the sum splits as s_g * sum_k q_k x_k + z_g * sum_k x_k, so
    the inner loop is one multiply-add per code; scale and zero point are applied once per group.
    Word i of a row holds codes k = 8i .. 8i + 7 (byte j // 2 of the word, low nibble first)."""
    NW: tl.constexpr = BLOCK_K // 8  # words per tile row
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    n_groups = K // GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_begin = pid_k * k_blocks_per_split * BLOCK_K
    x_row = x_ptr + pid_m * K
    offs_j = tl.arange(0, 8)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(k_blocks_per_split):
        k0 = k_begin + i * BLOCK_K
        offs_w = k0 // 8 + tl.arange(0, NW)
        w_mask = offs_w < K // 8  # K is a multiple of GROUP, so masking is by whole groups
        words = tl.load(w_ptr + offs_n[:, None] * (K // 8) + offs_w[None, :],
                        mask=n_mask[:, None] & w_mask[None, :], other=0)  # (BLOCK_N, NW) int32
        x = tl.load(x_row + offs_w[:, None] * 8 + offs_j[None, :], mask=w_mask[:, None],
                    other=0.0).to(tl.float32)  # (NW, 8): column j multiplies code j of each word
        x_e, x_o = tl.split(tl.reshape(x, (NW, 2, 2, 2)))  # codes j = 0, 2, 4, 6 and 1, 3, 5, 7
        x_e0, x_e1 = tl.split(x_e)  # j = 0, 4 and 2, 6
        x_o0, x_o1 = tl.split(x_o)  # j = 1, 5 and 3, 7
        x0, x4 = tl.split(x_e0)
        x2, x6 = tl.split(x_e1)
        x1, x5 = tl.split(x_o0)
        x3, x7 = tl.split(x_o1)
        t = _nibble_times(words, 0, x0) + _nibble_times(words, 4, x1)
        t += _nibble_times(words, 8, x2) + _nibble_times(words, 12, x3)
        t += _nibble_times(words, 16, x4) + _nibble_times(words, 20, x5)
        t += _nibble_times(words, 24, x6) + _nibble_times(words, 28, x7)  # (BLOCK_N, NW)
        qx = tl.sum(tl.reshape(t, (BLOCK_N, GROUPS, NW // GROUPS)), axis=2)  # (BLOCK_N, GROUPS)
        xg = tl.sum(tl.reshape(tl.sum(x, axis=1), (GROUPS, NW // GROUPS)), axis=1)  # (GROUPS,)
        offs_g = k0 // GROUP + tl.arange(0, GROUPS)
        g_mask = n_mask[:, None] & (offs_g < n_groups)[None, :]
        s = tl.load(s_ptr + offs_n[:, None] * n_groups + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n[:, None] * n_groups + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
        acc += tl.sum(qx * s + z * xg[None, :], axis=1)
    tl.store(out_ptr + (pid_k * M + pid_m) * N + offs_n, acc, mask=n_mask)


# Four packed bytes (8 codes) and 4 scales / zero points in 16-bit pairs -> the 4 low-nibble and the 4 high-nibble
# weights as 16-bit pairs. A code q becomes the 16-bit float OFFSET + q by bit pattern (prmt spreads bytes 0, 1
# (2, 3) to the two halves of a word, lop3 masks a nibble and ORs in OFFSET's bits), one fma removes OFFSET
# exactly and a second makes q * s + z, rounded once: two codes an instruction, no int-to-float conversion.
# OFFSET is 128 in bf16 (bits 0x4300) and 1024 in fp16 (0x6400).
def _pairs_ptx(one: str, neg: str, magic: str, ty: str) -> str:
    """The PTX of _nibble_weights for one 16-bit type: `one` and `neg` are the bits of 1.0 and -OFFSET in pairs,
    `magic` OFFSET's. Out $0, $1: the low nibbles of bytes 0-1 and 2-3; $2, $3: the high ones; in $4: the 4 bytes,
    $5, $6: scale pairs, $7, $8: zero-point pairs."""
    def pair(src, out, scale, zero):  # the two nibbles at bits 0-3 and 16-19 of src -> q * s + z
        return (f"lop3.b32 v, {src}, 0x000F000F, {magic}, 0xea;\n"  # (src & mask) | magic: OFFSET + q
                f"fma.rn.{ty} v, v, one, neg;\n"  # q, exactly
                f"fma.rn.{ty} {out}, v, {scale}, {zero};\n")
    return ("{\n.reg .b32 t01, t23, one, neg, v;\n"
            "prmt.b32 t01, $4, 0, 0x4140;\nprmt.b32 t23, $4, 0, 0x4342;\n"  # bytes 0, 1 (2, 3) to bits 0 and 16
            f"mov.b32 one, {one};\nmov.b32 neg, {neg};\n"
            + pair("t01", "$0", "$5", "$7") + pair("t23", "$1", "$6", "$8")
            + "shr.b32 t01, t01, 4;\nshr.b32 t23, t23, 4;\n"
            + pair("t01", "$2", "$5", "$7") + pair("t23", "$3", "$6", "$8") + "}").replace("\n", " ")


# Globals the kernel reads, not constexpr arguments, and on one line: Inductor writes a traced kernel's string
# arguments into its generated Python unescaped (the braces made a SyntaxError there), and a global by repr inside
# the kernel's source, itself a string literal there, where each "\n" of the repr becomes a real line break.
_PAIRS_BF16 = tl.constexpr(_pairs_ptx(one="0x3F803F80", neg="0xC300C300", magic="0x43004300", ty="bf16x2"))
_PAIRS_FP16 = tl.constexpr(_pairs_ptx(one="0x3C003C00", neg="0xE400E400", magic="0x64006400", ty="f16x2"))
PAIRS_OFF, PAIRS_BF16, PAIRS_FP16, PAIRS_ARITHMETIC = 0, 1, 2, 3  # the kernel's PAIRS


@triton.jit
def _nibble_weights(packed, s, z, PAIRS: tl.constexpr):
    """(w_lo, w_hi), each like packed (BLOCK_N, HALF): the weights q * s + z of the low and the high nibble of
    each byte, in s's 16-bit dtype, with s and z given per byte (broadcast from their group). PAIRS: PAIRS_BF16 or
    PAIRS_FP16 (the PTX for s's dtype), or PAIRS_ARITHMETIC for plain arithmetic (the interpreter)."""
    if PAIRS == 1 or PAIRS == 2:
        lo, hi = tl.inline_asm_elementwise(_PAIRS_BF16 if PAIRS == 1 else _PAIRS_FP16, "=r,=r,=r,=r,r,r,r,r,r",
                                           [packed, s, z], dtype=(s.dtype, s.dtype), is_pure=True, pack=4)
    else:  # the same values: fp32, then one rounding to s's dtype
        sf, zf = s.to(tl.float32), z.to(tl.float32)
        lo = ((packed & 0xF).to(tl.float32) * sf + zf).to(s.dtype)
        hi = ((packed >> 4).to(tl.float32) * sf + zf).to(s.dtype)
    return lo, hi


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
    WORDS: tl.constexpr,  # one row, w_ptr the packed codes as int32 words (8 codes each)
    PAIRS: tl.constexpr = 0,  # several 16-bit rows: weights made in 16-bit pairs (_nibble_weights), PAIRS_* above
):
    if WORDS:
        _int4_row_words(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, k_blocks_per_split, GROUP, BLOCK_N, BLOCK_K)
        return
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
        if PAIRS:  # the scale and zero point of each byte's group, then both nibbles' weights at once
            sb = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, GROUPS, GROUP // 2)), (BLOCK_N, HALF))
            zb = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, GROUPS, GROUP // 2)), (BLOCK_N, HALF))
            w_even, w_odd = _nibble_weights(packed, sb.to(x_ptr.dtype.element_ty), zb.to(x_ptr.dtype.element_ty),
                                            PAIRS)
        else:
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
                  num_warps: int, words: bool, pairs: bool) -> torch.Tensor:
    M, K = x.shape
    N = packed.shape[0]
    per_split = triton.cdiv(triton.cdiv(K, block_k), split_k)
    partial = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, block_n), split_k, triton.cdiv(M, block_m))
    wrap_triton(_int4_gemv_kernel)[grid](
        x, packed.view(torch.int32) if words else packed, scales, zeros, partial, M, N, K, per_split,
        GROUP=K // scales.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_IEEE=x.dtype == torch.float32, WORDS=words,
        PAIRS=PAIRS_OFF if not pairs else PAIRS_ARITHMETIC if _INTERPRET else
        PAIRS_FP16 if x.dtype == torch.float16 else PAIRS_BF16,
        num_warps=num_warps,
    )
    return finish_partials(partial, bias, x.dtype)


# Block sizes (block_m, block_n, block_k, num_warps) for one row and for several; block_k is raised
# to the group size when smaller. The most common best of the sweep in benchmarks/quant_bench.py on an
# H100 at Llama-2-7B shapes (BENCHMARKS.md, 2026-11-25); split-K as planned with 8 programs per SM.
ONE_ROW = (1, 64, 128, 4)
MANY_ROWS = (16, 32, 128, 4)
PROGRAMS_PER_SM = 8
# Several bf16 / fp16 rows make the tile's weights two a PTX instruction from bit patterns (_nibble_weights),
# with their own tiles and split-K plan: the best sum over a 7B layer's four products at 2 and 8 rows of an H200
# sweep (6 tiles x 1, 2, 4, 8 programs an SM; BENCHMARKS.md, 2026-12-02 session 10).
PAIRS = True
PAIRS_ROWS = (16, 64, 256, 4)
PAIRS_PROGRAMS_PER_SM = 2


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              bias: torch.Tensor | None = None, *, blocks: tuple[int, int, int, int] | None = None,
              split_k: int | None = None, words: bool = True, pairs: bool | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for x (M, K) and W the int4 matrix (packed, scales, zeros) -> (M, N) in x.dtype.

    blocks (block_m, block_n, block_k, num_warps) and split_k override the defaults (tests, sweeps);
    words=False turns off the one-row path that reads the codes as int32 words (for comparison); pairs (None:
    PAIRS) makes several bf16 / fp16 rows' weights in 16-bit pairs by bit operations (False: the fp32
    dequantization, for comparison).
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
    pairs = (PAIRS if pairs is None else pairs) and x.dtype in (torch.bfloat16, torch.float16)
    block_m, block_n, block_k, num_warps = blocks or (ONE_ROW if M == 1 else PAIRS_ROWS if pairs else MANY_ROWS)
    pairs = pairs and block_m >= 16
    block_k = max(block_k, group)
    if block_k % group or (block_m & (block_m - 1)) or (block_n & (block_n - 1)) or (block_k & (block_k - 1)):
        raise BlitzgenError(f"int4_gemv: blocks {block_m, block_n, block_k} must be powers of two, block_k a "
                            f"multiple of the group size {group}")
    if split_k is None:
        split_k = plan_split_k(x.device, triton.cdiv(N, block_n), triton.cdiv(K, block_k),
                               PAIRS_PROGRAMS_PER_SM if pairs else PROGRAMS_PER_SM)
    split_k = min(split_k, triton.cdiv(K, block_k))
    words = words and block_m == 1  # K / 2 bytes a row is a multiple of 16: whole words
    return torch.ops.blitzgen.int4_gemv(x.contiguous(), packed.contiguous(), scales, zeros, bias, split_k,
                                        block_m, block_n, block_k, num_warps, words, pairs)
