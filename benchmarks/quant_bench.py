"""Weight-only int8 / int4 on one GPU: decode tokens/s, GEMV bandwidth and prefill time beside bf16, in one run.

    python benchmarks/quant_bench.py              # H100: under 6 minutes; prints markdown tables
    python benchmarks/quant_bench.py --dry-run    # CPU, tiny shapes, Triton interpreted: checks the script

Every figure is measured in this run, bf16 included, next to a streaming-read ceiling measured in
this run too (torch.sum over 4 GiB of bf16, CUDA events):

1. Kernels at Llama-2-7B shapes (4096x4096 wo, 12288x4096 fused qkv, 22016x4096 fused gate/up,
   4096x11008 down, 32000x4096 output), 1 and 8 rows: first the Triton GEMVs against their
   plain-PyTorch references (bf16, real shapes), then bytes read / time in GB/s for cuBLAS bf16,
   int8 and int4 g128. Each timing replays a CUDA graph of calls over enough copies of the weight
   to overflow the 50 MB L2, so every byte comes from HBM; the int8 / int4 times include the small
   split-K reduction kernels. Then a sweep of block sizes and split-K, to tune the defaults.
2. Random-weight Llama-2-7B (blitzgen's Transformer built on the GPU in bf16, normal(0, 0.02)):
   bf16, then quantize_model int8, then (rebuilt) int4 g128. "int8 gemv" decodes one sequence through
   kernels/gemv.py (the default), "int8" / "int8 a8" through Int8Linear's own kernels (weight-only, or
   with int8 activations). Decode through Generator (compile=True,
   CUDA graph), prompt 100 tokens, 200 new tokens, greedy, batch 1 and 8: median of 3 runs of
   decode tokens/s (after the first token, host streaming included), and GB/s = tokens/s x bytes a
   step reads (all weights but the embedding table + the live K/V). Prefill: time to first token of a
   1024-token prompt (median of 3, cache reset each time), and the prefill alone timed twice: when
   it returns to the host and when the GPU is done (the eager forward can be host-bound).

Targets (issue 6): int8 decode >= 85% of the ceiling (>= 380 tokens/s at batch 1), int4 g128 >= 65%
(>= 530 tokens/s); prefill of 1024 tokens with int8 / int4 no slower than 1.5x bf16.
"""

import argparse
import gc
import os
import statistics
import sys
import time
from datetime import date

if "--dry-run" in sys.argv:  # before triton is imported: the kernels run under its interpreter on a CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

from blitzgen.bench import NullTokenizer  # noqa: E402
from blitzgen.config import ModelConfig  # noqa: E402
from blitzgen.generate import Generator  # noqa: E402
from blitzgen.kernels import gemv_a8 as gemv_a8_kernels  # noqa: E402
from blitzgen.kernels.gemv_a8 import (gemv_a8, gemv_a8_codes, int4_gemv_a8_ref, int8_gemv_a8_ref,  # noqa: E402
                                      quantize_activations)
from blitzgen.kernels.int4_gemv import int4_gemv, int4_gemv_ref  # noqa: E402
from blitzgen.kernels.int8_gemv import int8_gemv, int8_gemv_ref  # noqa: E402
from blitzgen.model import Transformer  # noqa: E402
from blitzgen import quantize as quant  # noqa: E402
from blitzgen.quantize import Int4Linear, Int8Linear, int4_one_row, int8_one_row, quantize_model  # noqa: E402
from blitzgen.sampling import SamplingParams  # noqa: E402

LLAMA_2_7B = ModelConfig(model_type="llama", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                         head_dim=128, intermediate_size=11008, max_seq_len=4096, norm_eps=1e-5)
TINY = ModelConfig(model_type="llama", vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                   intermediate_size=256, max_seq_len=1100, norm_eps=1e-5)
SHAPES = {"wo 4096x4096": (4096, 4096), "wqkv 12288x4096": (12288, 4096), "w13 22016x4096": (22016, 4096),
          "w2 4096x11008": (4096, 11008), "output 32000x4096": (32000, 4096)}
TINY_SHAPES = {"tiny 100x256": (100, 256)}  # 100 rows: a multiple of no block size (the dry run checks the script runs)
SWEEP = {  # (block_m, block_n, block_k, num_warps); split-K: the launcher's plan, and none
    1: [(1, 16, 512, 4), (1, 32, 256, 4), (1, 8, 1024, 4), (1, 16, 1024, 8), (1, 32, 512, 8), (1, 64, 128, 4),
        (16, 32, 256, 4)],
    8: [(16, 64, 128, 4), (16, 32, 256, 4), (16, 64, 256, 8), (16, 128, 128, 8), (16, 32, 128, 4)],
}
SWEEP_A8 = [(8, 2048, 4), (16, 1024, 4), (8, 1024, 4), (4, 2048, 4), (8, 4096, 4), (4, 4096, 4), (8, 2048, 2),
            (16, 2048, 4), (16, 2048, 8), (8, 4096, 8), (16, 256, 4)]  # gemv_a8: (block_n, block_k, num_warps)
L2_FLUSH_BYTES = 256 << 20  # weight copies per timed graph: more than the H100's 50 MB L2


def log(message: str):
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def read_ceiling(device, gib: float) -> float:
    """Bytes per second of torch.sum streaming a large bf16 tensor."""
    x = torch.ones(int(gib * (1 << 30)) // 2, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        x.sum()
    seconds = seconds_per_call(lambda i: x.sum(), 1, device, reps=10, graph=False)
    return x.nbytes / seconds


def seconds_per_call(call, copies: int, device, reps: int, graph: bool = True) -> float:
    """Mean seconds of call(i) over i in range(copies), replayed `reps` times (one CUDA graph on a GPU)."""
    for i in range(copies):  # warm-up: Triton compiles, cuBLAS picks its kernels
        call(i)
    sync(device)
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            for i in range(copies):
                call(i)
        return (time.perf_counter() - t0) / (reps * copies)
    run = lambda: [call(i) for i in range(copies)]  # noqa: E731
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        run = g.replay
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / (reps * copies)


def random_linear(N, K, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    linear = torch.nn.Linear(K, N, bias=False, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=g)
    return linear


def module_bytes(module) -> int:
    return sum(t.nbytes for t in list(module.parameters()) + list(module.buffers()))


def _bf16_linear(x, w):
    return torch.nn.functional.linear(x, w)


def _int8_product(x, weight, scales):
    return int8_one_row(x, weight, scales).to(x.dtype)


def _int4_product(x, packed, scales, zeros):
    return int4_one_row(x, packed, scales, zeros).to(x.dtype)


torch._dynamo.config.recompile_limit = 64  # one compiled product per shape and row count
_OPTIONS = {"coordinate_descent_tuning": True}  # as Generator compiles the decode step on CUDA
BF16_COMPILED = torch.compile(_bf16_linear, fullgraph=True, dynamic=False, options=_OPTIONS)
INT8_COMPILED = torch.compile(_int8_product, fullgraph=True, dynamic=False, options=_OPTIONS)
INT4_COMPILED = torch.compile(_int4_product, fullgraph=True, dynamic=False, options=_OPTIONS)


A8_X = {}  # (rows, block sums too: int4) -> quantize_activations(x) of the GEMV being timed


def rel_err(y, ref) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def gemv_tables(shapes, device, ceiling, reps, sweep: bool, inductor: bool):
    """Correctness at real shapes, GB/s per shape and rows, and the block-size sweep."""
    check_rows, speed_rows, sweep_rows = [], [], []
    for name, (N, K) in shapes.items():
        linear = random_linear(N, K, device)
        m8, m4 = Int8Linear.from_float(linear), Int4Linear.from_float(linear, 128)
        for M in (1, 8):
            # The dry run checks in fp16 where a tl.dot runs: Triton 3.9's interpreter gets bf16 tl.dot wrong.
            dtype = torch.float16 if device.type == "cpu" else torch.bfloat16
            x = torch.randn(M, K, device=device, dtype=dtype)
            y8, r8 = int8_gemv(x, m8.weight, m8.scales), int8_gemv_ref(x, m8.weight, m8.scales)
            y4, r4 = int4_gemv(x, m4.packed, m4.scales, m4.zeros), int4_gemv_ref(x, m4.packed, m4.scales, m4.zeros)
            err8, err4 = rel_err(y8, r8), rel_err(y4, r4)
            # The activation-int8 kernels against their own (exact-integer) references, and how far
            # those are from the weight-only products (the cost of rounding x to 8 bits per 32).
            xw8, xs8, _ = quantize_activations(x)
            a8 = int8_gemv_a8_ref(xw8, xs8, m8.weight, m8.scales, dtype=torch.float32)
            e8a = rel_err(gemv_a8(x, m8.weight, m8.scales), a8)
            xw4, xs4, xbs4 = quantize_activations(x, sums=True)
            a4 = int4_gemv_a8_ref(xw4, xs4, xbs4, m4.packed, m4.scales, m4.zeros, dtype=torch.float32)
            e4a = rel_err(gemv_a8(x, m4.packed, m4.scales, m4.zeros), a4)
            # bf16 outputs (and, with 8 rows, bf16 weights into the tensor-core dot): ~1e-2 at most.
            ok = "ok" if max(err8, err4, e8a, e4a) < 2e-2 else "MISMATCH"
            check_rows.append(f"| {name} | {M} | {err8:.1e} | {err4:.1e} | {e8a:.1e} | {e4a:.1e} | "
                              f"{rel_err(a8, r8):.1e} | {rel_err(a4, r4):.1e} | {ok} |")
        log(f"checked {name}")

        formats = {
            "bf16": (module_bytes(linear), lambda w, x: torch.nn.functional.linear(x, w[0]), (linear.weight,)),
            "int8": (module_bytes(m8), lambda w, x, **kw: int8_gemv(x, *w, **kw), (m8.weight, m8.scales)),
            "int4": (module_bytes(m4), lambda w, x, **kw: int4_gemv(x, *w, **kw), (m4.packed, m4.scales, m4.zeros)),
            # Codes cast one by one (the path before int32 words), to compare.
            "int8 cast": (module_bytes(m8), lambda w, x: int8_gemv(x, *w, words=False), (m8.weight, m8.scales)),
            "int4 cast": (module_bytes(m4), lambda w, x: int4_gemv(x, *w, words=False), (m4.packed, m4.scales, m4.zeros)),
            # Several rows with the tile dequantized through fp32 (the path before 16-bit pairs), to compare.
            "int4 no pairs": (module_bytes(m4), lambda w, x: int4_gemv(x, *w, pairs=False),
                              (m4.packed, m4.scales, m4.zeros)),
            # Activations rounded to int8, integer dot products (kernels/gemv_a8.py): the kernel alone, on
            # activations quantized beforehand (in the decode step Inductor fuses that into x's producer).
            "int8 a8": (module_bytes(m8), lambda w, x, **kw: gemv_a8_codes(*A8_X[x.shape[0], False], *w, **kw),
                        (m8.weight, m8.scales)),
            "int4 a8": (module_bytes(m4), lambda w, x, **kw: gemv_a8_codes(*A8_X[x.shape[0], True], *w, **kw),
                        (m4.packed, m4.scales, m4.zeros)),
        }
        if inductor:  # the same products as plain expressions, compiled as the decode step compiles them
            formats["bf16 Inductor"] = (module_bytes(linear), lambda w, x: BF16_COMPILED(x, w[0]), (linear.weight,))
            formats["int8 Inductor"] = (module_bytes(m8), lambda w, x: INT8_COMPILED(x, *w), (m8.weight, m8.scales))
            formats["int4 Inductor"] = (module_bytes(m4), lambda w, x: INT4_COMPILED(x, *w),
                                        (m4.packed, m4.scales, m4.zeros))
        for M in (1, 8):
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            A8_X[M, False], A8_X[M, True] = quantize_activations(x), quantize_activations(x, sums=True)
            cells, best = [], {}
            for fmt, (nbytes, fn, tensors) in formats.items():
                copies = max(1, -(-L2_FLUSH_BYTES // nbytes)) if device.type == "cuda" else 2
                weights = [tuple(t.clone() for t in tensors) for _ in range(copies)]
                seconds = seconds_per_call(lambda i: fn(weights[i], x), copies, device, reps)
                cells.append(f"{nbytes / seconds / 1e9:.0f} ({100 * nbytes / seconds / ceiling:.0f}%), "
                             f"{seconds * 1e6:.1f} µs")
                if sweep and fmt in ("int8", "int4", "int8 a8", "int4 a8"):
                    results = []
                    entries = SWEEP_A8 if fmt.endswith(" a8") else SWEEP[M]
                    for blocks in entries[-1:] if device.type == "cpu" else entries:  # the dry run: one each
                        for split in (None, 1):
                            s = seconds_per_call(lambda i: fn(weights[i], x, blocks=blocks, split_k=split), copies,
                                                 device, reps)
                            results.append((s, blocks, split))
                    s, blocks, split = min(results)
                    sweep_rows.append(f"| {name} | {M} | {fmt} | {blocks}, split {split or 'plan'} | "
                                      f"{nbytes / s / 1e9:.0f} ({100 * nbytes / s / ceiling:.0f}%) | "
                                      f"{nbytes / seconds / 1e9:.0f} |")
                del weights
            speed_rows.append(f"| {name} | {M} | " + " | ".join(cells) + " |")
        log(f"timed {name}")
        del linear, m8, m4
    return check_rows, speed_rows, sweep_rows, list(formats)


def build_model(config, device):
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Transformer(config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def step_bytes(model, config, live_tokens: float, batch: int) -> float:
    """Bytes one decode step reads: every weight but the embedding table (B rows of it), + live K/V."""
    weights = sum(t.nbytes for name, t in list(model.named_parameters()) + list(model.named_buffers())
                  if not name.startswith("tok_embeddings") and not name.endswith("inv_freq"))
    kv = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 2 * live_tokens * batch
    return weights + kv


def measure_model(model, config, device, label, batch_sizes, new_tokens, runs, ceiling, dry):
    rows = []
    # bf16 and "int8 gemv" decode one sequence through kernels/gemv.py (the default); the other int8 rows
    # through Int8Linear's own kernels (int8_gemv, or gemv_a8 with " a8"); int4 is not read by gemv.py.
    gemv_kernels = None if label in ("bf16", "int8 gemv") else False
    gen = Generator(model, NullTokenizer(), compile=not dry, gemv_kernels=gemv_kernels)
    weights_gb = step_bytes(model, config, 0, 1) / 1e9
    for bs in batch_sizes:
        prompts = [list(range(1, 101))] * bs
        params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        gen.generate(prompts, params)  # compiles and captures
        first = time.perf_counter() - t0
        rates = []
        for _ in range(runs):
            gen.reset()
            gen.generate(prompts, params)
            rates.append(gen.last_stats.decode_tokens_per_second / bs)
        rate = statistics.median(rates)
        gbps = rate * step_bytes(model, config, 100 + new_tokens / 2, bs) / 1e9
        rows.append(f"| {label} | {weights_gb:.2f} | {bs} | {rate:.1f} | {rate * bs:.0f} | {gbps:.0f} | "
                    f"{100 * gbps * 1e9 / ceiling:.0f}% | {first:.1f} s |")
        log(f"{label} decode batch {bs}: {rate:.1f} tokens/s per sequence")
    # A Generator is a reference cycle (its captured steps refer back to it): collect it now, or the
    # collector may run during the host-timed prefill below (session 6 saw int8 prefill read 1.64-1.78x
    # bf16 here against 1.12x in a process of its own).
    del gen
    gc.collect()
    # Prefill: eager, with its own cache; time to first token of a fresh 1024-token prompt.
    gen = Generator(model, NullTokenizer(), compile=False)
    prompt = torch.randint(1, config.vocab_size, (1024,), generator=torch.Generator().manual_seed(0)).tolist()
    one = SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True)
    times = []
    for _ in range(runs + 1):
        gen.reset()
        gen.generate([prompt], one)
        times.append(gen.last_stats.time_to_first_token)
    ttft = statistics.median(times[1:])  # the first run warms up
    # The same prefill on its own: when prefill() returns (the host has launched every kernel) and when the
    # GPU is done. Equal times say the host is the bottleneck of this eager forward.
    launched, done = [], []
    for _ in range(runs):
        gen.reset()
        sync(device)
        t0 = time.perf_counter()
        gen.prefill(0, prompt)
        launched.append(time.perf_counter() - t0)
        sync(device)
        done.append(time.perf_counter() - t0)
    prefill = (ttft, statistics.median(launched), statistics.median(done))
    log(f"{label} prefill 1024: {ttft * 1000:.1f} ms to the first token")
    del gen
    return rows, prefill


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreted kernels")
    parser.add_argument("--no-sweep", action="store_true", help="skip the block-size sweep (saves ~1 min)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--no-inductor", action="store_true",
                        help="skip the Inductor-compiled plain expressions (GEMV columns, one-row decode rows)")
    parser.add_argument("--models", default="bf16,int8 gemv,int8,int4 g128,int8 a8,int4 g128 a8,int8 Inductor 1-row,"
                        "int4 g128 Inductor 1-row",
                        help="decode rows to measure, comma-separated")
    args = parser.parse_args()
    dry = args.dry_run
    if dry:  # the interpreter's cost grows with the tile, and the GPU defaults' 4096-wide tiles are mostly masked here
        gemv_a8_kernels.INT8_BLOCKS = gemv_a8_kernels.INT4_BLOCKS = (16, 256, 4)
    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --dry-run to check the script on a CPU")
    config, shapes = (TINY, TINY_SHAPES) if dry else (LLAMA_2_7B, SHAPES)
    reps, runs, new_tokens = (1, 1, 8) if dry else (20, 3, 200)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    ceiling = read_ceiling(device, 0.01 if dry else 4.0)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    log(f"read ceiling {ceiling / 1e9:.0f} GB/s on {gpu}")
    print(f"## {date.today()} — weight-only int8 / int4 (`python benchmarks/quant_bench.py"
          f"{' --dry-run' if dry else ''}`)\n")
    print(f"- {gpu}, torch {torch.__version__}, triton {triton.__version__}; streaming-read ceiling "
          f"(torch.sum over {'0.01' if dry else '4'} GiB bf16, same run): **{ceiling / 1e12:.2f} TB/s**\n", flush=True)

    inductor = not args.no_inductor
    check_rows, speed_rows, sweep_rows, columns = gemv_tables(shapes, device, ceiling, reps, sweep=not args.no_sweep,
                                                     inductor=inductor)
    print("Kernels against their references (bf16 activations; max |kernel - ref| / max |ref|):\n")
    print("| shape (N x K) | rows | int8_gemv | int4_gemv g128 | int8 a8 kernel | int4 a8 kernel | "
          "int8 a8 ref vs int8 ref | int4 a8 ref vs int4 ref | |\n|---|---|---|---|---|---|---|---|---|")
    print("\n".join(check_rows) + "\n")
    print("GEMV, bytes of the weight format read / time: GB/s (% of ceiling), time per call:\n")
    print("| shape (N x K) | rows | " + " | ".join("bf16 cuBLAS" if c == "bf16" else c for c in columns)
          + " |\n|---|---|" + "---|" * len(columns))
    print("\n".join(speed_rows) + "\n", flush=True)
    if sweep_rows:
        print("Block-size sweep (block_m, block_n, block_k, num_warps), best per shape, GB/s (% of ceiling), "
              "against the default:\n")
        print("| shape | rows | format | best blocks, split-K | best GB/s | default GB/s |\n|---|---|---|---|---|---|")
        print("\n".join(sweep_rows) + "\n", flush=True)

    decode_rows, prefills = [], {}
    for label in filter(None, args.models.split(",")):  # --models "": the kernel tables only
        by_inductor = label.endswith(" Inductor 1-row")
        if by_inductor and not inductor:
            continue
        model = build_model(config, device)
        if label.startswith("int8"):
            quantize_model(model, "int8")
        elif label.startswith("int4 g128"):
            quantize_model(model, "int4", 128)
        log(f"built {label}")
        quant.ONE_ROW_BY_INDUCTOR = by_inductor
        defaults = quant.INT8_ACTIVATIONS_INT8, quant.INT4_ACTIVATIONS_INT8
        # "a8": int8 activations in one-row steps, as by default (int4's int8 output projection too); else none.
        quant.INT8_ACTIVATIONS_INT8 = quant.INT4_ACTIVATIONS_INT8 = label.endswith(" a8")
        rows, prefill = measure_model(model, config, device, label, [1] if by_inductor else batch_sizes,
                                      new_tokens, runs, ceiling, dry)
        quant.ONE_ROW_BY_INDUCTOR = False
        quant.INT8_ACTIVATIONS_INT8, quant.INT4_ACTIVATIONS_INT8 = defaults
        if not by_inductor:
            prefills[label] = prefill
        decode_rows += rows
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"Decode, random-weight {'tiny' if dry else 'Llama-2-7B'}, prompt 100, {new_tokens} new tokens, greedy, "
          f"compiled + CUDA graph (median of {runs}):\n")
    print("| weights | GB read per step (weights) | batch | tokens/s per sequence | total tokens/s | GB/s | "
          "% of ceiling | first call (compile + capture) |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(decode_rows) + "\n")
    print(f"Prefill of a 1024-token prompt (median of {runs}): time to first token; prefill() alone, when it "
          "returns (every kernel launched) and when the GPU is done:\n")
    print("| weights | time to first token, ms | x bf16 | prefill() returns, ms | GPU done, ms |\n|---|---|---|---|---|")
    base = prefills.get("bf16", (None,))[0]
    for label, (ttft, launched, done) in prefills.items():
        print(f"| {label} | {ttft * 1000:.1f} | {ttft / (base or ttft):.2f} | {launched * 1000:.1f} | {done * 1000:.1f} |")
    log("done")


START = time.perf_counter()
if __name__ == "__main__":
    main()
