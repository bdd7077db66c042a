"""The bf16 / fp16 matrix-vector products of a batch-1 decode step, with their neighbours fused in.

Why. At batch 1 a decode step is four products a layer, each reading a weight matrix once for one
activation row. Inductor compiles them as reductions with the RMSNorm and the SiLU gate spelt into
them, and on an H200 they read at 73-101% of the bandwidth depending on the shape and on what
coordinate-descent tuning picked that compilation (BENCHMARKS.md, sessions 4-6); around them a layer
has two more kernels for the norms' statistics and the residual adds. These kernels do each half of a
layer's products in a fixed, tuned form:

    norm + wqkv:          y = W (x * r * g)             r = rsqrt(mean(x^2) + eps), g the norm weight
    wo + residual:        y = res + W a
    norm + w13, gated:    y = silu(W1 n) * (W3 n)       n = x * r * g; W1, W3 the two halves of w13
    w2 + residual:        y = res + W2 a

The norm is folded in as a scalar: W (x * r * g) = r * (W (x * g)), so each program sums x^2 over
the K it reads anyway and scales its outputs once at the end; no kernel computes the statistics
first. The SiLU gate is applied where the gate and up rows are summed (a program owns the same
BLOCK_N rows of both halves), so it is computed once per output instead of once per w2 row that
reads it, which is what a gate fused into w2's reduction costs (an exp per weight element).

RoPE and the cache write (gemv_rope_cache, one sequence): rotate-half RoPE pairs row i of a head with
row i + D/2, so a program of _gemv_rope_kernel owns BLOCK_N / 2 rows of a head's first half and the
same rows of its second half, rotates the fp32 sums, and stores q to its output and k, v straight into
the cache at the token's position, with the live length (position + 1) decode attention reads next.
What was a product, then RoPE / scatter kernels, is one launch. Measured on an H200 (BENCHMARKS.md,
2026-12-02 session 8): a Llama-2-7B step 3.660 ms against 3.806 with Inductor's RoPE and scatter after
the product and 3.676 with kernels/rope_cache.py's kernel there.

int8 codes (quantize.Int8Linear's format: (N, K) int8, one scale per row) are read by the same
kernels: the codes become floats in registers and the scales multiply the sums. On an H200 an int8
Llama-2-7B step took 2.934 ms this way against 3.047 through gemv_a8 (int8 activations, integer dot
products; BENCHMARKS.md, 2026-12-02 session 8), with the activations exact. With bf16 activations the
default (INT8_A8) rounds them to int8 blocks of 32 inside each program and multiplies with dp4a, four codes an
instruction (_row_products_a8): 2.029 ms a step (session 12). With INT8_A8 off the codes are read as int32 words
and codes and activations become floats by bit operations, without the int-to-float instruction that bounded the
conversion path (INT8_WORDS, _row_products_words): 2.663 against 2.915 ms (BENCHMARKS.md, 2026-12-02
session 11). Packed int4 codes (quantize.Int4Linear's format) take the a8 loop with group scales and zeros:
a Llama-2-7B int4 g128 step 1.972 ms against 2.325 through gemv_a8.py beside Inductor's kernels, 1.813 ms with
the tiles tuned in the step (session 12), 1.512 ms with the group scales loaded a tile ahead (session 18).

Rounding. Everything is accumulated in fp32 and rounded to the activation dtype once, at the store.
Hugging Face's RMSNorm rounds x * r to bf16 and multiplies by g in bf16 before the product, and the
residual add is done in bf16 after rounding the product; so in bf16 the results differ from the
reference implementations by a few bf16 ulps, and in fp32 by fp32 rounding only.

Contract:
    x           (1, K)   bf16 | fp16 | fp32: one activation row
    weight      (N, K)   x's dtype, contiguous (gate_up: (2 I, K), gate rows first, as FeedForward.w13),
                         or int8 codes with scales (N,) (gate_up: (2 I,))
    bias        (N,)     or None (not with gate_up: no supported model has one there)
    norm_weight (K,)     or None: RMSNorm of each row of x with this weight and eps first
    residual    (1, N)   or None: added to the product (not with gate_up)
    returns     (1, N)   (gate_up: (1, I)) in x.dtype

One row only. A several-row kernel (2..8 sequences on tensor cores, each weight tile read once for all
rows) was built and measured three times on an H200 and lost to Inductor's products every time: a layer's
products at 25% of read against 76% with weights prefetched by hand, 23-27% through Triton's software
pipeline; batch 8 decode 80.7 and 71.9 against 212.7 tokens/s per sequence (BENCHMARKS.md, 2026-12-02
sessions 8-9). It was removed: decode steps of several sequences keep Inductor's products.

One program owns BLOCK_N output rows (with gate_up, the same rows of both halves) and reads them
over all of K in tiles of BLOCK_K, multiplying into a (BLOCK_N, BLOCK_K) fp32 register tile that is
summed across K once at the end; the next tile is loaded one step ahead (int4's group scales and
zeros with it, and in bf16 / fp16 and int8's plain and normed products the activations too: X_AHEAD), and
weight loads carry an evict-first hint (each byte is read once) where the activation row, read by every program,
is kept.
No split-K: the epilogues (norm scale, gate, residual) need whole sums, and small BLOCK_N already
gives every SM several programs at these shapes.

Launch overlap (PDL). At these sizes a kernel's fixed costs (launch, the first loads' latency, the
tail of its last programs) are a few microseconds, as long as streaming a 4096 x 4096 matrix on an
H200. On Hopper each launch is therefore a programmatic dependent launch: a program first lets the
next kernel launch (griddepcontrol.launch_dependents), loads its first weight tile (weights are never
written, so that needs no wait), and only then waits for the previous kernel to finish
(griddepcontrol.wait) before reading x, the residual or writing its output. So one product's weights
start streaming during the previous kernel's tail. The exception is gemv_rope_cache's kernel: its dependent,
decode attention's first kernel, needs all its rows, so it lets it launch only after its own stores. Measured
on an H200 (BENCHMARKS.md, 2026-12-01 session 7): a Llama-2-7B layer's four products in sequence read 93% of the
bandwidth with PDL, 88% without, 81% as Inductor compiles them; a decode step took 3.86 ms against 4.09
without PDL and 4.21-4.35 through Inductor's products.

Registered with torch.library.triton_op (`torch.ops.blitzgen.gemv`) so torch.compile traces it into
the CUDA-graphed decode step. The PDL launch needs a launch attribute that Inductor's call of a traced
kernel does not pass, so on Hopper `torch.ops.blitzgen.gemv_pdl`, an opaque custom op, launches the
kernel itself. Under TRITON_INTERPRET=1 (the CPU tests) the op is opaque too.
"""

import os

import torch
import torch.nn.functional as F

from blitzgen.errors import BlitzgenError
from blitzgen.kernels import define_ops, hopper, triton_runs_on, unpack_int4

try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton

    from blitzgen.kernels.gemv_a8 import _dp4a
except ImportError:  # a CPU-only install without Triton (model.py imports this module): gemv() runs gemv_ref
    triton = None
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter cannot run inline PTX


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
             norm_weight: torch.Tensor | None = None, eps: float = 0.0, gate_up: bool = False,
             residual: torch.Tensor | None = None, scales: torch.Tensor | None = None,
             zeros: torch.Tensor | None = None, a8: bool = False) -> torch.Tensor:
    """Plain-PyTorch twin of gemv (the CPU path and the test oracle), in fp32; with a8, x (times the norm weight)
    rounded to int8 blocks of 32 as _row_products_a8 rounds it."""
    xf = x.float()
    r = torch.ones_like(xf[:, :1])
    if norm_weight is not None:
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        xf = xf * norm_weight.float()
    xq = round_blocks(xf) if a8 else xf
    if zeros is not None:  # packed int4 codes: quantize.Int4Linear's groups, scale and zero point
        N, groups = scales.shape
        codes = unpack_int4(weight).float().view(N, groups, -1)
        y = xq @ (codes * scales.float()[..., None]).view(N, -1).t()
        y = y + xf @ zeros.float().repeat_interleave(codes.shape[2], dim=1).t()  # the zero term: x unrounded
    else:
        y = xq @ weight.float().t()
    y = y * r  # RMSNorm's scalar: W (x * r * g) = r * (W (x * g))
    if scales is not None and zeros is None:  # int8 codes: quantize.Int8Linear's per-channel scales
        y = y * scales.float()
    if bias is not None:
        y = y + bias.float()
    if gate_up:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


def round_blocks(v: torch.Tensor) -> torch.Tensor:
    """v (M, K) fp32 rounded to int8 in blocks of 32 along K, each with the scale max|v| / 127, and made floats
    again: the activations _row_products_a8 multiplies (K a multiple of 32)."""
    M, K = v.shape
    blocks = v.view(M, K // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inv) * (amax / 127)).view(M, K)


if triton is not None:

    @triton.jit
    def _weight_tile(rows, second, K, offs_k, n_mask, TWO: tl.constexpr, WORDS_A_THREAD: tl.constexpr = 2):
        """The (BLOCK_N, BLOCK_K) weight tile at columns offs_k (zeros past K), and with TWO the tile of the
        rows `second` elements further on (gate_up: the up rows; rope: the rows half a head on). For int32 words
        of int8 codes (_row_products_words) K, offs_k and second count words."""
        mask = n_mask[:, None] & (offs_k < K)[None, :]
        ptrs = rows + offs_k[None, :]
        if rows.dtype.element_ty == tl.int8:
            # Load int8 codes 8 to a vector, as x's 16-bit entries are: with Triton's 16-byte vectors of 16 codes
            # the tile and x get different register layouts, and x is re-laid through shared memory every tile.
            ptrs = tl.max_contiguous(ptrs, [1, 8])
        elif rows.dtype.element_ty == tl.int32:  # words of codes: WORDS_A_THREAD neighbours a thread
            ptrs = tl.max_contiguous(ptrs, [1, WORDS_A_THREAD])
        # Each weight byte is read once: let it leave the L2 first, before the activation row every program reads.
        w = tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
        w2 = w
        if TWO:
            w2 = tl.load(ptrs + second, mask=mask, other=0.0, eviction_policy="evict_first")
        return w, w2


    @triton.jit
    def _vectors(x_ptr, g_ptr, offs, limit, NORM: tl.constexpr):
        """x[offs] and with NORM g[offs] (without, x again), zeros from `limit` on: the activation row and norm
        weight every program reads, so kept in the L2. The a8 loop reads them as int64 quads."""
        mask = offs < limit
        x = tl.load(x_ptr + offs, mask=mask, other=0, eviction_policy="evict_last")
        g = x
        if NORM:
            g = tl.load(g_ptr + offs, mask=mask, other=0, eviction_policy="evict_last")
        return x, g


    @triton.jit
    def _vector_tile(x_ptr, g_ptr, offs_k, K, NORM: tl.constexpr):
        """_vectors() at columns offs_k, as fp32: the float loop's x and g."""
        x, g = _vectors(x_ptr, g_ptr, offs_k, K, NORM)
        return x.to(tl.float32), g.to(tl.float32)


    @triton.jit
    def _row_products(x_ptr, g_ptr, rows, second, n_mask, K, eps, NORM: tl.constexpr, TWO: tl.constexpr,
                      PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_AHEAD: tl.constexpr = False):
        """(y, y2), each (BLOCK_N,) fp32: the dot products of the weight rows at `rows` (and with TWO of those
        `second` elements further) with the activation row, RMSNorm-scaled with NORM. The main loop of both
        one-row kernels, PDL's wait included (see gemv())."""
        if PDL == 1:  # (PDL == 2: the caller lets them start, later)
            tl.extra.cuda.gdc_launch_dependents()  # the next kernel's programs may start as SMs free up
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        # The tile of the next step is loaded one step ahead, so its bytes are in flight while this one is
        # multiplied; the first is loaded before waiting on the previous kernel (weights are never written).
        w, w2 = _weight_tile(rows, second, K, tl.arange(0, BLOCK_K), n_mask, TWO)
        if PDL:
            tl.extra.cuda.gdc_wait()  # x, the residual, the outputs and the caches are the previous kernels'
        if X_AHEAD:  # x (and g) one tile ahead too (see X_AHEAD)
            x_next, g_next = _vector_tile(x_ptr, g_ptr, tl.arange(0, BLOCK_K), K, NORM)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            if X_AHEAD:
                x, g = x_next, g_next
                x_next, g_next = _vector_tile(x_ptr, g_ptr, offs_k + BLOCK_K, K, NORM)
            else:
                x, g = _vector_tile(x_ptr, g_ptr, offs_k, K, NORM)
            if NORM:
                squares += x * x
                x *= g
            acc += w.to(tl.float32) * x[None, :]  # int8 codes too: see BLOCKS for why a plain conversion
            if TWO:
                acc2 += w2.to(tl.float32) * x[None, :]
            w, w2 = _weight_tile(rows, second, K, offs_k + BLOCK_K, n_mask, TWO)  # past K: masked, no traffic
        return _row_sums(acc, acc2, squares, K, eps, NORM, 0)


    @triton.jit
    def _row_sums(acc, acc2, squares, K, eps, NORM: tl.constexpr, SQUARES_AXIS: tl.constexpr):
        """The end of both product loops: acc and acc2 summed across K (axis 1) -> (BLOCK_N,) each, RMSNorm-scaled
        with NORM by the squares of x summed along SQUARES_AXIS."""
        y = tl.sum(acc, axis=1)
        y2 = tl.sum(acc2, axis=1)
        if NORM:
            scale = tl.rsqrt(tl.sum(squares, axis=SQUARES_AXIS) / K + eps)
            y *= scale
            y2 *= scale
        return y, y2


    @triton.jit
    def _code(words, SHIFT: tl.constexpr):
        """The int8 code q in byte SHIFT / 8 of each int32 word, as fp32, without a conversion instruction: q + 128
        in the low bits of 2^23's pattern is the float 2^23 + q + 128, exactly; subtracting that leaves q."""
        return ((((words >> SHIFT) & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0


    @triton.jit
    def _bf16_at(quads, SHIFT: tl.constexpr):
        """The bf16 at bit SHIFT of each int64 (four bf16 values) as fp32: a bf16 is the top half of its fp32."""
        return (((quads >> SHIFT) & 0xFFFF) << 16).to(tl.int32).to(tl.float32, bitcast=True)


    @triton.jit
    def _quads(ptr, offs, limit, lanes):
        """The int64 quads ptr[offs] (zeros from `limit` on) repeated over the tile's rows (`lanes`), two a thread,
        laid out as the weight words they multiply (_row_products_words)."""
        mask = (offs < limit)[None, :] & (lanes == 0)
        ptrs = tl.max_contiguous(ptr + offs[None, :] + lanes, [1, 2])
        return tl.load(ptrs, mask=mask, other=0, eviction_policy="evict_last")


    @triton.jit
    def _bf16_quad(q, g, NORM: tl.constexpr):
        """The four bf16 of each int64 q as fp32 (times those of g with NORM), and the sum of q's squares."""
        v0, v1, v2, v3 = _bf16_at(q, 0), _bf16_at(q, 16), _bf16_at(q, 32), _bf16_at(q, 48)
        squares = v0 * v0 + v1 * v1 + v2 * v2 + v3 * v3
        if NORM:
            v0, v1, v2, v3 = v0 * _bf16_at(g, 0), v1 * _bf16_at(g, 16), v2 * _bf16_at(g, 32), v3 * _bf16_at(g, 48)
        return v0, v1, v2, v3, squares


    @triton.jit
    def _row_products_words(x_ptr, g_ptr, rows, second, n_mask, K, eps, NORM: tl.constexpr, TWO: tl.constexpr,
                            PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """_row_products for int8 codes read as int32 words of four (rows, second in words) and bf16 activations
        (and norm weight) read as int64 quads of four (x_ptr, g_ptr): codes and activations become fp32 by bit
        operations and float adds, with no int-to-float conversion (see INT8_WORDS). Both are loaded as
        (BLOCK_N, BLOCK_K / 4) tiles, two elements a thread, so they get the same register layout (an activation
        vector broadcast over the rows would go through shared memory every tile)."""
        if PDL == 1:
            tl.extra.cuda.gdc_launch_dependents()
        W: tl.constexpr = BLOCK_K // 4  # words (and quads) a tile row
        KW = K // 4
        offs_w = tl.arange(0, W)
        lanes = tl.zeros((BLOCK_N, 1), dtype=tl.int32)  # the activations' offsets, repeated for every row
        acc = tl.zeros((BLOCK_N, W), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, W), dtype=tl.float32)
        squares = tl.zeros((BLOCK_N, W), dtype=tl.float32)  # every row sums the same squares
        w, w2 = _weight_tile(rows, second, KW, offs_w, n_mask, TWO)
        if PDL:
            tl.extra.cuda.gdc_wait()
        for k0 in range(0, K, BLOCK_K):
            ow = k0 // 4 + offs_w
            quads = _quads(x_ptr, ow, KW, lanes)
            g = _quads(g_ptr, ow, KW, lanes) if NORM else quads
            x0, x1, x2, x3, sq = _bf16_quad(quads, g, NORM)
            squares += sq  # unused without NORM (_row_sums), so compiled away
            acc += _code(w, 0) * x0 + _code(w, 8) * x1 + _code(w, 16) * x2 + _code(w, 24) * x3
            if TWO:
                acc2 += _code(w2, 0) * x0 + _code(w2, 8) * x1 + _code(w2, 16) * x2 + _code(w2, 24) * x3
            w, w2 = _weight_tile(rows, second, KW, ow + W, n_mask, TWO)  # the next tile; past K: masked, no traffic
        return _row_sums(acc, acc2, squares, K, eps, NORM, 1)


    @triton.jit
    def _abs_max4(v0, v1, v2, v3):
        return tl.maximum(tl.maximum(tl.abs(v0), tl.abs(v1)), tl.maximum(tl.abs(v2), tl.abs(v3)))


    @triton.jit
    def _chunks(t, CH: tl.constexpr):
        """(BLOCK_N, W) -> (BLOCK_N, W / CH): the sums of each CH neighbouring entries of a row (one thread's)."""
        if CH == 1:
            return t
        return tl.sum(tl.reshape(t, (t.shape[0], t.shape[1] // CH, CH)), axis=2)


    @triton.jit
    def _chunks1(t, CH: tl.constexpr):
        """(W,) -> (W / CH,): the sums of each CH neighbouring entries."""
        if CH == 1:
            return t
        return tl.sum(tl.reshape(t, (t.shape[0] // CH, CH)), axis=1)


    @triton.jit
    def _spread(t, REPEAT: tl.constexpr):
        """(B,) -> (B * REPEAT,): each entry repeated REPEAT times."""
        if REPEAT == 1:
            return t
        return tl.reshape(tl.broadcast_to(t[:, None], (t.shape[0], REPEAT)), (t.shape[0] * REPEAT,))


    @triton.jit
    def _rows(t, BLOCK_N: tl.constexpr):
        """(W,) -> (BLOCK_N, W): one activation vector for every row of the weight tile."""
        return tl.broadcast_to(t[None, :], (BLOCK_N, t.shape[0]))


    @triton.jit
    def _code_word(b0, b1, b2, b3, inv, ASM: tl.constexpr):
        """The int8 codes round(b_j * inv) (|b_j * inv| <= 127) as the bytes of one int32 word, b0 lowest. Adding
        1.5 * 2^23 to a float below 2^22 in size rounds it to an integer (ties to even) held in the low mantissa
        bits, so each code is the low byte of a float's pattern: no float-to-int instruction."""
        c0 = (b0 * inv + 12582912.0).to(tl.int32, bitcast=True)
        c1 = (b1 * inv + 12582912.0).to(tl.int32, bitcast=True)
        c2 = (b2 * inv + 12582912.0).to(tl.int32, bitcast=True)
        c3 = (b3 * inv + 12582912.0).to(tl.int32, bitcast=True)
        if ASM:  # three byte permutes
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t0, t1; prmt.b32 t0, $1, $2, 0x0040; prmt.b32 t1, $3, $4, 0x0040; "
                "prmt.b32 $0, t0, t1, 0x5410; }", "=r,r,r,r,r", [c0, c1, c2, c3], dtype=tl.int32, is_pure=True,
                pack=1)
        return (c0 & 0xFF) | ((c1 & 0xFF) << 8) | ((c2 & 0xFF) << 16) | (c3 << 24)


    @triton.jit
    def _group_tile(s_rows, z_rows, s_second, k0, n_mask, K, TWO: tl.constexpr, GROUP: tl.constexpr,
                    CH: tl.constexpr, W: tl.constexpr):
        """int4 group scales and zeros (fp32, (BLOCK_N, W / CH): one a thread's chunk of CH words) of the tile at
        code k0, and with TWO those of the rows s_second groups further on; zeros past K."""
        offs_g = (k0 + 8 * CH * tl.arange(0, W // CH)) // GROUP  # each accumulator's group
        g_mask = n_mask[:, None] & (offs_g < K // GROUP)[None, :]
        s = tl.load(s_rows + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
        z = tl.load(z_rows + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
        s2, z2 = s, z
        if TWO:
            s2 = tl.load(s_rows + s_second + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
            z2 = tl.load(z_rows + s_second + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
        return s, z, s2, z2


    @triton.jit
    def _row_products_a8(x_ptr, g_ptr, rows, second, s_rows, z_rows, s_second, n_mask, K, eps, NORM: tl.constexpr,
                         TWO: tl.constexpr, INT4: tl.constexpr, GROUP: tl.constexpr, PDL: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr, ASM: tl.constexpr,
                         X_AHEAD: tl.constexpr = False):
        """_row_products for int8 codes (int32 words of 4) or packed int4 codes (int32 words of 8, group scales and
        zeros at s_rows / z_rows) with the activations rounded to int8 in blocks of 32 here, tile by tile (see
        INT8_A8): integer dot products four codes an instruction (dp4a). The activations of a tile are read as int64
        quads of four bf16 and rounded as one vector over K, each entry once in the program, and only their code
        words and block scales are handed to the weight tile's layout (a shared-memory exchange); so the rounding
        costs per tile what it costs for one row, and BLOCK_N rows share it. Each thread loads VEC neighbouring
        words of a row; its words within one block of 32 are summed as integers and scaled once. int4's group scales
        and zeros are loaded with the weight tile, one tile ahead, and with X_AHEAD the activations too (see
        X_AHEAD)."""
        if PDL == 1:
            tl.extra.cuda.gdc_launch_dependents()
        CODES: tl.constexpr = 8 if INT4 else 4  # codes a word
        W: tl.constexpr = BLOCK_K // CODES  # words a tile row
        WPB: tl.constexpr = 32 // CODES  # words a block of 32
        CH: tl.constexpr = VEC if VEC < WPB else WPB  # words summed as integers: a thread's, within one block
        NB: tl.constexpr = BLOCK_K // 32  # blocks a tile
        KW = tl.multiple_of(K // CODES, 4)  # K is a multiple of 32 here
        KQ = K // 4
        offs_w = tl.arange(0, W)
        zero = tl.zeros((BLOCK_N, W), dtype=tl.int32)
        acc = tl.zeros((BLOCK_N, W // CH), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, W // CH), dtype=tl.float32)
        squares = tl.zeros((W,), dtype=tl.float32)
        w, w2 = _weight_tile(rows, second, KW, offs_w, n_mask, TWO, VEC)
        if INT4:
            s, z, s2, z2 = _group_tile(s_rows, z_rows, s_second, 0, n_mask, K, TWO, GROUP, CH, W)
        offs_q = tl.arange(0, BLOCK_K // 4)  # the activation quads of a tile
        if PDL:
            tl.extra.cuda.gdc_wait()
        if X_AHEAD:
            xq_next, gq_next = _vectors(x_ptr, g_ptr, offs_q, KQ, NORM)
        for k0 in range(0, K, BLOCK_K):
            ow = k0 // CODES + offs_w
            oq = k0 // 4 + offs_q
            if X_AHEAD:
                xq, gq = xq_next, gq_next
                xq_next, gq_next = _vectors(x_ptr, g_ptr, oq + BLOCK_K // 4, KQ, NORM)
            else:
                xq, gq = _vectors(x_ptr, g_ptr, oq, KQ, NORM)
            if INT4:  # word j: codes 8j .. 8j + 7 (the even ones in the low nibbles), activation quads 2j, 2j + 1
                qa, qb = tl.split(tl.reshape(xq, (W, 2)))
                ga, gb = tl.split(tl.reshape(gq, (W, 2)))
                v0, v1, v2, v3, sq = _bf16_quad(qa, ga, NORM)
                v4, v5, v6, v7, sq2 = _bf16_quad(qb, gb, NORM)
                squares += sq + sq2
                m = tl.maximum(_abs_max4(v0, v1, v2, v3), _abs_max4(v4, v5, v6, v7))
            else:
                v0, v1, v2, v3, sq = _bf16_quad(xq, gq, NORM)
                squares += sq
                m = _abs_max4(v0, v1, v2, v3)
            amax = tl.max(tl.reshape(m, (NB, WPB)), axis=1)  # (NB,)
            inv = _spread(tl.where(amax > 0, 127.0 / amax, 0.0), WPB)  # (W,)
            step = _rows(_spread(amax * (1.0 / 127.0), WPB // CH), BLOCK_N)  # a code's worth, each accumulator
            if INT4:
                even = _rows(_code_word(v0, v2, v4, v6, inv, ASM), BLOCK_N)
                odd = _rows(_code_word(v1, v3, v5, v7, inv, ASM), BLOCK_N)
                vsum = _rows(_chunks1(v0 + v1 + v2 + v3 + v4 + v5 + v6 + v7, CH), BLOCK_N)  # x unrounded: zeros
                d = _dp4a(w & 0x0F0F0F0F, even, _dp4a((w >> 4) & 0x0F0F0F0F, odd, zero, False, ASM), False, ASM)
                acc += _chunks(d, CH).to(tl.float32) * (step * s) + z * vsum
                if TWO:
                    d2 = _dp4a(w2 & 0x0F0F0F0F, even, _dp4a((w2 >> 4) & 0x0F0F0F0F, odd, zero, False, ASM), False,
                               ASM)
                    acc2 += _chunks(d2, CH).to(tl.float32) * (step * s2) + z2 * vsum
            else:
                codes = _rows(_code_word(v0, v1, v2, v3, inv, ASM), BLOCK_N)
                acc += _chunks(_dp4a(w, codes, zero, True, ASM), CH).to(tl.float32) * step
                if TWO:
                    acc2 += _chunks(_dp4a(w2, codes, zero, True, ASM), CH).to(tl.float32) * step
            w, w2 = _weight_tile(rows, second, KW, ow + W, n_mask, TWO, VEC)
            if INT4:  # with the weights: see X_AHEAD's comment for why
                s, z, s2, z2 = _group_tile(s_rows, z_rows, s_second, k0 + BLOCK_K, n_mask, K, TWO, GROUP, CH, W)
        return _row_sums(acc, acc2, squares, K, eps, NORM, 0)


    @triton.jit
    def _products(x_ptr, g_ptr, w_ptr, s_ptr, z_ptr, offs_n, second_rows, n_mask, K, eps, NORM: tl.constexpr,
                  TWO: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  WORDS: tl.constexpr, A8: tl.constexpr, INT4: tl.constexpr, GROUP: tl.constexpr, VEC: tl.constexpr,
                  ASM: tl.constexpr, X_AHEAD: tl.constexpr):
        """_row_products (or with WORDS _row_products_words, with A8 _row_products_a8) of weight rows offs_n, and
        with TWO of the rows second_rows further on."""
        if A8:
            KW = tl.multiple_of(K // (8 if INT4 else 4), 4)  # K is a multiple of 32 here: rows start 16-byte aligned
            rows = w_ptr + offs_n[:, None].to(tl.int64) * KW
            groups = K // GROUP
            y, y2 = _row_products_a8(x_ptr, g_ptr, rows, second_rows * KW, s_ptr + offs_n[:, None] * groups,
                                     z_ptr + offs_n[:, None] * groups, second_rows * groups, n_mask, K, eps, NORM,
                                     TWO, INT4, GROUP, PDL, BLOCK_N, BLOCK_K, VEC, ASM, X_AHEAD)
        elif WORDS:
            rows = w_ptr + offs_n[:, None].to(tl.int64) * (K // 4)
            y, y2 = _row_products_words(x_ptr, g_ptr, rows, second_rows * (K // 4), n_mask, K, eps, NORM, TWO, PDL,
                                        BLOCK_N, BLOCK_K)
        else:
            rows = w_ptr + offs_n[:, None].to(tl.int64) * K
            y, y2 = _row_products(x_ptr, g_ptr, rows, second_rows * K, n_mask, K, eps, NORM, TWO, PDL, BLOCK_N,
                                  BLOCK_K, X_AHEAD)
        return y, y2


    @triton.jit
    def _gemv_kernel(
        x_ptr,  # (K,) the activation row
        g_ptr,  # (K,) norm weight (NORM)
        w_ptr,  # (N, K) weight rows, float or int8 codes; with GATE_UP the up rows follow at w_ptr + N * K
        s_ptr,  # (N,) (GATE_UP: (2 N,)) per-row scales of int8 codes (HAS_SCALES); int4: (N, K / GROUP) group scales
        z_ptr,  # int4: (N, K / GROUP) group zero points
        b_ptr,  # (N,) bias (HAS_BIAS)
        r_ptr,  # (N,) residual (HAS_RESIDUAL)
        out_ptr,  # (N,)
        N,  # output rows (with GATE_UP: rows of one half)
        K,
        eps,
        NORM: tl.constexpr,
        GATE_UP: tl.constexpr,
        HAS_SCALES: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        PDL: tl.constexpr,  # launched as a programmatic dependent launch (Hopper): see gemv()
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        WORDS: tl.constexpr = False,  # int8 codes as int32 words, x and g as int64 quads (_row_products_words)
        A8: tl.constexpr = False,  # activations rounded to int8 blocks, dp4a (_row_products_a8)
        INT4: tl.constexpr = False,  # packed int4 codes (A8 only), scales and zeros by group in the loop
        GROUP: tl.constexpr = 32,  # int4 group size
        VEC: tl.constexpr = 2,  # A8: words a thread loads of each row
        ASM: tl.constexpr = False,  # A8's dp4a and byte permutes as PTX (GPU) or spelt out (interpreter)
        X_AHEAD: tl.constexpr = False,  # the activations loaded one tile ahead (the module's X_AHEAD)
    ):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        y, up = _products(x_ptr, g_ptr, w_ptr, s_ptr, z_ptr, offs_n, N, n_mask, K, eps, NORM, GATE_UP, PDL, BLOCK_N,
                          BLOCK_K, WORDS, A8, INT4, GROUP, VEC, ASM, X_AHEAD)
        if HAS_SCALES:  # before bias and gate: the scales belong to the product
            y *= tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            if GATE_UP:
                up *= tl.load(s_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if GATE_UP:
            y = y * tl.sigmoid(y) * up
        if HAS_RESIDUAL:
            y += tl.load(r_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


    @triton.jit
    def _gemv_rope_kernel(
        x_ptr, g_ptr,  # (K,) the activation row and the attention norm's weight
        w_ptr,  # (N, K) = ((H + 2 Hkv) D, K): wqkv, q heads, then k heads, then v heads; float or int8 codes
        s_ptr,  # (N,) per-row scales of int8 codes (HAS_SCALES); int4: (N, K / GROUP) group scales
        z_ptr,  # int4: (N, K / GROUP) group zero points
        b_ptr,  # (N,) bias (HAS_BIAS)
        cos_ptr, sin_ptr,  # (D,) the new token's rotation (model.rope_cos_sin)
        positions_ptr,  # (1,) its cache position p
        q_out_ptr,  # (H, D) out: rotated q
        lengths_ptr,  # (1,) out: p + 1, the live keys decode attention reads next
        k_cache_ptr, v_cache_ptr,  # (S, Hkv, D) this layer's cache rows of the sequence; written at p
        stride_kn, stride_kh, stride_vn, stride_vh,
        K, eps,
        H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
        HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr,
        PDL: tl.constexpr,  # 0, or 2: PDL's wait, and dependents launch after this program's stores
        BLOCK_N: tl.constexpr,  # rows of each half of a head: a program owns 2 * BLOCK_N rows
        BLOCK_K: tl.constexpr,
        WORDS: tl.constexpr = False,  # WORDS, A8, INT4, GROUP, VEC, ASM, X_AHEAD as in _gemv_kernel
        A8: tl.constexpr = False,
        INT4: tl.constexpr = False,
        GROUP: tl.constexpr = 32,
        VEC: tl.constexpr = 2,
        ASM: tl.constexpr = False,
        X_AHEAD: tl.constexpr = False,
    ):
        # RoPE pairs row i of a head with row i + D/2, so a program owns rows [i0, i0 + BLOCK_N) of a head and the
        # rows D/2 further: the rotation is applied to the fp32 sums before anything is stored.
        HALF: tl.constexpr = D // 2
        PER_HEAD: tl.constexpr = (HALF + BLOCK_N - 1) // BLOCK_N
        head = tl.program_id(0) // PER_HEAD
        offs_i = (tl.program_id(0) % PER_HEAD) * BLOCK_N + tl.arange(0, BLOCK_N)  # within the head's first half
        offs_n = head * D + offs_i
        n_mask = offs_i < HALF
        lo, hi = _products(x_ptr, g_ptr, w_ptr, s_ptr, z_ptr, offs_n, HALF, n_mask, K, eps, True, True, PDL, BLOCK_N,
                           BLOCK_K, WORDS, A8, INT4, GROUP, VEC, ASM, X_AHEAD)
        if HAS_SCALES:
            lo *= tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            hi *= tl.load(s_ptr + offs_n + HALF, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            lo += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            hi += tl.load(b_ptr + offs_n + HALF, mask=n_mask, other=0.0).to(tl.float32)
        position = tl.load(positions_ptr).to(tl.int64)
        cos = tl.load(cos_ptr + offs_i, mask=n_mask, other=0.0).to(tl.float32)  # cos[i] == cos[i + D/2] here
        sin = tl.load(sin_ptr + offs_i, mask=n_mask, other=0.0).to(tl.float32)
        rot_lo, rot_hi = lo * cos - hi * sin, hi * cos + lo * sin  # q and k heads; v heads store lo, hi
        # Each store's address is computed from a kernel argument inside its own branch, so torch.compile's
        # analysis of what the kernel writes sees exactly q_out, lengths and the two caches.
        if head < H:
            dst = q_out_ptr + head * D + offs_i
            tl.store(dst, rot_lo.to(q_out_ptr.dtype.element_ty), mask=n_mask)
            tl.store(dst + HALF, rot_hi.to(q_out_ptr.dtype.element_ty), mask=n_mask)
        elif head < H + HKV:
            dst = k_cache_ptr + position * stride_kn + (head - H) * stride_kh + offs_i
            tl.store(dst, rot_lo.to(k_cache_ptr.dtype.element_ty), mask=n_mask)
            tl.store(dst + HALF, rot_hi.to(k_cache_ptr.dtype.element_ty), mask=n_mask)
        else:
            dst = v_cache_ptr + position * stride_vn + (head - H - HKV) * stride_vh + offs_i
            tl.store(dst, lo.to(v_cache_ptr.dtype.element_ty), mask=n_mask)
            tl.store(dst + HALF, hi.to(v_cache_ptr.dtype.element_ty), mask=n_mask)
        if tl.program_id(0) == 0:
            tl.store(lengths_ptr, position + 1)
        if PDL == 2:
            # The dependent is decode attention's first kernel (a PDL launch with FIRST_PDL), which needs every row
            # stored: launched at this kernel's start, its waiting programs would take SMs the products still use
            # (a 7B step 3.652 against 3.645 ms, session 13); launched here, it overlaps only this kernel's end.
            tl.extra.cuda.gdc_launch_dependents()


def _gemv_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None,
             bias: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float, gate_up: bool,
             residual: torch.Tensor | None, loop: str, block_n: int, block_k: int, num_warps: int, vec: int,
             pdl: bool) -> torch.Tensor:
    """Launch _gemv_kernel (the body of torch.ops.blitzgen.gemv / gemv_pdl)."""
    wrap = (lambda kernel: kernel) if pdl else wrap_triton  # PDL: launched here, with the launch attribute
    K = x.shape[1]
    N = weight.shape[0] // 2 if gate_up else weight.shape[0]
    out = torch.empty((1, N), dtype=x.dtype, device=x.device)
    kind = _kind(gate_up, norm_weight)
    xs, ws, gs, flags = _operands(loop, x, weight, norm_weight, scales, zeros, kind)
    args = (xs, xs if gs is None else gs, ws, x if scales is None else scales, x if zeros is None else zeros,
            x if bias is None else bias, x if residual is None else residual, out)
    flags.update(NORM=norm_weight is not None, GATE_UP=gate_up, HAS_BIAS=bias is not None,
                 HAS_RESIDUAL=residual is not None, PDL=pdl, BLOCK_N=block_n, BLOCK_K=block_k, VEC=vec,
                 num_warps=num_warps, **({"launch_pdl": True} if pdl else {}))
    wrap(_gemv_kernel)[(triton.cdiv(N, block_n),)](*args, N, K, eps, **flags)
    return out


def _gemv_fake(x, weight, scales, zeros, bias, norm_weight, eps, gate_up, *_):
    return x.new_empty((x.shape[0], weight.shape[0] // 2 if gate_up else weight.shape[0]))


def _gemv_rope_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None,
                  bias: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, cos: torch.Tensor,
                  sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  n_heads: int, loop: str, block_n: int, block_k: int, num_warps: int, vec: int,
                  pdl: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch _gemv_rope_kernel (the body of torch.ops.blitzgen.gemv_rope / gemv_rope_pdl) -> rotated q (1, H, D)
    and lengths (1,) int64."""
    wrap = (lambda kernel: kernel) if pdl else wrap_triton
    K = x.shape[1]
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    q_out = torch.empty((1, n_heads, D), dtype=x.dtype, device=x.device)
    lengths = torch.empty((1,), dtype=torch.int64, device=x.device)
    half_block = block_n // 2  # rows of each half of a head a program owns: block_n rows in all, as in gemv
    grid = ((n_heads + 2 * Hkv) * triton.cdiv(D // 2, half_block),)
    xs, ws, gs, flags = _operands(loop, x, weight, norm_weight, scales, zeros, "norm")
    wrap(_gemv_rope_kernel)[grid](
        xs, gs, ws, x if scales is None else scales, x if zeros is None else zeros, x if bias is None else bias,
        cos, sin, positions, q_out, lengths, k_cache, v_cache, k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(1), v_cache.stride(2), K, eps, H=n_heads, HKV=Hkv, D=D, HAS_BIAS=bias is not None,
        PDL=2 if pdl else 0,  # dependents launch after the stores: see _gemv_rope_kernel
        BLOCK_N=half_block, BLOCK_K=block_k, VEC=vec, num_warps=num_warps, **flags,
        **({"launch_pdl": True} if pdl else {}))
    return q_out, lengths


def _gemv_rope_fake(x, weight, scales, zeros, bias, norm_weight, eps, cos, sin, positions, k_cache, v_cache, n_heads,
                    *_):
    return x.new_empty((1, n_heads, k_cache.shape[3])), positions.new_empty((1,), dtype=torch.int64)


if triton is not None:
    define_ops("gemv", _gemv_op, _gemv_fake)
    define_ops("gemv_rope", _gemv_rope_op, _gemv_rope_fake, mutates_args=("k_cache", "v_cache"))


# (block_n, block_k, num_warps) by fusion: the best of the H200 sweep over both Llama-2-7B and Llama-3.1-8B
# shapes (benchmarks/gemv_bench.py; BENCHMARKS.md, 2026-12-01 session 7). The normed product without a
# gate (wqkv) wants 16 rows a program: each program sums the squares of all of x again, and fewer
# programs do that less often; 16 x 512 read 93% / 87% of the bandwidth there against 88% / 80% for 4 x 1024.
BLOCKS = {"plain": (4, 1024, 4), "norm": (16, 512, 4), "gate_up": (4, 1024, 4)}
# int8 codes take the same tiles (half the bytes a tile): the best of four in an H200 decode step (2.934 ms,
# against 3.73-4.42 for 8 x 1024 / 4 x 2048 tiles). The codes become floats by the conversion instruction: making
# them with byte permutes and a float subtraction instead (no int-to-float instruction) measured 22% slower there.
# Weight tiles loaded two ahead instead of one (more bytes in flight a program, for ~20 more registers a thread)
# made a 7B step 14% slower in int8 (3.330 against 2.914 ms) and 22% slower in bf16 (session 10).
# Summing each thread's 8 (or 4) neighbouring products before the float loop's accumulators, for 1/8 of their
# registers (sm_90: 168 -> 80-96 a thread for wqkv and the output product, 128 -> 72 for w13), measured no faster
# on an H100 (7B step 4.729 against 4.728 ms, 4.902 with 4; Llama-3.1-8B 5.256 against 5.179; with larger tiles
# 4.717-4.816) and was removed (BENCHMARKS.md, 2026-12-06 session 19).
# Programmatic dependent launch on Hopper and later (see the module docstring; gemv_bench turns it off to compare).
PDL = True
# int8 codes times bf16 activations with no int-to-float instruction (_row_products_words): the codes read as int32
# words, each code made fp32 by a byte mask, an OR into 2^23's pattern and a float subtraction, the activations
# read four to an int64 and made fp32 by shifts. The conversion path's sm_90 SASS spends an I2F a code on the
# conversion pipe (16 a clock an SM, a quarter of the FFMA rate: ~90% of an H200's bandwidth in clocks); this
# loop's SASS has no I2F and no shared memory (BENCHMARKS.md, 2026-12-02 session 10). Measured on an H200, a
# Llama-2-7B int8 step at batch 1: 2.663 ms against 2.915 (375.6 against 343.1 tokens/s; session 11, `blitzgen
# bench --quantize int8 --variants base,set:kernels.gemv.INT8_WORDS=False` compares). fp32 / fp16 activations
# keep the conversion path.
INT8_WORDS = True
# The activations rounded to int8 in blocks of 32 inside the product loop (_row_products_a8), each program rounding
# the x it reads: integer dot products four codes an instruction instead of a float multiply-add a code (sm_90
# SASS: 99 instructions per 32 codes a thread against 177 in the words loop, session 11's tiles). The only one-row
# path of packed int4 codes here, and the default for int8 codes: a Llama-2-7B int8 step on an H200 2.112 ms
# against 2.662 with the words loop (473.6 against 375.7 tokens/s; BENCHMARKS.md, 2026-12-02 session 11). It rounds
# x to 8 bits per block of 32 (+0.01% perplexity on the default model, session 5); INT8_A8 = False keeps the
# activations exact.
INT8_A8 = True
# (block_n, block_k in codes, num_warps, words a thread) for the a8 loop by weight format: the best of the H200
# sweep at Llama-2-7B shapes (`python benchmarks/gemv_bench.py --quantize int8|int4`; BENCHMARKS.md, 2026-12-02
# session 12). int8 reads 80-98% of the bandwidth at these tiles (64-92% at session 11's bf16 tiles; a 7B step
# 2.029 against 2.116 ms); int4, with half the bytes for the same rounding work, 43-70%. int4's tiles are the best
# of variants timed in the decode step (`blitzgen bench --variants`), which disagreed with the product sweep for the
# normed products (the RoPE product takes the "norm" tiles in two halves): a 7B step 1.815 ms against 1.959. With the
# group scales loaded ahead (below), 16 x 2048 "plain" tiles: 1.512 against 1.550 ms at 8 x 2048 (session 18).
A8_BLOCKS = {"int8": {"plain": (8, 2048, 8, 2), "norm": (8, 512, 4, 4), "gate_up": (4, 2048, 4, 4)},
             "int4": {"plain": (16, 2048, 8, 4), "norm": (16, 1024, 4, 4), "gate_up": (8, 1024, 4, 4)}}
# int4 in the a8 loop: the group scales and zeros of the next tile are loaded with its weight tile. Loaded where they
# are used, their L2 latency stalled every tile with none of the program's weight loads in flight (the sm_90 SASS
# issued them after the dp4a and the next weight tile's loads after them): a Llama-2-7B int4 step on an H200 1.550 ms
# against 1.775 (BENCHMARKS.md, 2026-12-04 session 18). Issuing every next-tile load at the top of the loop
# instead, before the current tile's arithmetic, measured 1.634 (int4) and 2.171 against 1.991 ms (int8).
# Which fusions of each weight format also load the activations (x, and the norm weight) one tile ahead (the kinds
# are BLOCKS' keys, the RoPE product is "norm"). Measured in the same session, all fusions or none, 7B steps: bf16
# 3.501 against 3.578 ms (Llama-3.1-8B at 32k 4.856 against 4.938), int8 2.054 against 1.994, int4 at the 16 x 2048
# "plain" tile 1.526 against 1.512 (at 8 x 2048 1.537 against 1.549). int8 by fusion (session 19): the plain and
# norm products ahead, gate_up not (whose registers grew 96 -> 128 with it), 2.562 against 2.584 ms on an H100 and
# 1.980 against 1.994 on an H200; plain alone 2.587 (H100), norm alone 1.975 (H200).
X_AHEAD = {"float": ("plain", "norm", "gate_up"), "int8": ("plain", "norm"), "int4": ()}


def _mode(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None) -> str:
    """Which product loop a launch takes: "a8" (_row_products_a8: int4 codes always, int8 codes with INT8_A8),
    "words" (_row_products_words: int8 codes with INT8_WORDS) or "float" (_row_products). a8 and words need bf16
    activations and norm weight, and K in whole blocks (32 for a8, 4 for words). Decided where the op is traced
    or launched, so a benchmark can set the flags per build."""
    bf16 = x.dtype == torch.bfloat16 and (norm_weight is None or norm_weight.dtype == torch.bfloat16)
    K = x.shape[1]
    if weight.dtype == torch.uint8 or (INT8_A8 and weight.dtype == torch.int8 and bf16 and K % 32 == 0):
        return "a8"
    if INT8_WORDS and weight.dtype == torch.int8 and bf16 and K % 4 == 0:
        return "words"
    return "float"


def _operands(mode: str, x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None,
              scales: torch.Tensor | None, zeros: torch.Tensor | None, kind: str = "plain"):
    """(x, weight, norm_weight, kernel flags) as a launch of `mode` and fusion `kind` passes them: words and a8 read
    x and the norm weight as int64 quads and the codes as int32 words."""
    int4 = zeros is not None
    flags = dict(HAS_SCALES=scales is not None and not int4, WORDS=mode == "words", A8=mode == "a8", INT4=int4,
                 GROUP=x.shape[1] // scales.shape[1] if int4 else 32, ASM=not _INTERPRET,
                 X_AHEAD=kind in X_AHEAD[_format(weight)])
    if mode == "float":
        return x, weight, norm_weight, flags
    quads = None if norm_weight is None else norm_weight.view(torch.int64)
    return x.view(torch.int64), weight.view(torch.int32), quads, flags


def _kind(gate_up: bool, norm_weight: torch.Tensor | None) -> str:
    """The fusion of a gemv() launch, as BLOCKS, A8_BLOCKS and X_AHEAD name it."""
    return "gate_up" if gate_up else "norm" if norm_weight is not None else "plain"


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _check_weight(name: str, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None,
                  zeros: torch.Tensor | None):
    """x's dtype is a float one; the weight is of that dtype (no scales), int8 codes with (N,) scales, or packed
    int4 codes (N, K / 2) uint8 with (N, K / G) scales and zeros (bf16 x, G and K multiples of 32)."""
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise BlitzgenError(f"{name}: x must be bf16, fp16 or fp32, got {x.dtype}")
    if weight.dtype == torch.uint8:
        K = 2 * weight.shape[1]
        groups = 0 if scales is None else scales.shape[-1]
        if (zeros is None or scales.shape != (weight.shape[0], groups) or zeros.shape != scales.shape or not groups
                or K % groups or (K // groups) % 32 or x.dtype != torch.bfloat16):
            raise BlitzgenError(f"{name}: packed int4 codes {tuple(weight.shape)} need bf16 x and scales and zeros "
                                f"of shape ({weight.shape[0]}, K / G) with G a multiple of 32; got scales "
                                f"{None if scales is None else tuple(scales.shape)}, x {x.dtype}")
        return
    if zeros is not None:
        raise BlitzgenError(f"{name}: zero points go with packed int4 (uint8) codes, not {weight.dtype}")
    if weight.dtype == torch.int8:
        if scales is None or scales.shape != (weight.shape[0],):
            raise BlitzgenError(f"{name}: int8 weight codes need scales of shape ({weight.shape[0]},), got "
                                f"{None if scales is None else tuple(scales.shape)}")
    elif weight.dtype != x.dtype or scales is not None:
        raise BlitzgenError(f"{name}: the weight must be x's dtype ({x.dtype}) without scales, int8 codes with "
                            f"scales or packed int4 codes; got {weight.dtype}{' with scales' if scales is not None else ''}")


def _format(weight: torch.Tensor) -> str:
    return {torch.uint8: "int4", torch.int8: "int8"}.get(weight.dtype, "float")


def _blocks(name: str, mode: str, fmt: str, kind: str, blocks: tuple[int, ...] | None) -> tuple[int, int, int, int]:
    """(block_n, block_k, num_warps, words a thread) of a launch: `blocks` (three or four of them) or the defaults
    of its loop, weight format and fusion."""
    defaults = A8_BLOCKS[fmt][kind] if mode == "a8" else BLOCKS[kind] + (2,)
    block_n, block_k, num_warps, vec = tuple(blocks) + defaults[len(blocks):] if blocks else defaults
    words = block_k // (8 if fmt == "int4" else 4)
    if (block_n & (block_n - 1)) or (block_k & (block_k - 1)) or (mode == "a8" and block_k < 32):
        raise BlitzgenError(f"{name}: blocks {block_n, block_k} must be powers of two"
                            + (", block_k >= 32 with int8 activations" if mode == "a8" else ""))
    if mode == "a8" and (vec & (vec - 1) or vec > words):
        raise BlitzgenError(f"{name}: {vec} words a thread must be a power of two, at most the {words} words of a "
                            f"tile row of {block_k} codes")
    return block_n, block_k, num_warps, vec


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         norm_weight: torch.Tensor | None = None, eps: float = 0.0, gate_up: bool = False,
         residual: torch.Tensor | None = None, scales: torch.Tensor | None = None,
         zeros: torch.Tensor | None = None, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """One activation row x (1, K) times weight.T with the fusions of the module docstring -> (1, N) in x.dtype.

    weight is of x's dtype, or int8 codes with per-row `scales` (N,) (quantize.Int8Linear's format; with
    gate_up the gate rows' scales first), or packed int4 codes (N, K / 2) with group `scales` and `zeros`
    (N, K / G) (quantize.Int4Linear's format; bf16 x). blocks (block_n, block_k, num_warps) overrides the defaults
    (tests, sweeps). Falls back to gemv_ref where Triton cannot run (CPU without TRITON_INTERPRET=1).
    """
    packed = 2 if weight.dtype == torch.uint8 else 1
    if x.dim() != 2 or x.shape[0] != 1 or weight.dim() != 2 or x.shape[1] != packed * weight.shape[1]:
        raise BlitzgenError(f"gemv: x {tuple(x.shape)} and weight {tuple(weight.shape)} must be (1, K) and (N, K)"
                            + (" (int4: (N, K / 2))" if packed == 2 else ""))
    _check_weight("gemv", x, weight, scales, zeros)
    N = weight.shape[0] // 2 if gate_up else weight.shape[0]
    if gate_up and (weight.shape[0] % 2 or bias is not None or residual is not None):
        raise BlitzgenError("gemv: gate_up needs an even number of weight rows and no bias or residual")
    if bias is not None and bias.shape != (N,):
        raise BlitzgenError(f"gemv: bias {tuple(bias.shape)} must be ({N},)")
    if norm_weight is not None and norm_weight.shape != (x.shape[1],):
        raise BlitzgenError(f"gemv: norm_weight {tuple(norm_weight.shape)} must be ({x.shape[1]},)")
    if residual is not None and residual.shape != (1, N):
        raise BlitzgenError(f"gemv: residual {tuple(residual.shape)} must be (1, {N})")
    mode = _mode(x, weight, norm_weight)
    if triton is None or not triton_runs_on(x):
        return gemv_ref(x, weight, bias, norm_weight=norm_weight, eps=eps, gate_up=gate_up, residual=residual,
                        scales=scales, zeros=zeros, a8=mode == "a8")
    kind = _kind(gate_up, norm_weight)
    block_n, block_k, num_warps, vec = _blocks("gemv", mode, _format(weight), kind, blocks)
    pdl = PDL and hopper(x)
    op = torch.ops.blitzgen.gemv_pdl if pdl else torch.ops.blitzgen.gemv
    return op(x.contiguous(), weight.contiguous(), _contiguous(scales), _contiguous(zeros), _contiguous(bias),
              _contiguous(norm_weight), float(eps), gate_up, _contiguous(residual), mode, block_n, block_k, num_warps,
              vec, pdl)


def gemv_rope_cache_ref(x, weight, bias, *, norm_weight, eps, cos, sin, positions, k_cache, v_cache, n_heads,
                        scales=None, zeros=None, a8=False):
    """Plain-PyTorch twin of gemv_rope_cache: the normed product, then rope_cache_write's reference."""
    from blitzgen.kernels.rope_cache import rope_cache_write_ref

    qkv = gemv_ref(x, weight, bias, norm_weight=norm_weight, eps=eps, scales=scales, zeros=zeros, a8=a8)
    return rope_cache_write_ref(qkv, cos, sin, positions, k_cache, v_cache, n_heads)


def gemv_rope_cache(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                    norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                    positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int,
                    scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None,
                    blocks: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-sequence decode step's attention input in one launch: RMSNorm + wqkv product, RoPE on q and k in
    the product's fp32 sums, k and v written to the cache at the token's position, as gemv() followed by
    kernels/rope_cache.py's rope_cache_write would do in two (and Inductor in four to five).

    x (1, K); weight ((H + 2 Hkv) D, K), heads in q, k, v order; cos, sin (1, [1,] D) in rotate-half layout;
    positions (1, [1]) the token's cache position; k_cache, v_cache (1, S, Hkv, D) with the last dim
    contiguous, written in place. Returns rotated q (1, H, D) in x.dtype and lengths = positions + 1 (1,)
    int64, the live keys decode attention takes. weight, scales and zeros as in gemv; blocks as in gemv (block_n rows
    a program: half from each half of a head)."""
    B, K = x.shape if x.dim() == 2 else (0, 0)
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    N = (n_heads + 2 * Hkv) * D
    K_weight = K // 2 if weight.dtype == torch.uint8 else K  # packed int4: two codes a byte
    if (x.dim() != 2 or B != 1 or weight.shape != (N, K_weight) or cos.numel() != D or sin.shape != cos.shape
            or positions.numel() != 1 or k_cache.shape[0] != 1 or v_cache.shape != k_cache.shape or D % 2
            or norm_weight.shape != (K,) or (bias is not None and bias.shape != (N,))):
        raise BlitzgenError(
            f"gemv_rope_cache: shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)} for {n_heads} heads, "
            f"cos {tuple(cos.shape)}, positions {tuple(positions.shape)}, cache {tuple(k_cache.shape)}")
    _check_weight("gemv_rope_cache", x, weight, scales, zeros)
    mode = _mode(x, weight, norm_weight)
    if triton is None or not triton_runs_on(x):
        return gemv_rope_cache_ref(x, weight, bias, norm_weight=norm_weight, eps=eps, cos=cos, sin=sin,
                                   positions=positions, k_cache=k_cache, v_cache=v_cache, n_heads=n_heads,
                                   scales=scales, zeros=zeros, a8=mode == "a8")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise BlitzgenError("gemv_rope_cache: the caches' last dim must be contiguous")
    block_n, block_k, num_warps, vec = _blocks("gemv_rope_cache", mode, _format(weight), "norm", blocks)
    if block_n < 2:
        raise BlitzgenError(f"gemv_rope_cache: blocks {block_n, block_k}: block_n must be >= 2")
    pdl = PDL and hopper(x)
    op = torch.ops.blitzgen.gemv_rope_pdl if pdl else torch.ops.blitzgen.gemv_rope
    return op(x.contiguous(), weight.contiguous(), _contiguous(scales), _contiguous(zeros), _contiguous(bias),
              norm_weight.contiguous(), float(eps), cos.reshape(D).contiguous(), sin.reshape(D).contiguous(),
              positions.reshape(1), k_cache, v_cache, n_heads, mode, block_n, block_k, num_warps, vec, pdl)
