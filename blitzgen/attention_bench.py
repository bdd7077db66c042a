"""Decode attention at long context: blitzgen's split-KV kernel against PyTorch's attention paths.

Reproduces issue 5's table in one run on one GPU: Llama-3.1-8B layer shapes (32 query heads,
8 KV heads, head dim 128, bf16), one query token per sequence, batch 1 and 8, live lengths 1k, 8k,
32k and 128k. Columns:

  ours            blitzgen.kernels.decode_attention: live lengths read on the device, static grid
  SDPA flash      F.scaled_dot_product_attention, FLASH_ATTENTION, on a host-sliced live prefix
  SDPA cuDNN      the same with CUDNN_ATTENTION
  SDPA mem-eff    the same with EFFICIENT_ATTENTION
  flex            flex_attention (torch.compile'd) over the whole cache with a length mask_mod that
                  reads the device lengths; its block mask is built once for the capacity (every
                  block "partial"), as a captured graph needs when lengths grow
  masked (gpt-fast) blitzgen.model.decode_attention_ref over the whole cache under a length mask,
                  compiled by Inductor: what gpt-fast and blitzgen's compiled step did so far
  aten varlen     torch.ops.aten._flash_attention_forward with cum_seq_k over the cache rows and
                  seqused_k = the device lengths (FlashAttention-2 varlen)

The SDPA rows fold each KV head's G = 4 query heads into the query length (q viewed as
(B, Hkv, G, D)), the usual decode trick, so every backend reads each KV head once; the "gqa" rows
instead pass one query per head, (B, H, 1, D), with enable_gqa=True and leave the head mapping to
the backend (on an H100 cuDNN was 8x slower folded than the issue's own figures: this checks why).

Every call is timed inside a captured CUDA graph (the graph holds several calls; replays between
CUDA events; median of 5), and reported in microseconds and as % of a streaming-read ceiling
measured in the same run (torch.sum over 4 GiB of bf16), counting the K + V bytes of the live
prefix. Caches are (B, S, Hkv, D) views, as blitzgen's cache gives a layer; the calls of a graph
rotate over copies of the cache placed at different addresses so that at least 256 MB of distinct
K/V is read between two reads of the same bytes (an H100's L2 holds 50 MB).

Capacity S: by default one static cache of 128k positions for every live length (what a captured
graph holds while the context grows); --capacity live makes S = the live length.

    python -m blitzgen.attention_bench              # the table (~2-4 minutes on an H100)
    python -m blitzgen.attention_bench --sweep      # our kernel's launch parameters, a few sizes
    python -m blitzgen.attention_bench --dry-run    # tiny shapes; on CPU, kernels interpreted

Every backend is wrapped: one that fails prints "n/a (reason)" and the run goes on.
"""

import argparse
import datetime
import math
import os
import statistics
import sys
import time
import traceback

import torch

if __name__ == "__main__" and "--dry-run" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before blitzgen.kernels imports triton

import torch.nn.functional as F  # noqa: E402

from blitzgen.kernels import decode_attention as da  # noqa: E402
from blitzgen.kernels.decode_attention import decode_attention, decode_attention_ref  # noqa: E402
from blitzgen.model import decode_attention_ref as model_decode_attention_ref  # noqa: E402

H, HKV, D = 32, 8, 128  # Llama-3.1-8B
G = H // HKV
DTYPE = torch.bfloat16
K = 1024
ROTATE_BYTES = 256 * 2**20  # distinct K/V bytes read between two reads of the same bytes
TARGET_S = 0.02  # seconds of GPU time per measurement


# ---- inputs ---------------------------------------------------------------------------------------
_lengths = {}


def shared_lengths(batch, device):
    """One device lengths tensor per batch size, reused by every Setup, as a captured graph would
    reuse it: compiled closures over it (flex's mask_mod) are then built and compiled once."""
    if batch not in _lengths:
        _lengths[batch] = (torch.zeros(batch, dtype=torch.int64, device=device),
                           torch.zeros(batch, dtype=torch.int32, device=device))
    return _lengths[batch]


class Setup:
    """q, device lengths and `copies` caches (B, S, Hkv, D) for one (batch, live length, capacity).

    Copy i of sequence b starts at token b * rowspan + i * live in one flat buffer, so the copies'
    live prefixes never overlap while their (never attended) tails do: memory stays near one
    cache plus copies * live tokens."""

    def __init__(self, batch, live, capacity, device, copies, seed=0):
        self.B, self.L, self.S, self.copies = batch, live, capacity, copies
        self.rowspan = capacity + (copies - 1) * live
        tokens = batch * self.rowspan + (copies - 1) * live
        g = torch.Generator(device=device).manual_seed(seed)
        self.k_buf = torch.randn(tokens, HKV, D, generator=g, device=device, dtype=DTYPE)  # (tokens, Hkv, D)
        self.v_buf = torch.randn(tokens, HKV, D, generator=g, device=device, dtype=DTYPE)
        self.q = torch.randn(batch, H, D, generator=g, device=device, dtype=DTYPE)  # (B, H, D)
        self.lengths, self.lengths32 = shared_lengths(batch, device)  # (B,) int64 and int32
        self.lengths.fill_(live)
        self.lengths32.fill_(live)

    def flat(self, buf, i):  # (B * rowspan, Hkv, D): the rows of copy i, end to end
        return buf[i * self.L : i * self.L + self.B * self.rowspan]

    def k(self, i):  # (B, S, Hkv, D)
        return self.flat(self.k_buf, i).view(self.B, self.rowspan, HKV, D)[:, : self.S]

    def v(self, i):
        return self.flat(self.v_buf, i).view(self.B, self.rowspan, HKV, D)[:, : self.S]

    def live_bytes(self):
        return 2 * self.B * self.L * HKV * D * DTYPE.itemsize  # K and V of the live prefix

    def capacity_bytes(self):
        return 2 * self.B * self.S * HKV * D * DTYPE.itemsize


# ---- backends: make(setup) -> fn(i) computing (B, H, D) on copy i -----------------------------------
def make_ours(s, **launch):
    if launch:  # tuning overrides (--sweep) go to the launcher directly
        return lambda i: da._decode_attention_triton(s.q, s.k(i), s.v(i), s.lengths, None, **launch)
    return lambda i: decode_attention(s.q, s.k(i), s.v(i), s.lengths)


def make_sdpa(backend, gqa=False):
    def make(s):
        from torch.nn.attention import sdpa_kernel

        # folded: G query heads per KV head as the query length, (B, Hkv, G, D); gqa: one query per
        # head, (B, H, 1, D), and the backend maps heads to KV heads itself (enable_gqa)
        q = s.q.view(s.B, H, 1, D) if gqa else s.q.view(s.B, HKV, G, D)

        def fn(i):
            k = s.k(i)[:, : s.L].transpose(1, 2)  # (B, Hkv, L, D), host-sliced live prefix
            v = s.v(i)[:, : s.L].transpose(1, 2)
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            return out.reshape(s.B, H, D)

        return fn

    return make


_flex_block_masks = {}  # (batch, capacity) -> block mask; one per shape, so torch.compile does not recompile


def make_flex(s):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if (s.B, s.S) not in _flex_block_masks:
        lengths = s.lengths  # the same tensor for every Setup of this batch size (shared_lengths)
        block = 128
        assert s.S % block == 0, "flex needs the capacity to be a multiple of 128"
        n = s.S // block

        def length_mask(b, h, q_idx, kv_idx):
            return kv_idx < lengths[b]

        # Every block listed as partial (none "full"), so the mask_mod is applied everywhere and the
        # same block mask stays right however the device lengths grow: what a captured graph needs.
        kv_num_blocks = torch.full((s.B, 1, 1), n, dtype=torch.int32, device=s.q.device)
        kv_indices = torch.arange(n, dtype=torch.int32, device=s.q.device).expand(s.B, 1, 1, n).contiguous()
        _flex_block_masks[(s.B, s.S)] = BlockMask.from_kv_blocks(
            kv_num_blocks, kv_indices, BLOCK_SIZE=block, mask_mod=length_mask, seq_lengths=(1, s.S)
        )
    block_mask = _flex_block_masks[(s.B, s.S)]
    flex = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    q = s.q[:, :, None, :]  # (B, H, 1, D)

    def fn(i):
        k, v = s.k(i).transpose(1, 2), s.v(i).transpose(1, 2)  # (B, Hkv, S, D)
        return flex(q, k, v, block_mask=block_mask, enable_gqa=True)[:, :, 0]

    return fn


def masked_full_cache(q, k, v, lengths):
    mask = torch.arange(k.shape[1], device=q.device) < lengths[:, None]  # (B, S)
    return model_decode_attention_ref(q, k, v, mask)


def make_masked(s):
    compiled = torch.compile(masked_full_cache, fullgraph=True, dynamic=False)
    return lambda i: compiled(s.q, s.k(i), s.v(i), s.lengths)


def make_varlen(s):
    op = torch.ops.aten._flash_attention_forward.default
    names = {a.name for a in op._schema.arguments}
    if "seqused_k" not in names:
        raise RuntimeError("this torch's _flash_attention_forward has no seqused_k")
    device = s.q.device
    cu_q = torch.arange(s.B + 1, dtype=torch.int32, device=device)  # one query per sequence
    cu_k = torch.arange(s.B + 1, dtype=torch.int32, device=device) * s.rowspan  # row b starts at b * rowspan

    def fn(i):
        out = op(s.q, s.flat(s.k_buf, i), s.flat(s.v_buf, i), cu_q, cu_k, 1, s.S, 0.0, False, False,
                 seqused_k=s.lengths32)[0]  # fmt: skip
        return out  # (B, H, D)

    return fn


SELECTED = None  # --backends: names to run (None: all)


def backends():
    from torch.nn.attention import SDPBackend

    # name -> (make, which bytes one call reads: "live" prefix or the whole "capacity")
    every = {
        "ours": (make_ours, "live"),
        "SDPA flash": (make_sdpa(SDPBackend.FLASH_ATTENTION), "live"),
        "SDPA cuDNN": (make_sdpa(SDPBackend.CUDNN_ATTENTION), "live"),
        "SDPA cuDNN gqa": (make_sdpa(SDPBackend.CUDNN_ATTENTION, gqa=True), "live"),
        "SDPA flash gqa": (make_sdpa(SDPBackend.FLASH_ATTENTION, gqa=True), "live"),
        "SDPA mem-eff": (make_sdpa(SDPBackend.EFFICIENT_ATTENTION), "live"),
        "flex": (make_flex, "capacity"),
        "masked (gpt-fast)": (make_masked, "capacity"),
        "aten varlen": (make_varlen, "live"),
    }
    return {name: entry for name, entry in every.items() if SELECTED is None or name in SELECTED}


# ---- timing ---------------------------------------------------------------------------------------
def copies_needed(read_bytes, available):
    return max(1, min(available, math.ceil(ROTATE_BYTES / read_bytes)))


def time_in_graph(fn, copies):
    """Median seconds per call of fn(i), i cycling over `copies`, replayed from a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, workspaces) off the capture stream
        for i in range(min(copies, 2)):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def capture(calls):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for j in range(calls):
                fn(j % copies)
        return graph

    def replay(graph, times):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(times):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    graph = capture(copies)
    replay(graph, 1)
    estimate = replay(graph, 1) / copies
    calls = copies * max(1, min(64 // copies, math.ceil(2e-4 / (copies * estimate))))  # >= 200 us a replay
    if calls != copies:
        del graph
        graph = capture(calls)
    replays = max(1, round(TARGET_S / (calls * estimate)))
    replay(graph, 1)
    return statistics.median(replay(graph, replays) / (replays * calls) for _ in range(5))


def time_on_cpu(fn, copies):
    fn(0)
    start = time.perf_counter()
    for i in range(2):
        fn(i % copies)
    return (time.perf_counter() - start) / 2


def streaming_read_ceiling(device):
    """Bytes per second of torch.sum over 4 GiB of bf16, best of 5."""
    x = torch.ones(2**31, dtype=torch.bfloat16, device=device)
    x.sum()
    best = math.inf
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    nbytes = x.nbytes
    del x
    torch.cuda.empty_cache()
    return nbytes / best


def short(error: BaseException, width: int = 90) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text[:width]


def tokens(n: int) -> str:
    return f"{n // K}k" if n % K == 0 else str(n)


# ---- correctness ----------------------------------------------------------------------------------
def check_correctness(device, capacity, live):
    """Max |difference| to decode_attention_ref (float32 math) at one size with stale garbage past
    each length; then ragged lengths for the backends that read device lengths."""
    print(f"\nCorrectness vs decode_attention_ref (float32 math on the same bf16 inputs), batch 4, "
          f"capacity {capacity}, live {live}; cache positions past each length hold 10 * randn:")
    s = Setup(4, live, capacity, device, copies=1, seed=1)
    k, v = s.k(0), s.v(0)  # (B, S, Hkv, D) views of the buffers
    clean_k, clean_v = k.clone(), v.clone()
    garbage_k, garbage_v = 10 * torch.randn_like(k), 10 * torch.randn_like(v)

    def poison(lengths):
        """Clean values before each length, garbage from it on; returns the expected output."""
        stale = torch.arange(capacity, device=device)[None, :] >= lengths[:, None]  # (B, S)
        k.copy_(torch.where(stale[:, :, None, None], garbage_k, clean_k))
        v.copy_(torch.where(stale[:, :, None, None], garbage_v, clean_v))
        return decode_attention_ref(s.q, k, v, lengths)

    uniform = s.lengths.clone()
    ragged = torch.tensor([capacity, 1, live - 1, 129], device=device)
    for name, (make, _) in backends().items():
        try:
            fn = make(s)
            expected = poison(uniform)  # before fn(0): poison() rewrites the cache
            line = f"{float((fn(0).float() - expected.float()).abs().max()):.2e}"
            if name in ("ours", "flex", "masked (gpt-fast)", "aten varlen"):
                expected = poison(ragged)
                s.lengths.copy_(ragged)
                s.lengths32.copy_(ragged)
                line += f"   ragged lengths {ragged.tolist()}: {float((fn(0).float() - expected.float()).abs().max()):.2e}"
        except Exception as error:  # noqa: BLE001 - report and go on
            line = f"n/a ({short(error)})"
        s.lengths.copy_(uniform)
        s.lengths32.copy_(uniform)
        print(f"  {name:18s} {line}")
    try:  # the op as the compiled decode step will call it
        step = torch.compile(lambda q, k, v, n: decode_attention(q, k, v, n), fullgraph=True, dynamic=False)
        expected = poison(uniform)
        diff = float((step(s.q, k, v, s.lengths).float() - expected.float()).abs().max())
        print(f"  {'ours, compiled':18s} {diff:.2e}   (torch.compile(fullgraph=True) of a call to the op)")
    except Exception as error:  # noqa: BLE001
        print(f"  {'ours, compiled':18s} n/a ({short(error)})")
    print("  (bf16 outputs of magnitude <= ~4: differences up to ~1e-2 are rounding; garbage leaking in shows as >> 0.1)")


# ---- the table ------------------------------------------------------------------------------------
def fits(batch, capacity, live, device):
    if device.type != "cuda":
        return True
    need = 2 * batch * (capacity + live) * HKV * D * DTYPE.itemsize * 1.3 + 2**30
    return need < min(70e9, torch.cuda.get_device_properties(device).total_memory * 0.85)


def run_table(device, batches, lives, capacity_mode, ceiling):
    timer = time_in_graph if device.type == "cuda" else time_on_cpu
    names = list(backends())
    results = {}  # (batch, live) -> {name: (seconds or None, note)}
    max_live = max(lives)
    for batch in batches:
        for live in lives:
            capacity = live if capacity_mode == "live" else max_live
            row = results.setdefault((batch, live), {})
            if not fits(batch, capacity, live, device):
                row.update({name: (None, "does not fit") for name in names})
                continue
            live_bytes = 2 * batch * live * HKV * D * DTYPE.itemsize
            available = copies_needed(live_bytes, 64)
            s = Setup(batch, live, capacity, device, copies=available)
            for name, (make, reads) in backends().items():
                read_bytes = s.live_bytes() if reads == "live" else s.capacity_bytes()
                copies = min(available, copies_needed(read_bytes, available))
                try:
                    row[name] = (timer(make(s), copies), "")
                except Exception as error:  # noqa: BLE001 - one backend failing must not end the run
                    row[name] = (None, short(error, 60))
                    if os.environ.get("BENCH_DEBUG"):
                        traceback.print_exc()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                progress = row[name][0]
                print(f"  batch {batch} live {tokens(live)}: {name}: "
                      + (f"{progress * 1e6:.1f} us" if progress else f"n/a ({row[name][1]})"), file=sys.stderr)
            del s
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def cell(batch, live, name):
        seconds, note = results[(batch, live)][name]
        if seconds is None:
            return f"n/a ({note})"
        if ceiling is None:
            return f"{seconds * 1e6:.1f} us"
        live_bytes = 2 * batch * live * HKV * D * DTYPE.itemsize
        return f"{seconds * 1e6:.1f} us ({100 * live_bytes / seconds / ceiling:.0f}%)"

    print("\n| batch | live | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for batch in batches:
        for live in lives:
            print(f"| {batch} | {tokens(live)} | " + " | ".join(cell(batch, live, n) for n in names) + " |")
    return results


def check_targets(results, ceiling, batches, lives):
    """Issue 5's targets for our row, as pass / MISS lines."""
    if ceiling is None:
        return
    print("\nIssue 5 targets for `ours`:")

    def pct(batch, live, name="ours"):
        seconds = results.get((batch, live), {}).get(name, (None, ""))[0]
        return None if seconds is None else 2 * batch * live * HKV * D * DTYPE.itemsize / seconds / ceiling

    goals = [(1, 8 * K, 0.70), (1, 32 * K, 0.85), (1, 128 * K, 0.90)]
    goals += [(8, live, 0.90) for live in (8 * K, 32 * K, 128 * K)]
    for batch, live, goal in goals:
        got = pct(batch, live)
        if got is not None:
            print(f"  batch {batch} live {live // K}k: {100 * got:.1f}% of ceiling, goal {100 * goal:.0f}%: "
                  + ("pass" if got >= goal else "MISS"))
    for batch in batches:
        for live in lives:
            ours = pct(batch, live)
            if ours is None:
                continue
            for rival in ("flex", "masked (gpt-fast)"):
                other = pct(batch, live, rival)
                if other is not None and ours <= other:
                    print(f"  batch {batch} live {live // K}k: not faster than {rival}: MISS")
            rates = [r for r in (pct(batch, live, "SDPA cuDNN"), pct(batch, live, "SDPA cuDNN gqa")) if r is not None]
            cudnn = max(rates, default=None)  # the faster way of calling cuDNN
            if live >= 8 * K and cudnn is not None:
                ratio = ours / cudnn  # >= 0.9 means our time is at most cuDNN's / 0.9
                print(f"  batch {batch} live {live // K}k: {ratio:.2f}x cuDNN's rate (goal >= 0.90): "
                      + ("pass" if ratio >= 0.9 else "MISS"))


def run_sweep(device, ceiling):
    """Our kernel's launch parameters, one change at a time from the defaults."""
    variants = {
        "defaults": {},
        "block_n 64": dict(block_n=64, split_min=128),
        "block_n 128": dict(block_n=128, split_min=256),
        "stages 2": dict(num_stages=2),
        "stages 4": dict(num_stages=4),
        "warps 8": dict(num_warps=8),
        "1 program/SM": dict(programs_per_sm=1),
        "4 programs/SM": dict(programs_per_sm=4),
        "8 programs/SM": dict(programs_per_sm=8),
        "split_min 64": dict(split_min=64),
        "split_min 512": dict(split_min=512),
        "block_n 128, stages 4": dict(block_n=128, split_min=256, num_stages=4),
        "block_n 128, 1 program/SM": dict(block_n=128, split_min=256, programs_per_sm=1),
        "stages 4, 4 programs/SM": dict(num_stages=4, programs_per_sm=4),
        "block_n 32, stages 4, 4 programs/SM": dict(block_n=32, split_min=64, num_stages=4, programs_per_sm=4),
        "split_min 32, 4 programs/SM": dict(split_min=32, programs_per_sm=4),
        "block_n 64, 4 programs/SM": dict(block_n=64, split_min=128, programs_per_sm=4),
        # Fewer warps a program keep more of the online softmax's reductions inside a warp (fewer CTA barriers
        # an iteration: decode_attention.NUM_WARPS, 2 by default), with more programs a SM to keep bytes in flight.
        "warps 4": dict(num_warps=4),
        "warps 1": dict(num_warps=1),
        "warps 1, 4 programs/SM": dict(num_warps=1, programs_per_sm=4),
        "warps 1, 6 programs/SM": dict(num_warps=1, programs_per_sm=6),
        "warps 2, 4 programs/SM": dict(num_warps=2, programs_per_sm=4),
        "warps 1, block_n 64, 4 programs/SM": dict(num_warps=1, block_n=64, split_min=128, programs_per_sm=4),
        "warps 2, block_n 64, 4 programs/SM": dict(num_warps=2, block_n=64, split_min=128, programs_per_sm=4),
    }
    sizes = [(1, 1 * K), (1, 8 * K), (1, 32 * K), (1, 128 * K), (8, 8 * K), (8, 32 * K)]
    capacity = 128 * K
    cells = {name: {} for name in variants}
    for batch, live in sizes:
        copies = copies_needed(2 * batch * live * HKV * D * DTYPE.itemsize, 64)
        s = Setup(batch, live, capacity, device, copies=copies)
        for name, launch in variants.items():
            try:
                seconds = time_in_graph(make_ours(s, **launch), s.copies)
                cells[name][batch, live] = f"{seconds * 1e6:.1f} ({100 * s.live_bytes() / seconds / ceiling:.0f}%)"
            except Exception as error:  # noqa: BLE001
                cells[name][batch, live] = f"n/a ({short(error, 60)})"
            print(f"  batch {batch} live {tokens(live)}: {name}: {cells[name][batch, live]}", file=sys.stderr)
        del s
        torch.cuda.empty_cache()
    print("\nSweep of our kernel (capacity 128k; us and % of the ceiling):\n")
    print("| variant | " + " | ".join(f"b{b} {tokens(n)}" for b, n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name in variants:
        print(f"| {name} | " + " | ".join(cells[name][size] for size in sizes) + " |")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", choices=["max", "live"], default="max",
                        help="cache capacity: 128k for every live length (default) or = the live length")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--lives", default="1024,8192,32768,131072", help="live lengths, tokens")
    parser.add_argument("--backends", help="comma-separated subset of: ours, SDPA flash, SDPA cuDNN, SDPA mem-eff, "
                        "flex, masked (gpt-fast), aten varlen")
    parser.add_argument("--sweep", action="store_true", help="time launch-parameter variants of our kernel")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU allowed (kernels interpreted)")
    args = parser.parse_args(argv)
    global SELECTED
    if args.backends:
        SELECTED = {name.strip() for name in args.backends.split(",")}

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("recompile_limit", "cache_size_limit"):  # flex and the masked step compile once per shape
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    if device.type != "cuda" and not args.dry_run:
        sys.exit("attention_bench: no CUDA device; use --dry-run to check the script on CPU")
    batches = [int(x) for x in args.batches.split(",")]
    lives = [int(x) for x in args.lives.split(",")]
    if args.dry_run:
        batches, lives = [1, 2], [100, 256]

    import triton

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"# attention_bench {datetime.date.today()} on {gpu}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"Llama-3.1-8B layer: H={H}, Hkv={HKV}, D={D}, {str(DTYPE).replace('torch.', '')}, one query per sequence; "
          f"capacity {'= live length' if args.capacity == 'live' else str(max(lives)) + ' positions'}")
    ceiling = None
    if device.type == "cuda":
        ceiling = streaming_read_ceiling(device)
        print(f"Streaming-read ceiling (torch.sum over 4 GiB bf16, best of 5): {ceiling / 1e9:.0f} GB/s")
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        split_min = da.SPLIT_MIN_TILES * (da.TILE_BYTES // (D * DTYPE.itemsize))  # as the launcher sets it
        print(f"Our kernel's splits per (sequence, kv head) on {sms} SMs: "
              + ", ".join(f"batch {b}: {da.plan_splits(b, HKV, max(lives), sms, split_min)}" for b in batches))

    if args.sweep:
        if device.type != "cuda":
            sys.exit("attention_bench: --sweep needs CUDA")
        run_sweep(device, ceiling)
        return
    check_correctness(device, capacity=256 if args.dry_run else 4096, live=100 if args.dry_run else 1000)
    start = time.perf_counter()
    results = run_table(device, batches, lives, args.capacity, ceiling)
    check_targets(results, ceiling, batches, lives)
    print(f"\n(table built in {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
