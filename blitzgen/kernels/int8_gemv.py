"""Weight-only int8 GEMV: a few activation rows times an int8 matrix with per-output-channel scales.

Math (x: M rows of K activations; q: N x K int8 codes; s: N scales; b: optional N bias):

    y[m, n] = s[n] * sum_k x[m, k] * q[n, k] + b[n]

Because the scale belongs to the output channel it is applied once per output, after the K
reduction; the kernel never builds a dequantized matrix. Contract:

    x        (M, K)  bf16 | fp16 | fp32, any M (decode calls it with 1..8 rows)
    weight   (N, K)  int8, contiguous (Int8Linear.weight)
    scales   (N,)    bf16 | fp16 | fp32
    bias     (N,)    or None
    returns  (M, N)  in x.dtype; the sum is accumulated in fp32

Decode at batch 1..8 reads each weight byte once and does a handful of operations per byte, so
the kernel is bound by memory bandwidth. One program owns BLOCK_N output channels and a range of
K: each row of the weight tile is BLOCK_K contiguous bytes, read with 16-byte vector loads. When
N is short relative to the number of SMs (a 4096 x 4096 matrix has only 256 tiles of 16 rows),
K is split over SPLIT_K programs ("split-K") that write fp32 partial sums, added afterwards, so
every SM streams weights. Rows: one row uses a CUDA-core multiply-add with a per-thread
accumulator reduced once at the end, reading the codes as int32 words and making floats of them
by bit pattern (see _byte_times: Hopper's int-to-float cast is quarter-rate; measured on an H100
this lifts the one-row GEMV from 52-81% to 56-86% of the read ceiling); more rows use tl.dot on
tensor cores with the rows padded to 16, so batch 8 reads the weights once, not eight times.
(Feeding those dots from the same bit-pattern words, one dot per byte plane, was measured on an
H100 and ran at half the speed of casting the bytes: removed.)

On an H200 the one-row path reads 45-76% of the bandwidth; one-row bf16 / fp16 decode takes
gemv_a8.py instead (51-87%: activations rounded to int8, integer dot products; quantize.py's
INT8_ACTIVATIONS_INT8), and this kernel serves several rows, float32 and exact activations.

The op is registered with torch.library.triton_op (`torch.ops.blitzgen.int8_gemv`), so
torch.compile traces it into the compiled, CUDA-graphed decode step.
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from blitzgen.errors import BlitzgenError
from blitzgen.kernels import triton_runs_on


def int8_gemv_ref(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch twin of int8_gemv (the CPU path and the test oracle), in fp32."""
    y = (x.float() @ weight.float().t()) * scales.float()  # (M, N)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def _byte_times(words, SHIFT: tl.constexpr, x):
    """(byte of `words` at bit SHIFT, sign-flipped, as the int8 code it stands for) * x[None, :]."""
    u = ((words >> SHIFT) & 0xFF) | 0x4B000000  # bits of the float32 2^23 + u
    return (u.to(tl.float32, bitcast=True) - 8388736.0) * x[None, :]  # 8388736 = 2^23 + 128


@triton.jit
def _int8_gemv_kernel(
    x_ptr,  # (M, K) activations, contiguous
    w_ptr,  # (N, K) int8 weight codes, contiguous
    s_ptr,  # (N,) per-output-channel scales
    out_ptr,  # (SPLIT_K, M, N) fp32 partial sums, one slab per K split
    M,  # activation rows
    N,  # output channels
    K,  # input features
    k_blocks_per_split,  # BLOCK_K-wide blocks of K each program reduces
    BLOCK_M: tl.constexpr,  # rows per program: 1 (CUDA-core path) or >= 16 (tensor-core dot path)
    BLOCK_N: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # K elements per loop step (bytes per weight row per load)
    DOT_IEEE: tl.constexpr,  # fp32 activations: keep the dot in full fp32 (no TF32 rounding)
    WORDS: tl.constexpr,  # one row, w_ptr the codes as int32 words (4 per word): convert by bit pattern
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_begin = pid_k * k_blocks_per_split * BLOCK_K
    if WORDS:
        # One row, codes read as int32 words. Casting int8 to float is a quarter-rate instruction on
        # Hopper's CUDA cores (16 per clock per SM): at 3 TB/s of codes it would be most of the
        # chip's conversion rate. Instead each byte b is flipped to u = b ^ 0x80 in [0, 255] and
        # placed in the mantissa of 2^23: the float32 with bits 0x4B000000 | u is 2^23 + u exactly,
        # so q = that - (2^23 + 128), with full-rate integer and add instructions.
        NW: tl.constexpr = BLOCK_K // 4
        acc = tl.zeros((BLOCK_N, NW), dtype=tl.float32)
        x_row = x_ptr + pid_m * K
        offs_j = tl.arange(0, 4)
        for i in range(k_blocks_per_split):
            offs_w = (k_begin + i * BLOCK_K) // 4 + tl.arange(0, NW)
            w_mask = offs_w < K // 4
            words = tl.load(w_ptr + offs_n[:, None] * (K // 4) + offs_w[None, :],
                            mask=n_mask[:, None] & w_mask[None, :], other=0)  # (BLOCK_N, NW) int32
            words ^= -2139062144  # 0x80808080: every byte's sign bit flipped, u = b + 128 in [0, 255]
            x = tl.load(x_row + offs_w[:, None] * 4 + offs_j[None, :], mask=w_mask[:, None],
                        other=0.0).to(tl.float32)  # (NW, 4): column j multiplies byte j of each word
            x_even, x_odd = tl.split(tl.reshape(x, (NW, 2, 2)))  # bytes (0, 2) and (1, 3)
            x0, x2 = tl.split(x_even)
            x1, x3 = tl.split(x_odd)
            acc += _byte_times(words, 0, x0) + _byte_times(words, 8, x1)
            acc += _byte_times(words, 16, x2) + _byte_times(words, 24, x3)
        scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + (pid_k * M + pid_m) * N + offs_n, tl.sum(acc, axis=1) * scale, mask=n_mask)
    elif BLOCK_M == 1:
        # One row: multiply-add into a (BLOCK_N, BLOCK_K) register tile, reduced across K only once.
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        x_row = x_ptr + pid_m * K
        for i in range(k_blocks_per_split):
            offs_k = k_begin + i * BLOCK_K + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0)  # (BLOCK_N, BLOCK_K) int8
            x = tl.load(x_row + offs_k, mask=k_mask, other=0.0)  # (BLOCK_K,)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y = tl.sum(acc, axis=1) * scale  # (BLOCK_N,)
        tl.store(out_ptr + (pid_k * M + pid_m) * N + offs_n, y, mask=n_mask)
    else:
        # Several rows: tensor-core dot of (BLOCK_M, BLOCK_K) rows (padded with zeros) by the
        # (BLOCK_K, BLOCK_N) transposed tile; int8 codes are exact in bf16 / fp16 / fp32.
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(k_blocks_per_split):
            offs_k = k_begin + i * BLOCK_K + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0)  # (BLOCK_N, BLOCK_K) int8
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)  # (BLOCK_M, BLOCK_K)
            if DOT_IEEE:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y = acc * scale[None, :]  # (BLOCK_M, BLOCK_N)
        out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out, y, mask=m_mask[:, None] & n_mask[None, :])


@triton_op("blitzgen::int8_gemv", mutates_args=())
def _int8_gemv_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                  split_k: int, block_m: int, block_n: int, block_k: int, num_warps: int,
                  words: bool) -> torch.Tensor:
    M, K = x.shape
    N = weight.shape[0]
    k_blocks = triton.cdiv(K, block_k)
    per_split = triton.cdiv(k_blocks, split_k)
    partial = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, block_n), split_k, triton.cdiv(M, block_m))
    wrap_triton(_int8_gemv_kernel)[grid](
        x, weight.view(torch.int32) if words else weight, scales, partial, M, N, K, per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_IEEE=x.dtype == torch.float32, WORDS=words,
        num_warps=num_warps,
    )
    return finish_partials(partial, bias, x.dtype)


def finish_partials(partial: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(SPLIT_K, M, N) fp32 partial sums of a GEMV kernel -> (M, N): summed over K splits, + bias, in dtype."""
    y = partial.sum(0) if partial.shape[0] > 1 else partial[0]
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


# Block sizes (block_m, block_n, block_k, num_warps) for one row and for several: the best of the
# sweep in benchmarks/quant_bench.py on an H100 at Llama-2-7B shapes (BENCHMARKS.md, 2026-11-25):
# 8 rows of 1 KiB per step for one row, and no split-K at these shapes (the split's fp32 partials and
# their sum cost more than the extra programs gain once there are about 2 tiles per SM).
ONE_ROW = (1, 8, 1024, 4)
MANY_ROWS = (16, 32, 256, 4)
# Split K until there are about this many programs per SM (or K runs out of blocks).
PROGRAMS_PER_SM = 2


def plan_split_k(device: torch.device, n_tiles: int, k_blocks: int, programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """K splits so that n_tiles x splits programs fill the GPU; the blocks divide evenly among them."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    split = max(1, min(k_blocks, triton.cdiv(programs_per_sm * sms, n_tiles)))
    return triton.cdiv(k_blocks, triton.cdiv(k_blocks, split))  # no split left without a block


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
              *, blocks: tuple[int, int, int, int] | None = None, split_k: int | None = None,
              words: bool = True) -> torch.Tensor:
    """y = (x @ weight.T) * scales + bias for x (M, K), weight (N, K) int8 -> (M, N) in x.dtype.

    blocks (block_m, block_n, block_k, num_warps) and split_k override the defaults (tests, sweeps);
    words=False turns off the one-row path that reads the codes as int32 words (for comparison).
    Falls back to int8_gemv_ref where Triton cannot run (CPU without TRITON_INTERPRET=1).
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise BlitzgenError(f"int8_gemv: x {tuple(x.shape)} and weight {tuple(weight.shape)} must be (M, K) and (N, K)")
    if weight.dtype != torch.int8 or scales.shape != (weight.shape[0],):
        raise BlitzgenError(f"int8_gemv: expected int8 weight and (N,) scales, got {weight.dtype} and "
                            f"{tuple(scales.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise BlitzgenError(f"int8_gemv: activations must be bf16, fp16 or fp32, got {x.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise BlitzgenError(f"int8_gemv: bias {tuple(bias.shape)} must be (N,) = ({weight.shape[0]},)")
    if not triton_runs_on(x):
        return int8_gemv_ref(x, weight, scales, bias)
    M, K = x.shape
    N = weight.shape[0]
    block_m, block_n, block_k, num_warps = blocks or (ONE_ROW if M == 1 else MANY_ROWS)
    if (block_m & (block_m - 1)) or (block_n & (block_n - 1)) or (block_k & (block_k - 1)):
        raise BlitzgenError(f"int8_gemv: blocks {block_m, block_n, block_k} must be powers of two")
    if split_k is None:
        split_k = plan_split_k(x.device, triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    split_k = min(split_k, triton.cdiv(K, block_k))
    words = words and block_m == 1 and K % 4 == 0 and block_k >= 4  # whole words per row and tile
    return torch.ops.blitzgen.int8_gemv(x.contiguous(), weight.contiguous(), scales, bias, split_k,
                                        block_m, block_n, block_k, num_warps, words)
