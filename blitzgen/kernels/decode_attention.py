"""Decode attention: one new query token per sequence against the static KV cache.

The math. Sequence b has `length_b` live keys (cache positions 0 .. length_b - 1; with a
sliding window W only positions >= length_b - W). Query head j reads kv head h = j // G,
G = H / Hkv (grouped-query attention, the head order of Hugging Face's repeat_kv):

    s_n = q_j . k_{b,n,h} / sqrt(D)                      for each live position n
    out_j = sum_n softmax(s)_n v_{b,n,h}

Split-KV ("flash-decoding": Tri Dao, Daniel Haziza, Francisco Massa, Grigory Sizov,
"Flash-Decoding for long-context inference", 2023; FlashDecoding++, Hong et al. 2023).
At decode time there is one query row per head, so FlashAttention's parallelism over
(batch, head, query block) is B * Hkv programs: 8 for Llama-3-8B at batch 1, on an H100 with
132 SMs. So the live keys are also cut into consecutive splits, one program per
(split, kv head, sequence). Split s computes, over its own keys,

    m_s = max_n s_n,   l_s = sum_n exp(s_n - m_s),   o_s = sum_n exp(s_n - m_s) v_n / l_s,
    lse_s = m_s + log(l_s),

and a second small kernel merges the splits exactly (log-sum-exp is associative):

    M = max_s lse_s,   out = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M).

Inside a split the keys are read in tiles of BLOCK_N with the same online-softmax update. The
kernels work in base 2 (scores times log2(e) / sqrt(D), exp2, log2), which is the same math.

A static grid that follows live lengths on the device. The host fixes NUM_SPLITS from static
facts only (batch, kv heads, capacity S, SM count) so the launch can be captured in a CUDA
graph once. Each program reads its sequence's length from the device and takes

    split_len = max(split_min, round_up(ceil(live / NUM_SPLITS), BLOCK_N))

so whatever live length a replay meets is shared out evenly over the fixed programs; a split
that starts at or past the live end returns at once. Work is proportional to live keys, not to
the capacity, and nothing is read on the host (no .item()).

GQA. A program covers all G query heads of its kv head, so each K/V tile is read once:
scores = tl.dot(q [G_PAD, D], k^T [D, BLOCK_N]) and acc += tl.dot(p [G_PAD, BLOCK_N],
v [BLOCK_N, D]), with G padded to G_PAD >= 16 (the smallest tl.dot tile; padded rows load
zeros and are never stored). Why a padded tensor-core product rather than a broadcast
multiply-and-sum: the product [G, BLOCK_N, D] = 4 x 64 x 128 floats is 256 registers per thread
at 4 warps, which spills or forces tiles too small to keep enough bytes in flight, while
tl.dot streams K/V through shared memory (software-pipelined async copies) and keeps only
[G_PAD, D] in registers. The 16 / G padding waste is free: decode does ~16 flops per byte read,
far below an H100's ~300 flops per byte of bandwidth.

H100 tuning (python -m blitzgen.attention_bench --sweep, BENCHMARKS.md 2026-11-25 session 2):
- BLOCK_N keys per tile such that a K (or V) tile is TILE_BYTES = 8 KiB: 32 keys at D = 128
  in bf16, 64 at D = 64, 16 at D = 256 or in float32. With num_stages = 3 Triton streams the
  tiles through shared memory with 16-byte cp.async copies. In the sweep 32-key tiles matched
  64-key ones at batch 1 (17.2 against 17.4 us at 8k, 181 against 181 us at 128k) and beat them
  at batch 8 (92% against 88% of the read ceiling at 8k, 98% against 94% at 32k): more, smaller
  tiles keep more requests in flight when there are few splits. More stages, more warps, more or
  fewer programs per SM and 128-key tiles were all slower or no better. 16-bit inputs take 2 warps
  (NUM_WARPS: measured on an H200, session 10), float32 8: its exact "ieee" products run on FMAs
  and need 255+ registers per thread at 4 warps.
- NUM_SPLITS = floor(PROGRAMS_PER_SM * SMs / (B * Hkv)), at most ceil(S / split_min) and
  MAX_SPLITS: 33 at batch 1 and 4 at batch 8 for Llama-3-8B (8 kv heads) on 132 SMs, so no SM
  gets more than two programs. Memory-bound work needs bytes in flight on every SM rather than
  exact waves, and each split costs a 2 KiB partial written and read back. Rounding up instead (5
  splits, 320 programs at batch 8: some SMs run three) measured slower on an H100 (SPLITS_FIT,
  BENCHMARKS.md 2026-12-06 session 21): batch 8, 8k 90.3 against 92.4 us alone, and a Llama-3.1-8B
  batch-8 step at 8k context 8.971 against 9.007 ms. Where the floor is 1 the ceiling stays (2 for
  Llama-2-7B's 32 kv heads at batch 8): one split drops the merge, a different trade, not measured.
- The order of the programs. The grid is (NUM_SPLITS, Hkv, B), split fastest, but past HEADS_FIRST_MIN_KEYS =
  1536 live keys a program takes its (split, kv head) from its linear index kv head first, so the splits past the
  live keys come last in launch order (at 8k keys with 33 splits only 32 are live: split_len rounds to 256). Split
  fastest, those empty programs are spread through the grid; if SM j runs programs j and j + 132 (not verified),
  four SMs get two of them and no work.
  In one process on an H100 (BENCHMARKS.md, 2026-12-06 session 22): batch 1, 8k keys 15.32 against 15.68 us, 2k
  7.15 against 7.39, 4k 9.77 against 10.02, 128k 179.2 against 178.7, batch 8 unchanged; a Llama-3.1-8B step at 2k
  5.177 against 5.181 ms, 8k 5.428 against 5.436, 32k 6.440 against 6.436. Kv head first at every length cost
  the step 5.2% at 1k keys (5.401 against 5.136 ms) and a Llama-2-7B step at 128 keys 2.9%, though the call alone
  was only 0.26 us slower at 1k: where the waiting programs of the next kernels land (MERGE_SIGNAL) is the likely
  cause, not measured. The order is chosen on the device from the live keys, so one captured graph serves both.
- split_min = 2 tiles (64 keys, 32 KiB of K + V at D = 128 in bf16), so the fixed cost of a
  split (loading q, writing its partial, the merge reading it) stays small.
- Loads are vectorised along D: the last dim must be contiguous and its stride is not passed;
  row strides that are multiples of 16 elements let Triton prove 16-byte alignment.
- One split (large batches): the first kernel writes the output itself; no merge launch.

The merge. Its program for (head, sequence, chunk) loads all of the head's splits for one chunk of the
head dim at once (hence the MAX_SPLITS cap), in one warp: the chunk is as wide as MERGE_VALUES = 2048 values
(64 float32 a thread) allow, 32 columns for Llama-3-8B's 33 splits at batch 1 and the whole head up to 16
splits, so every sum over the splits stays inside a thread. The splits are read as two power-of-two blocks,
[LO, chunk] and [HI, chunk] with LO the largest power of two <= NUM_SPLITS and HI the power of two >= the
rest (33 = 32 + 1, 9 = 8 + 1), not as one block of NUM_SPLITS rounded up (64 rows for 33), whose padding rows
cost their masked loads, exponentials and sums in every program. On an H100 with 33 splits at batch 1
(BENCHMARKS.md, 2026-12-06 session 22): 1k keys 5.77 against 6.37 us, 8k 15.78 against 15.87, 8300 15.68
against 15.88, 32200 48.61 against 48.81. %globaltimer stamps in
every program (exp/attn_trace.py; BENCHMARKS.md, 2026-12-06 session 20, H100) showed the earlier merge, a
4-warp program over a whole [64, 128] head, taking ~1.5 us from its wait to its store at batch 1, 8k keys,
its reductions crossing warps through shared memory; the one-warp programs take ~0.5-0.8 us, a call 0.4-0.5 us
less from 1k to 32k keys (8k: 15.62 against 16.04 us) and a Llama-3.1-8B step 0.3% less at 8k and 32k. With
32-column programs the 7B's step (9 splits) was 0.2% slower than with its whole head in one warp: the rule.

Launch overlap. On Hopper the merge is a programmatic dependent launch (PDL) of the first kernel:
the first lets it launch as soon as its own programs start, and the merge's programs wait
(griddepcontrol.wait) before they read the partials (their length, written earlier, is read before
the wait), so the merge's launch no longer follows the first kernel's end. Measured on an H200 in one run (BENCHMARKS.md, 2026-12-02 session 9):
0.2-0.6 us faster a call at every size (5.4 against 6.0 us at 128 keys, 38.3 against 38.8 at 32k) and a
Llama-2-7B step 3.670 against 3.691 ms. Once past its wait the merge lets its own dependent (wo's GEMV on
the one-sequence path) launch, so that launch and the GEMV's first weight loads overlap the merge instead of
following it: a 7B step 3.642 against 3.677 ms, int8 2.041 against 2.057, int4 1.791 against 1.811 (session 14).
It does so only for sequences of at most MERGE_SIGNAL_MAX_KEYS live keys (the merge reads the length anyway): from
2k keys on the early wo launch costs a Llama-3.1-8B step 5-7% (4.384 against 4.078 ms at 2k, 4.594 against 4.283 at
8k, 5.335 against 5.025 at 32k; session 15), which is what the 86% of read seen at 32k in session 14 was; it
gains 0.6-0.9% up to 1.2k keys and 0.4% from 1.5k to 1.7k (4.063 against 4.080 ms; session 16). Where between 1.7k
and 2k the gain turns into that loss, and why, is not known. The first kernel is a dependent too (FIRST_PDL),
waiting before its first read (the length); wqkv's fused GEMV kernel (kernels/gemv.py, _gemv_rope_kernel) lets it
launch only once its own rows are stored, so its waiting programs never hold SMs the product needs: a 7B step 3.596
against 3.607 ms, int8 2.003 against 2.012, 32k unchanged (4.963 against 4.966; session 15), and at batch 8 4.674
against 4.707 ms (4.635 against 4.682 with --rope-kernel; session 16). Before a kernel that never calls
launch_dependents (Inductor's, on the paths without the fused product) the launch is an ordinary one; after
kernels/rope_cache.py's kernel (several sequences with --rope-kernel), which lets its dependent launch at its start,
the first kernel's programs wait through that short kernel.
What was measured and removed:
- merging inside the first kernel (the last split of a kv head to finish, found with an atomic count,
  merges; one launch): on an H100 57% against 63% of the ceiling at batch 1, 8k (results-attention-
  sweep2-h100.log); on the H200 again, with a count the merger resets (no memset), 15.4 against 14.4 us
  at 8k, 39.9 against 38.8 at 32k, a 7B step 3.679 ms against 3.670 with the dependent merge;
- the first kernel a dependent of a kernel that lets it launch at its start: 19.2 against 14.3 us at 8k, a 7B
  step 1% slower (session 7); again in session 13, with wqkv's fused kernel before it: a 7B step 3.652 against
  3.645 ms;
- asking L2 to prefetch the wo GEMV's weight during a short call (cp.async.bulk.prefetch.L2): a 7B step 3.3%
  slower with all of it, no better with 16 MB (session 13);
- the last attention kernel letting the wo GEMV (a dependent) launch at its start: no change with two
  plain launches (3.690 against 3.691 ms), 3.4% slower with the dependent merge (3.794 ms): the GEMV's
  waiting programs hold SMs the attention still needs;
- running the attention inside wqkv's GEMV kernel at short contexts (programs of the same grid, found by an
  atomic ticket, wait on a count of their kv group's stored rows, then merge in the kernel; session 14): at
  most 1.0 us a layer at 128 keys, nothing from 328 keys on. What a short call costs is the dependent chain
  from the last q/k/v row to wo's start (~6 us a layer even inside one kernel), not the launches.
- the merge polling a per-(sequence, kv head) count of stored splits instead of waiting for the whole first
  kernel (release / acquire atomics; the last merge program of a kv head resets it): 16.7 against 16.0 us at
  8k, no earlier start, since every kv head's last split ends about when the grid does (session 20);
- the merge letting the next kernel launch after its store at every length: no change (15.98 against
  15.74-16.01 us at 8k; a step 5.459 against 5.463 ms); after its wait at every length: 15.9 against 15.7 us
  and a Llama-3.1-8B step 2% slower at 8k and 32k (session 20);
- K/V tiles loaded by TMA (host tensor descriptors): 15.86 against 15.74-16.01 us at 8k (session 20);
- each split prefetching its last 2, 4 or 8 tiles into L2 at its start (prefetch.global.L2::evict_last, so that
  the programs the DRAM queue serves last find their last tiles waiting), with or without the streaming loads
  evict_first: 17.5-21.5 against 15.8 us at 8k, a Llama-3.1-8B step 1.2-2.2% slower (session 20);
- at b1 8k, session 21 (BENCHMARKS.md): a rolling L2 prefetch 3-6 tiles ahead (17.0-18.7 against 15.85 us); tiles
  dealt round-robin over the splits (no change); the first tile computed before the pipelined loop (16.7 against
  15.7: one more dependent round trip in every program costs ~1 us); a probe tile, then an atomic rank and a range of
  the rest by rank (17.2-18.2, worse the more the early ranks take); chunks claimed one by one from an atomic count,
  the next in flight (18.0-23.8); one program an SM with 4-6 stages (17.5-19.2); NUM_SPLITS rounded down to a power
  of two (no merge padding: 15.56 against 15.75 at 8k, but a tile more a program at live lengths that are not
  multiples of 1024, and a Llama-3.1-8B step 0.3% slower at 32k);
- "balanced" splits, every split live with the floor or ceiling of tiles / NUM_SPLITS tiles (at 8k keys 33 splits of
  7-8 tiles rather than 32 of 8 and an empty one): 15.56 against 15.66 us at 8k and 174.5 against 175.4 at 128k, but
  5.94 against 5.83 at 1k, 15.70 against 15.58 at 8300, 48.04 against 47.88 at 32200 (session 22).

Contract:
    q          (B, H, D)        bf16, fp16 or fp32; any strides with the last dim contiguous
    k_cache    (B, S, Hkv, D)   q's dtype; any strides with the last dim contiguous (e.g. a
    v_cache    (B, S, Hkv, D)   layer's rows of the (L, B, S, Hkv, D) cache in cache.py)
    lengths    (B,)             int64 or int32 on q's device: live keys, 1 <= length <= S
                                (clamped to S in the kernel; a length of 0 gives zeros there,
                                NaN in the reference)
    sliding_window              None or W >= 1
    returns    (B, H, D)        q's dtype, contiguous
H % Hkv == 0; D a multiple of 8 up to 256 (powers of two and 80, 96, ... all work). Scores,
softmax and accumulation are float32; with 16-bit inputs the probabilities are rounded to the
input dtype before the P.V product, as FlashAttention does.

Registered as torch.ops.blitzgen.decode_attention, a torch.library.triton_op: torch.compile
(fullgraph=True) traces it into its two kernels, which write only their own outputs, so Inductor
never copies the cache. On Hopper `decode_attention()` calls torch.ops.blitzgen.decode_attention_pdl
instead, an opaque custom_op that launches the kernels itself (the PDL launch attribute is not passed
by Inductor's call of a traced kernel). On CPU tensors with TRITON_INTERPRET=1 (the tests;
interpreted kernels cannot be traced) the op is an opaque custom_op; otherwise, or without Triton,
`decode_attention()` returns `decode_attention_ref`.
"""

import math
import os
from functools import lru_cache

import torch

from blitzgen.errors import BlitzgenError
from blitzgen.kernels import define_ops, hopper

try:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton
except ImportError:  # a CPU-only install without Triton, or torch < 2.6: the reference is the only path
    triton = None

# Triton decides at decoration time whether kernels are compiled or interpreted on the CPU.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

TILE_BYTES = 8 * 1024  # one K (or V) tile: BLOCK_N = 32 keys at D = 128 in bf16; see the module docstring
SPLIT_MIN_TILES = 2  # fewest tiles per split
PROGRAMS_PER_SM = 2  # target programs per SM when choosing NUM_SPLITS
MAX_SPLITS = 128  # the merge kernel holds all splits of a head in registers
NUM_STAGES = 3
# Warps a program for 16-bit inputs (float32 takes 8: see _decode_attention_triton). With 4 the warps split a
# tile's 32 score columns, so the online softmax's row max and sum cross warps: the sm_90 SASS has 7 CTA
# barriers an iteration, against 2 with one warp. On an H200 (BENCHMARKS.md, 2026-12-02 session 10) 2 warps
# matched or beat 4 at every size by up to 0.5 us (8k 13.6 against 13.8 us, 32k 36.9 against 37.3) and took a
# Llama-2-7B step from 3.684 to 3.671 ms; one warp lost from 8k up (14.6 us at 8k), as did 4-8 programs an SM.
# So the barriers were not what a tile costs.
NUM_WARPS = 2
_INTERPRETER_SMS = 4  # the "SM count" used on the CPU interpreter: a few splits at test sizes
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# On Hopper the merge kernel is a programmatic dependent launch of the first: the first lets it launch at its start
# (griddepcontrol.launch_dependents) and the merge waits (griddepcontrol.wait) before it reads the partials, so its
# launch overlaps the first kernel's work (module docstring, "Launch overlap").
MERGE_PDL = True
# Once past that wait the merge lets the next kernel launch (module docstring, "Launch overlap"), but only while the
# sequence's live keys are at most MERGE_SIGNAL_MAX_KEYS (read on the device, so one captured graph serves every
# length): it gains 0.6-0.9% up to 1.2k keys and 0.4% at 1.5k-1.7k, and cost 7.5% of a Llama-3.1-8B step at 2k, 5.5% at
# 32k (BENCHMARKS.md, 2026-12-03 sessions 15 and 16).
MERGE_SIGNAL = True
MERGE_SIGNAL_MAX_KEYS = 1536
# The first kernel as a programmatic dependent of wqkv's fused GEMV kernel, which lets it launch after its stores
# (kernels/gemv.py, _gemv_rope_kernel): +0.3-0.5% a 7B step (module docstring, "Launch overlap").
FIRST_PDL = True
# Values one merge program holds: (LO + HI) x chunk columns of the head dim, with the chunk as wide as fits (at
# least 16, at most the head dim) and one warp (64 float32 a thread), so the sums over splits stay inside each thread
# (module docstring, "The merge").
MERGE_VALUES = 2048
# The merge reads the splits as two power-of-two blocks, 33 = 32 + 1, not one padded block of 64 (module docstring,
# "The merge").
MERGE_TWO_BLOCKS = True
# Past this many live keys the first kernel's programs take their (split, kv head) kv head first, so the splits past
# the live keys (the 33rd at 8k keys with 33 splits) are the last programs launched (module docstring, "H100 tuning").
HEADS_FIRST_MIN_KEYS = 1536
# NUM_SPLITS rounded down, so no SM gets more than PROGRAMS_PER_SM programs (module docstring, "H100 tuning").
SPLITS_FIT = True


def decode_attention_ref(
    q: torch.Tensor,  # (B, H, D)
    k_cache: torch.Tensor,  # (B, S, Hkv, D)
    v_cache: torch.Tensor,  # (B, S, Hkv, D)
    lengths: torch.Tensor,  # (B,) live keys per sequence
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Plain-PyTorch decode attention over the whole cache under a length mask, in float32.
    (B, H, D) in q's dtype. The CPU path and the oracle of the kernel's tests."""
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    positions = torch.arange(S, device=q.device)
    ends = lengths.to(q.device)[:, None]  # (B, 1)
    live = positions < ends  # (B, S)
    if sliding_window is not None:
        live = live & (positions >= ends - sliding_window)
    qg = q.float().view(B, Hkv, H // Hkv, D)  # (B, Hkv, G, D)
    scores = torch.einsum("bhgd,bshd->bhgs", qg, k_cache.float()) * D**-0.5  # (B, Hkv, G, S)
    scores = scores.masked_fill(~live[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    # Stale entries past a length may hold anything (NaN included); 0 * NaN would leak into the sum.
    values = v_cache.float().masked_fill(~live[:, :, None, None], 0.0)  # (B, S, Hkv, D)
    out = torch.einsum("bhgs,bshd->bhgd", probs, values)  # (B, Hkv, G, D)
    return out.reshape(B, H, D).to(q.dtype)


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr,  # (B, H, D) this step's queries
        k_ptr,  # (B, S, Hkv, D) key cache, last dim contiguous
        v_ptr,  # (B, S, Hkv, D) value cache, last dim contiguous
        lengths_ptr,  # (B,) int64 or int32: live keys per sequence, read on the device
        out_ptr,  # (B, H, D) output in q's dtype; written here only when NUM_SPLITS == 1
        part_out_ptr,  # (B, H, NUM_SPLITS, D) float32: each split's softmax-normalised output o_s
        part_lse_ptr,  # (B, H, NUM_SPLITS) float32: each split's lse_s, in base 2
        stride_qb,  # q stride between sequences, in elements
        stride_qh,  # q stride between heads
        stride_kb,  # k_cache stride between sequences
        stride_kn,  # k_cache stride between positions
        stride_kh,  # k_cache stride between kv heads
        stride_vb,  # v_cache stride between sequences
        stride_vn,  # v_cache stride between positions
        stride_vh,  # v_cache stride between kv heads
        stride_ob,  # out stride between sequences
        stride_oh,  # out stride between heads
        capacity,  # S: lengths are clamped to it, so a bad length never reads past the cache
        window,  # keys at positions >= length - window are live (S when there is no window)
        split_min,  # fewest keys per split, a multiple of BLOCK_N
        heads_first_min_keys,  # HEADS_FIRST_MIN_KEYS
        qk_scale,  # log2(e) / sqrt(D): scores in base 2, so exp2 stands for exp
        H: tl.constexpr,  # query heads
        G: tl.constexpr,  # query heads per kv head
        G_PAD: tl.constexpr,  # G rounded up to a power of two >= 16, the smallest tl.dot tile
        D: tl.constexpr,  # head dim
        BLOCK_D: tl.constexpr,  # D rounded up to a power of two
        BLOCK_N: tl.constexpr,  # keys per tile
        NUM_SPLITS: tl.constexpr,  # programs per (sequence, kv head), fixed on the host
        EXACT_DOT: tl.constexpr,  # float32 products in full precision ("ieee"), not TF32; for float32 inputs
        DOT_IN_FP32: tl.constexpr,  # the CPU interpreter only: it multiplies bf16 bit patterns as integers
        SIGNAL: tl.constexpr,  # MERGE_PDL: let the merge kernel, a programmatic dependent, launch now
        WAIT: tl.constexpr,  # FIRST_PDL: launched as a programmatic dependent of what wrote q and the cache
    ):
        if WAIT:
            tl.extra.cuda.gdc_wait()
        if SIGNAL:  # the merge launches and waits on an SM while this kernel runs
            tl.extra.cuda.gdc_launch_dependents()
        b = tl.program_id(2).to(tl.int64)  # 64-bit: b * stride_kb can pass 2**31 for large caches
        length = tl.minimum(tl.load(lengths_ptr + b).to(tl.int32), capacity)
        first = tl.maximum(length - window, 0)
        # The grid is (NUM_SPLITS, Hkv, B). Past heads_first_min_keys live keys its programs are dealt out kv head
        # first (HEADS_FIRST_MIN_KEYS: the module docstring, "H100 tuning").
        if length - first > heads_first_min_keys:
            pid = tl.program_id(1) * NUM_SPLITS + tl.program_id(0)
            kv_head = pid % (H // G)
            split = pid // (H // G)
        else:
            split = tl.program_id(0)
            kv_head = tl.program_id(1)

        # This split's keys [start, end): the live range [first, length) cut into NUM_SPLITS
        # pieces of split_len keys (the merge kernel recomputes the same numbers).
        split_len = tl.maximum(tl.cdiv(tl.cdiv(length - first, NUM_SPLITS), BLOCK_N) * BLOCK_N, split_min)
        start = first + split * split_len
        end = tl.minimum(start + split_len, length)
        if NUM_SPLITS > 1:
            if start >= end:  # past the live keys: no work, and the merge will not read this split
                return

        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        heads = kv_head * G + offs_g  # the query heads of this kv head; rows >= G are padding
        g_mask = offs_g < G
        d_mask = offs_d < D
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=g_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [G_PAD, BLOCK_D]
        if DOT_IN_FP32:  # exact: bf16 values are float32 values; the products are then done in float32
            q = q.to(tl.float32)
        k_base = k_ptr + b * stride_kb + kv_head * stride_kh
        v_base = v_ptr + b * stride_vb + kv_head * stride_vh

        m_i = tl.full([G_PAD], float("-inf"), tl.float32)  # running max of the base-2 scores
        l_i = tl.zeros([G_PAD], tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)  # running sum of exp2(score - m_i) * v
        for tile in range(start, end, BLOCK_N):
            n = tile + offs_n  # [BLOCK_N] cache positions
            n_mask = n < end
            kv_mask = n_mask[:, None] & d_mask[None, :]  # masked loads never touch stale entries
            k = tl.load(k_base + n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
            if DOT_IN_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee" if EXACT_DOT else "tf32") * qk_scale
            # Inductor passes qk_scale as a float64 constant when the op is compiled into a model;
            # keep the loop-carried softmax state float32.
            s = s.to(tl.float32)  # [G_PAD, BLOCK_N]
            s = tl.where(n_mask[None, :], s, float("-inf"))
            # Every tile holds a live key (start < end), so m_new is finite and alpha is 0 on the first.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
            p = p.to(v_ptr.dtype.element_ty)  # rounded to the input dtype, as FlashAttention does
            if DOT_IN_FP32:
                v, p = v.to(tl.float32), p.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee" if EXACT_DOT else "tf32")
            m_i = m_new

        out_mask = g_mask[:, None] & d_mask[None, :]
        if NUM_SPLITS == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no live key (length 0): zeros
            out_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            row = (b * H + heads) * NUM_SPLITS + split  # [G_PAD] rows of the (B, H, NUM_SPLITS) partials
            tl.store(part_out_ptr + row[:, None] * D + offs_d[None, :], acc / l_i[:, None], mask=out_mask)
            tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=g_mask)

    @triton.jit
    def _decode_attention_merge_kernel(
        part_out_ptr,  # (B, H, NUM_SPLITS, D) float32 from _decode_attention_kernel
        part_lse_ptr,  # (B, H, NUM_SPLITS) float32 from _decode_attention_kernel
        lengths_ptr,  # (B,) int64 or int32: live keys per sequence, to know which splits were written
        out_ptr,  # (B, H, D) output in q's dtype
        stride_ob,  # out stride between sequences
        stride_oh,  # out stride between heads
        capacity,  # S, as in _decode_attention_kernel
        window,  # as in _decode_attention_kernel
        split_min,  # as in _decode_attention_kernel
        signal_max_keys,  # MERGE_SIGNAL_MAX_KEYS
        H: tl.constexpr,  # query heads
        D: tl.constexpr,  # head dim
        BLOCK_N: tl.constexpr,  # as in _decode_attention_kernel
        NUM_SPLITS: tl.constexpr,  # as in _decode_attention_kernel
        LO: tl.constexpr,  # the largest power of two <= NUM_SPLITS: splits 0 .. LO - 1, one block
        HI: tl.constexpr,  # the power of two >= NUM_SPLITS - LO (0 when LO == NUM_SPLITS): the splits after LO
        CHUNK: tl.constexpr,  # head-dim columns a program merges (a power of two; see MERGE_VALUES)
        PDL: tl.constexpr,  # launched as a programmatic dependent of the first kernel (MERGE_PDL)
        SIGNAL: tl.constexpr,  # MERGE_SIGNAL: let the next kernel launch once past the wait (short sequences only)
    ):
        head = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        chunk = tl.program_id(2)  # this program's CHUNK columns of the head dim
        # The lengths were written before the first kernel launched (it is no dependent), so their read may overlap
        # the wait rather than follow it: 0.1-0.2 us a call on an H200 (BENCHMARKS.md, 2026-12-02 session 13).
        length = tl.minimum(tl.load(lengths_ptr + b).to(tl.int32), capacity)
        if PDL:
            tl.extra.cuda.gdc_wait()  # the partials are the first kernel's
            if SIGNAL:
                # The dependent launches once every program has signalled or exited: with a longer sequence in the
                # batch it launches at the end, as without the signal.
                if length <= signal_max_keys:
                    tl.extra.cuda.gdc_launch_dependents()
        first = tl.maximum(length - window, 0)
        split_len = tl.maximum(tl.cdiv(tl.cdiv(length - first, NUM_SPLITS), BLOCK_N) * BLOCK_N, split_min)
        num_live = tl.cdiv(length - first, split_len)  # splits the first kernel wrote (<= NUM_SPLITS)

        offs_d = chunk * CHUNK + tl.arange(0, CHUNK)
        d_mask = offs_d < D
        base = (b * H + head) * NUM_SPLITS
        # The splits in two power-of-two blocks, [LO] and [HI] rows (33 = 32 + 1), rather than one block of
        # NUM_SPLITS rounded up (64 rows for 33): see the module docstring, "The merge".
        s_lo = tl.arange(0, LO)
        m_lo = s_lo < num_live
        lse_lo = tl.load(part_lse_ptr + base + s_lo, mask=m_lo, other=float("-inf"))
        o_lo = tl.load(part_out_ptr + (base + s_lo)[:, None] * D + offs_d[None, :],
                       mask=m_lo[:, None] & d_mask[None, :], other=0.0)  # [LO, CHUNK]
        top = tl.max(lse_lo, axis=0)
        if HI > 0:
            s_hi = LO + tl.arange(0, HI)
            m_hi = s_hi < num_live  # num_live <= NUM_SPLITS, so rows past the partials are never read
            lse_hi = tl.load(part_lse_ptr + base + s_hi, mask=m_hi, other=float("-inf"))
            o_hi = tl.load(part_out_ptr + (base + s_hi)[:, None] * D + offs_d[None, :],
                           mask=m_hi[:, None] & d_mask[None, :], other=0.0)  # [HI, CHUNK]
            top = tl.maximum(top, tl.max(lse_hi, axis=0))
        w_lo = tl.where(m_lo, tl.exp2(lse_lo - top), 0.0)  # where(): no NaN when no split is live
        total = tl.sum(w_lo, axis=0)
        acc = tl.sum(w_lo[:, None] * o_lo, axis=0)  # [CHUNK]
        if HI > 0:
            w_hi = tl.where(m_hi, tl.exp2(lse_hi - top), 0.0)
            total += tl.sum(w_hi, axis=0)
            acc += tl.sum(w_hi[:, None] * o_hi, axis=0)
        out = acc / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + b * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def _check_inputs(q, k_cache, v_cache, lengths, sliding_window):
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise BlitzgenError(
            f"decode_attention: expected q (B, H, D) and k_cache, v_cache (B, S, Hkv, D) of one shape; "
            f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    B, H, D = q.shape
    Bk, S, Hkv, Dk = k_cache.shape
    if Bk != B or Dk != D or H % Hkv != 0 or tuple(lengths.shape) != (B,):
        raise BlitzgenError(
            f"decode_attention: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}, lengths {tuple(lengths.shape)} "
            "do not fit: need the same B and D, H a multiple of Hkv, and lengths of shape (B,)"
        )
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise BlitzgenError(
            f"decode_attention: dtypes q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}; "
            "expected one of bf16, fp16, fp32 for all three"
        )
    if lengths.dtype not in (torch.int64, torch.int32):
        raise BlitzgenError(f"decode_attention: lengths must be int64 or int32, got {lengths.dtype}")
    if len({q.device, k_cache.device, v_cache.device, lengths.device}) != 1:
        raise BlitzgenError(
            f"decode_attention: tensors on different devices: q {q.device}, k_cache {k_cache.device}, "
            f"v_cache {v_cache.device}, lengths {lengths.device}"
        )
    if sliding_window is not None and sliding_window < 1:
        raise BlitzgenError(f"decode_attention: sliding_window={sliding_window}; expected None or >= 1")


def _check_kernel_inputs(q, k_cache, v_cache, lengths):
    D = q.shape[-1]
    if D % 8 != 0 or not 8 <= D <= 256:
        raise BlitzgenError(f"decode_attention: head dim {D} is not supported by the kernel (a multiple of 8 up to 256)")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise BlitzgenError(
            f"decode_attention: the last dim must be contiguous; strides q {q.stride()}, "
            f"k_cache {k_cache.stride()}, v_cache {v_cache.stride()}"
        )
    if lengths.stride(0) != 1 and lengths.shape[0] > 1:
        raise BlitzgenError(f"decode_attention: lengths must be contiguous, got stride {lengths.stride()}")


@lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


def plan_splits(batch: int, kv_heads: int, capacity: int, sm_count: int, split_min: int,
                programs_per_sm: int = PROGRAMS_PER_SM) -> int:
    """NUM_SPLITS from static facts only (never the live lengths), so the grid is graph-safe."""
    slots, rows = programs_per_sm * sm_count, batch * kv_heads
    splits = -(-slots // rows)
    if SPLITS_FIT and slots // rows >= 2:  # not down to one split: that drops the merge, a trade not measured
        splits = slots // rows
    return max(1, min(splits, -(-capacity // split_min), MAX_SPLITS))


def _merge_blocks(num_splits: int) -> tuple[int, int]:
    """(LO, HI) of the merge kernel: the largest power of two <= num_splits, and the power of two >= the rest."""
    if not MERGE_TWO_BLOCKS:
        return triton.next_power_of_2(num_splits), 0
    lo = 1 << (num_splits.bit_length() - 1)
    return lo, (triton.next_power_of_2(num_splits - lo) if num_splits > lo else 0)


def _decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    sliding_window: int | None,
    *,
    num_splits: int | None = None,  # tuning overrides for tests and benchmarks; None: the defaults above
    block_n: int | None = None,
    split_min: int | None = None,
    programs_per_sm: int | None = None,
    num_warps: int | None = None,
    num_stages: int = NUM_STAGES,
    merge_pdl: bool | None = None,  # None: MERGE_PDL on Hopper
) -> torch.Tensor:
    """Launch the kernels (the body of the registered ops). Validates, allocates, picks the grid."""
    _check_inputs(q, k_cache, v_cache, lengths, sliding_window)
    _check_kernel_inputs(q, k_cache, v_cache, lengths)
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    block_d = max(16, triton.next_power_of_2(D))
    block_n = block_n or min(128, max(16, TILE_BYTES // (block_d * q.element_size())))
    split_min = split_min or SPLIT_MIN_TILES * block_n
    # float32 products run on FMAs ("ieee"): 4 warps would need 255+ registers; 8 need ~52.
    num_warps = num_warps or (8 if q.dtype == torch.float32 else NUM_WARPS)
    assert block_n >= 16 and split_min % block_n == 0, (block_n, split_min)
    if num_splits is None:
        num_splits = plan_splits(B, Hkv, S, _sm_count(q.device), split_min, programs_per_sm or PROGRAMS_PER_SM)
    assert 1 <= num_splits <= MAX_SPLITS, num_splits
    window = S if sliding_window is None else min(sliding_window, S)
    # Triton 3.9's interpreter runs tl.dot on bf16 as a product of the raw 16-bit integers.
    dot_in_fp32 = _INTERPRET and q.dtype == torch.bfloat16
    merge_pdl = (MERGE_PDL if merge_pdl is None else merge_pdl) and hopper(q) and num_splits > 1
    first_pdl = FIRST_PDL and merge_pdl  # launched here (not by Inductor) only with merge_pdl

    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if num_splits > 1:
        part_out = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
    else:  # the kernel writes `out` directly and never touches these
        part_out = part_lse = out
    # The PDL launch attribute is not passed by Inductor's call of a traced kernel, so with it the kernels are
    # launched here, inside an opaque op (decode_attention()).
    launch = (lambda kernel: kernel) if merge_pdl else wrap_triton
    launch(_decode_attention_kernel)[(num_splits, Hkv, B)](
        q, k_cache, v_cache, lengths, out, part_out, part_lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        S, window, split_min, HEADS_FIRST_MIN_KEYS, math.log2(math.e) / math.sqrt(D),
        H=H,
        G=H // Hkv,
        G_PAD=max(16, triton.next_power_of_2(H // Hkv)),
        D=D,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        EXACT_DOT=q.dtype == torch.float32 or dot_in_fp32,
        DOT_IN_FP32=dot_in_fp32,
        SIGNAL=merge_pdl,
        WAIT=first_pdl,
        num_warps=num_warps,
        num_stages=num_stages,
        **({"launch_pdl": True} if first_pdl else {}),
    )  # fmt: skip
    if num_splits > 1:
        lo, hi = _merge_blocks(num_splits)
        chunk = min(block_d, max(16, 1 << ((MERGE_VALUES // (lo + hi)).bit_length() - 1)))  # a power of two
        launch(_decode_attention_merge_kernel)[(H, B, triton.cdiv(D, chunk))](
            part_out, part_lse, lengths, out,
            out.stride(0), out.stride(1),
            S, window, split_min, MERGE_SIGNAL_MAX_KEYS,
            H=H,
            D=D,
            BLOCK_N=block_n,
            NUM_SPLITS=num_splits,
            LO=lo,
            HI=hi,
            CHUNK=chunk,
            PDL=merge_pdl,
            SIGNAL=MERGE_SIGNAL,
            num_warps=1,  # (lo + hi) * chunk <= MERGE_VALUES: 64 float32 a thread
            num_stages=1,
            **({"launch_pdl": True} if merge_pdl else {}),
        )  # fmt: skip
    return out


def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                         sliding_window: int | None, pdl: bool) -> torch.Tensor:
    """The body of torch.ops.blitzgen.decode_attention / decode_attention_pdl (pdl: the merge kernel as a
    programmatic dependent of the first)."""
    return _decode_attention_triton(q, k_cache, v_cache, lengths, sliding_window, merge_pdl=pdl)


if triton is not None:
    define_ops("decode_attention", _decode_attention_op, lambda q, *_: q.new_empty(q.shape))


def decode_attention(
    q: torch.Tensor,  # (B, H, D)
    k_cache: torch.Tensor,  # (B, S, Hkv, D)
    v_cache: torch.Tensor,  # (B, S, Hkv, D)
    lengths: torch.Tensor,  # (B,) live keys per sequence, on the device
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Decode attention (see the module docstring) -> (B, H, D) in q's dtype. The Triton kernels
    on CUDA (graph-capturable: the live lengths are only read on the device), and on CPU under
    TRITON_INTERPRET=1; the plain-PyTorch reference otherwise."""
    _check_inputs(q, k_cache, v_cache, lengths, sliding_window)
    if triton is not None and (q.is_cuda or _INTERPRET):
        pdl = MERGE_PDL and hopper(q)
        op = torch.ops.blitzgen.decode_attention_pdl if pdl else torch.ops.blitzgen.decode_attention
        return op(q, k_cache, v_cache, lengths, sliding_window, pdl)
    return decode_attention_ref(q, k_cache, v_cache, lengths, sliding_window)
