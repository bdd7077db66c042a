"""int8 / int4 GEMV with the activations rounded to int8: integer dot products, four per instruction.

Why. At one activation row the weight-only kernels (int8_gemv.py, int4_gemv.py) spend several
CUDA-core instructions on every code (shift, mask, make a float of it, multiply-add), and on an
H200 that caps them at 45-75% (int8) and 15-30% (int4) of the memory bandwidth (BENCHMARKS.md,
2026-12-01): the weights arrive faster than the cores can turn them into floats. Rounding the
activations to int8 too lets the codes stay integers: `dp4a` multiplies four int8 pairs and adds
them to an int32 in one instruction, so an int8 word of 4 codes costs one instruction and an int4
word of 8 codes costs two masks, a shift and two dp4a. This is the scheme of llama.cpp's CUDA
matrix-vector kernels (activations in int8 blocks of 32, each with its own scale).

Math. x (M, K) is cut into blocks of 32 along K; block b of row m gets the scale
a[m, b] = max|x[m, block b]| / 127 and the codes c = round(x / a) in [-127, 127]
(quantize_activations). Then, with d[m, n, b] = sum over k in block b of c[m, k] * q[n, k], exact
in int32:

    int8 (per-channel scale s[n]):           y[m, n] = s[n] * sum_b a[m, b] * d[m, n, b]
    int4 (group g of G >= 32: scale s, zero z, code q in [0, 15]):
        y[m, n] = sum_g (s[n, g] * sum_{b in g} a[m, b] * d[m, n, b] + z[n, g] * xsum[m, g])

where xsum[m, g] is the sum of the unrounded x over group g (the zero-point term is exact), added up
from the block sums quantize_activations makes beside the scales. The
only rounding beyond the weight format's is that of x to 8 bits per block of 32 (a relative error
of at most 1/254 of the block's largest entry per entry); BENCHMARKS.md records what it costs in
perplexity.

Layout. Weights are the formats' own, read as int32 words: int8 (N, K / 4) words of 4 codes; int4
(N, K / 8) words of 8 codes, byte j holding codes 2j (low nibble) and 2j + 1 (high nibble). So the
low nibbles of an int4 word are codes 0, 2, 4, 6 and the high ones 1, 3, 5, 7. The activation codes
are in k order, 4 to a word, for both formats: for int4 the kernel gathers each pair of activation
words into the even-code and the odd-code word with two byte permutes (`prmt`), so that both dp4a
operands line up byte for byte. It loads a block's 8 activation words as two halves of 4 in the
weights' own register layout; an int64 load per weight word measured 2.3% slower (a shared-memory
exchange each tile). (Session 5 laid the activations out in that order beforehand instead;
the permuted copy and the group sums cost Inductor two extra kernels per product, and an int4 Llama-2-7B
step was 15% slower for it on an H200, BENCHMARKS.md session 6.)

Contract (gemv_a8; quantize_activations makes the first three):

    xw      (M, K / 4)       int32, activation codes in k order, 4 per word
    xs      (M, K / 32)      float32 block scales a
    xbs     (M, K / 32)      float32 block sums of the unrounded x, int4 only (None for int8)
    weight  int8: (N, K) int8; int4: (N, K / 2) uint8 packed codes
    scales  int8: (N,); int4: (N, K / G), with zeros (N, K / G)
    returns (M, N) in `dtype`; M <= MAX_ROWS, K a multiple of 32 (int4: of G)

One program owns BLOCK_N output channels and a range of K for all M rows (each weight word is
loaded once and used for every row). Split-K and the partial sums are as in int8_gemv.py.

dp4a is inline PTX, which Triton's CPU interpreter cannot run: there (tests in CI) the same kernel
computes each dp4a from its four byte products with shifts and multiplies, the same integers; on the
GPU the tests compare the PTX path with the same reference.
"""

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from blitzgen.errors import BlitzgenError
from blitzgen.kernels import triton_runs_on, unpack_int4
from blitzgen.kernels.int8_gemv import finish_partials, plan_split_k

BLOCK = 32  # activation entries per int8 scale
MAX_ROWS = 8  # one program takes every row; quantize.py calls it with one (several measured slower)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def quantize_activations(x: torch.Tensor, sums: bool = False):
    """x (M, K) float -> (xw (M, K / 4) int32 codes in k order, xs (M, K / 32) float32 scales, xbs
    (M, K / 32) float32 block sums if `sums` (int4 weights need them) else None). Plain PyTorch, so
    inside the compiled step Inductor fuses it into the kernel producing x: all three are reductions
    or maps over the same blocks of 32, one kernel."""
    M, K = x.shape
    xf = x.float().view(M, K // BLOCK, BLOCK)
    amax = xf.abs().amax(-1)  # (M, K / 32)
    xs = torch.where(amax > 0, amax / 127, 1.0)
    codes = torch.round(xf / xs[..., None]).to(torch.int8)  # |x / xs| <= 127: no clamp needed
    return codes.view(M, K).view(torch.int32), xs, xf.sum(-1) if sums else None


def _block_dots(xw: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """d[m, n, b] of the module docstring, in float64 (exact: |d| < 2^21), from the activation
    words and the weight codes (N, K) as integers."""
    M = xw.shape[0]
    c = xw.contiguous().view(torch.int8).view(M, -1).double()  # (M, K)
    K = c.shape[1]
    return torch.einsum("mbk,nbk->mnb", c.view(M, K // BLOCK, BLOCK), codes.double().view(-1, K // BLOCK, BLOCK))


def int8_gemv_a8_ref(xw, xs, weight, scales, bias=None, dtype=torch.float32) -> torch.Tensor:
    """Plain-PyTorch twin of gemv_a8 for int8 weights, in float64."""
    y = (_block_dots(xw, weight) * xs.double()[:, None, :]).sum(-1) * scales.double()
    return (y if bias is None else y + bias.double()).to(dtype)


def int4_gemv_a8_ref(xw, xs, xbs, packed, scales, zeros, bias=None, dtype=torch.float32) -> torch.Tensor:
    """Plain-PyTorch twin of gemv_a8 for int4 weights, in float64."""
    codes = unpack_int4(packed)  # (N, K)
    t = _block_dots(xw, codes) * xs.double()[:, None, :]  # (M, N, K / 32)
    M, N, NB = t.shape
    groups = scales.shape[1]
    tg = t.view(M, N, groups, NB // groups).sum(-1)  # (M, N, K / G)
    xsum = xbs.double().view(M, groups, NB // groups).sum(-1)  # (M, K / G)
    y = (tg * scales.double() + zeros.double() * xsum[:, None, :]).sum(-1)
    return (y if bias is None else y + bias.double()).to(dtype)


@triton.jit
def _dp4a(a, b, c, A_SIGNED: tl.constexpr, ASM: tl.constexpr):
    """c + sum over the four bytes j of a_j * b_j (int32 words; b's bytes signed, a's signed or not)."""
    if ASM:
        if A_SIGNED:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    # The interpreter: the same sum, byte by byte (arithmetic shifts sign-extend).
    for j in tl.static_range(4):
        bj = (b << (24 - 8 * j)) >> 24
        if A_SIGNED:
            aj = (a << (24 - 8 * j)) >> 24
        else:
            aj = (a >> (8 * j)) & 0xFF
        c += aj * bj
    return c


@triton.jit
def _even_odd(a, b, ASM: tl.constexpr):
    """From two words of 4 consecutive int8 codes (codes 0-3 in a, 4-7 in b), the word of codes 0, 2,
    4, 6 and the word of codes 1, 3, 5, 7: the order of an int4 weight word's low and high nibbles."""
    if ASM:
        even = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x6420;", "=r,r,r", [a, b],
                                         dtype=tl.int32, is_pure=True, pack=1)
        odd = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7531;", "=r,r,r", [a, b],
                                        dtype=tl.int32, is_pure=True, pack=1)
        return even, odd
    # The interpreter: the same bytes moved with masks and shifts (`(v >> 16) << 24` keeps byte 2 of v as
    # the top byte without writing a mask that does not fit an int32).
    even = (a & 0xFF) | ((a >> 8) & 0xFF00) | ((b & 0xFF) << 16) | ((b >> 16) << 24)
    odd = ((a >> 8) & 0xFF) | ((a >> 16) & 0xFF00) | (((b >> 8) & 0xFF) << 16) | ((b >> 24) << 24)
    return even, odd


@triton.jit
def _activation_words(xrow, offs_w, w_mask, WPB: tl.constexpr, ASM: tl.constexpr):
    """The even-code and odd-code activation words for weight words offs_w (NB, WPB) of one row."""
    # A block's 8 activation words as two (NB, WPB) halves of 4 contiguous words, the weights' own
    # layout (one 16-byte load each); weight word j takes words 2j and 2j + 1 of its block.
    first = tl.load(xrow + offs_w + (offs_w // WPB) * WPB, mask=w_mask, other=0)  # words 0-3 of each block
    second = tl.load(xrow + offs_w + (offs_w // WPB + 1) * WPB, mask=w_mask, other=0)  # words 4-7
    NB: tl.constexpr = offs_w.shape[0]
    a0, b0 = tl.split(tl.reshape(first, (NB, WPB // 2, 2)))  # (NB, 2): words 0, 2 and 1, 3
    a1, b1 = tl.split(tl.reshape(second, (NB, WPB // 2, 2)))
    e0, o0 = _even_odd(a0, b0, ASM)  # for weight words 0, 1
    e1, o1 = _even_odd(a1, b1, ASM)  # for weight words 2, 3
    even = tl.reshape(tl.permute(tl.join(e0, e1), (0, 2, 1)), (NB, WPB))
    odd = tl.reshape(tl.permute(tl.join(o0, o1), (0, 2, 1)), (NB, WPB))
    return even, odd


@triton.jit
def _gemv_a8_kernel(
    xw_ptr,  # (M, K / 4) int32 activation words
    xs_ptr,  # (M, K / 32) float32 block scales
    xbs_ptr,  # (M, K / 32) float32 block sums (int4; unused for int8)
    w_ptr,  # int8: (N, K / 4) int32 words; int4: (N, K / 8) int32 words
    s_ptr,  # int8: (N,) scales; int4: (N, K / GROUP)
    z_ptr,  # int4: (N, K / GROUP) zero points (unused for int8)
    out_ptr,  # (SPLIT_K, M, N) float32 partial sums
    N, K,
    w_stride,  # weight words per row (K / 4 or K / 8), passed so Triton can prove 16-byte alignment
    x_stride,  # activation words per row, K / 4 (likewise)
    tiles_per_split,  # BLOCK_K-wide tiles of K each program reduces
    M: tl.constexpr,  # activation rows, 1..MAX_ROWS: the row loop is unrolled
    BLOCK_M: tl.constexpr,  # M rounded up to a power of two (the accumulator's rows)
    INT4: tl.constexpr,
    GROUP: tl.constexpr,  # int4 group size (a multiple of 32 dividing BLOCK_K); 32 for int8
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # a multiple of GROUP
    ASM: tl.constexpr,  # dp4a as PTX (GPU) or spelt out (interpreter)
):
    # A tile is (BLOCK_N, NB, WPB) words: NB activation blocks of WPB words each. The WPB words of a
    # block are contiguous (16 or 32 bytes: vector loads) and summed inside a thread.
    CODES: tl.constexpr = 8 if INT4 else 4  # codes per weight word
    WPB: tl.constexpr = 32 // CODES  # weight words per activation block
    NB: tl.constexpr = BLOCK_K // 32  # activation blocks per tile
    BPG: tl.constexpr = GROUP // 32  # activation blocks per int4 group
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    offs_bw = tl.arange(0, NB)[:, None] * WPB + tl.arange(0, WPB)[None, :]  # (NB, WPB) word in the tile
    k_begin = pid_k * tiles_per_split * BLOCK_K
    # Per row, partial sums per activation block (int8) or group (int4) kept across tiles: no reduction
    # across threads inside the loop, one at the end.
    C: tl.constexpr = BLOCK_K // GROUP if INT4 else NB
    acc = tl.zeros((BLOCK_M, BLOCK_N, C), dtype=tl.float32)
    for i in range(tiles_per_split):
        k0 = k_begin + i * BLOCK_K
        offs_w = k0 // CODES + offs_bw  # (NB, WPB) word index along the row
        # Bounded by w_stride, not K // CODES: Triton knows it divisible by 16, so the mask keeps 16-byte loads.
        w_mask = offs_w < w_stride  # K is a multiple of 32 (int4: of GROUP): whole blocks are masked
        words = tl.load(w_ptr + offs_n[:, None, None] * w_stride + offs_w[None, :, :],
                        mask=n_mask[:, None, None] & w_mask[None, :, :], other=0)  # (BLOCK_N, NB, WPB)
        if INT4:
            lo = words & 0x0F0F0F0F  # codes 0, 2, 4, 6 of each word, one per byte
            hi = (words >> 4) & 0x0F0F0F0F  # codes 1, 3, 5, 7
            GROUPS: tl.constexpr = BLOCK_K // GROUP
            n_groups = K // GROUP
            offs_g = k0 // GROUP + tl.arange(0, GROUPS)
            g_mask = offs_g < n_groups
            ng_mask = n_mask[:, None] & g_mask[None, :]
            s = tl.load(s_ptr + offs_n[:, None] * n_groups + offs_g[None, :], mask=ng_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + offs_n[:, None] * n_groups + offs_g[None, :], mask=ng_mask, other=0.0).to(tl.float32)
        offs_b = k0 // 32 + tl.arange(0, NB)
        b_mask = offs_b < K // 32
        for m in tl.static_range(M):
            xrow = xw_ptr + m * x_stride
            xs = tl.load(xs_ptr + m * (K // 32) + offs_b, mask=b_mask, other=0.0)  # (NB,)
            if INT4:  # activation words 2i and 2i + 1 hold the codes of weight word i, in k order
                x_even, x_odd = _activation_words(xrow, offs_w, w_mask, WPB, ASM)
                d = _dp4a(lo, x_even[None, :, :], tl.zeros((BLOCK_N, NB, WPB), tl.int32), False, ASM)
                d = _dp4a(hi, x_odd[None, :, :], d, False, ASM)
            else:
                x = tl.load(xrow + offs_w, mask=w_mask, other=0)  # (NB, WPB)
                d = _dp4a(words, x[None, :, :], tl.zeros((BLOCK_N, NB, WPB), tl.int32), True, ASM)
            t = tl.sum(d, axis=2).to(tl.float32) * xs[None, :]  # (BLOCK_N, NB): a_b * d_b
            if INT4:
                xbs = tl.load(xbs_ptr + m * (K // 32) + offs_g[:, None] * BPG + tl.arange(0, BPG)[None, :],
                              mask=g_mask[:, None], other=0.0)  # (GROUPS, BPG) block sums
                xsum = tl.sum(xbs, axis=1)  # (GROUPS,)
                tg = tl.sum(tl.reshape(t, (BLOCK_N, GROUPS, NB // GROUPS)), axis=2)  # (BLOCK_N, GROUPS)
                t = tg * s + z * xsum[None, :]
            if M == 1:
                acc += t[None, :, :]
            else:
                acc = tl.where((offs_m == m)[:, None, None], acc + t[None, :, :], acc)  # row m
    y = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N)
    if not INT4:
        y *= tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :]
    tl.store(out, y, mask=(offs_m < M)[:, None] & n_mask[None, :])


def _gemv_a8_op(xw: torch.Tensor, xs: torch.Tensor, xbs: torch.Tensor | None, weight: torch.Tensor,
                scales: torch.Tensor, zeros: torch.Tensor | None, bias: torch.Tensor | None, out_dtype: torch.dtype,
                split_k: int, block_n: int, block_k: int, num_warps: int) -> torch.Tensor:
    M, K = xw.shape[0], 4 * xw.shape[1]
    N = weight.shape[0]
    int4 = zeros is not None
    group = K // scales.shape[1] if int4 else BLOCK
    per_split = triton.cdiv(triton.cdiv(K, block_k), split_k)
    partial = torch.empty((split_k, M, N), dtype=torch.float32, device=xw.device)
    wrap_triton(_gemv_a8_kernel)[(triton.cdiv(N, block_n), split_k)](
        xw, xs, xbs if int4 else xs, weight.view(torch.int32), scales, zeros if int4 else scales, partial,
        N, K, K // 8 if int4 else K // 4, K // 4, per_split, M=M, BLOCK_M=triton.next_power_of_2(M), INT4=int4,
        GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k, ASM=not _INTERPRET, num_warps=num_warps,
    )
    return finish_partials(partial, bias, out_dtype)


if _INTERPRET:
    # Interpreted kernels run eagerly on CPU tensors and cannot be traced through: an opaque op there
    # (torch.compile traces a call to it through the fake below); on the GPU a triton_op Inductor sees into.
    torch.library.custom_op("blitzgen::gemv_a8", _gemv_a8_op, mutates_args=())
    torch.library.register_fake("blitzgen::gemv_a8")(
        lambda xw, xs, xbs, weight, *args: xw.new_empty((xw.shape[0], weight.shape[0]), dtype=args[3]))
else:
    triton_op("blitzgen::gemv_a8", _gemv_a8_op, mutates_args=())


# (block_n, block_k, num_warps) per format; split-K as planned with PROGRAMS_PER_SM programs per SM.
# The one-row best of benchmarks/quant_bench.py's sweep on an H200 at Llama-2-7B shapes (BENCHMARKS.md,
# 2026-12-01 session 5; int4: best at 4 of 5 shapes, int8: the most common best): few output channels
# and long stretches of K per program.
INT8_BLOCKS = (4, 2048, 4)
INT4_BLOCKS = (4, 4096, 4)
PROGRAMS_PER_SM = 4


def gemv_a8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
            bias: torch.Tensor | None = None, *, blocks: tuple[int, int, int] | None = None,
            split_k: int | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for x (M, K) 16-bit or float32, M <= MAX_ROWS, with x rounded to int8 blocks
    (see the module docstring). W: int8 (weight (N, K) int8, scales (N,)) or int4 (weight the packed
    (N, K / 2) uint8 codes, scales and zeros (N, K / G)). -> (M, N) in x.dtype. blocks (block_n,
    block_k, num_warps) and split_k override the defaults. Falls back to the references where Triton
    cannot run."""
    int4 = zeros is not None
    M, K = x.shape
    N = weight.shape[0]
    group = K // scales.shape[1] if int4 else None
    if M > MAX_ROWS or K % BLOCK or (int4 and (group % BLOCK or group * scales.shape[1] != K)):
        raise BlitzgenError(f"gemv_a8: x {tuple(x.shape)}: at most {MAX_ROWS} rows and K a multiple of {BLOCK}"
                            + (f" and of the group size {group}" if int4 else ""))
    if weight.shape[1] * (2 if int4 else 1) != K:
        raise BlitzgenError(f"gemv_a8: x {tuple(x.shape)} does not fit the weight {tuple(weight.shape)}")
    xw, xs, xbs = quantize_activations(x, sums=int4)
    return gemv_a8_codes(xw, xs, xbs, weight, scales, zeros, bias, x.dtype, blocks=blocks, split_k=split_k)


def gemv_a8_codes(xw, xs, xbs, weight, scales, zeros=None, bias=None, dtype=torch.bfloat16, *, blocks=None,
                  split_k=None) -> torch.Tensor:
    """gemv_a8 on activations already quantized by quantize_activations (benchmarks time the kernel
    alone this way; shapes as gemv_a8 checked them) -> (M, N) in dtype."""
    int4 = zeros is not None
    M, K = xw.shape[0], 4 * xw.shape[1]
    N = weight.shape[0]
    group = K // scales.shape[1] if int4 else None
    if not triton_runs_on(xw):
        if int4:
            return int4_gemv_a8_ref(xw, xs, xbs, weight, scales, zeros, bias, dtype)
        return int8_gemv_a8_ref(xw, xs, weight, scales, bias, dtype)
    block_n, block_k, num_warps = blocks or (INT4_BLOCKS if int4 else INT8_BLOCKS)
    block_k = max(block_k, group or BLOCK)
    if block_k % (group or BLOCK) or (block_n & (block_n - 1)) or (block_k & (block_k - 1)):
        raise BlitzgenError(f"gemv_a8: blocks {block_n, block_k} must be powers of two, block_k a multiple of "
                            f"{group or BLOCK}")
    if split_k is None:
        split_k = plan_split_k(xw.device, triton.cdiv(N, block_n), triton.cdiv(K, block_k), PROGRAMS_PER_SM)
    split_k = min(split_k, triton.cdiv(K, block_k))
    return torch.ops.blitzgen.gemv_a8(xw, xs, xbs, weight.contiguous(), scales, zeros, bias, dtype, split_k,
                                      block_n, block_k, num_warps)
