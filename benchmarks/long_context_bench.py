"""Long-context decode, end to end: the split-KV kernel against the masked full-cache attention, in one run.

    python benchmarks/long_context_bench.py                  # H100: random Llama-3.1-8B bf16, ~8 minutes
    python benchmarks/long_context_bench.py --dry-run        # CPU, tiny model, Triton interpreted

One random-weight model is built once and one streaming-read ceiling measured; then for each
(batch, context) row the compiled, graph-captured decode step is timed twice, once with each
attention: "masked" is the plain compiled step (Inductor's attention over the whole cache under a
length mask, gpt-fast's way) and "kernel" the split-KV Triton kernel (blitzgen/kernels/
decode_attention.py) that reads only the live keys. Prefill time is the time to fill the cache with
the prompt (chunked SDPA prefill, same for both).

Bytes a step reads = every weight but the embedding table + the K/V of the live prefix (prompt +
half the new tokens, the mean over the timed steps), the same count `blitzgen bench` uses; % of
read is that over the time per step, against this run's ceiling. The masked path reads more than
that (the whole cache, whose capacity is the next power of two >= prompt + new tokens): its
percentage says how far it is from what the live data allows.
"""

import argparse
import gc
import json
import os
import sys
import time
from datetime import date

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from blitzgen.bench import NullTokenizer, build_random, bytes_per_token, ceilings, decode_seconds_per_step  # noqa: E402
from blitzgen.bench import sync  # noqa: E402
from blitzgen.config import PRESETS, ModelConfig  # noqa: E402
from blitzgen.generate import Generator  # noqa: E402

TINY = ModelConfig(model_type="llama", vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                   intermediate_size=128, max_seq_len=2048, norm_eps=1e-5)
START = time.perf_counter()


def log(message: str):
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", file=sys.stderr, flush=True)


def measure(model, batch: int, context: int, steps: int, runs: int, kernel: bool) -> dict:
    gen = Generator(model, NullTokenizer(), compile=True, attention_kernel=kernel)
    sync(gen.device)
    t0 = time.perf_counter()
    seconds = decode_seconds_per_step(gen, batch, context, steps, runs)
    capacity = gen.cache.max_seq_len
    del gen
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"seconds": seconds, "capacity": capacity, "wall_s": time.perf_counter() - t0}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama-3.1-8b", choices=sorted(PRESETS))
    parser.add_argument("--rows", default="1x128,1x8000,1x32000,1x127000,8x8000",
                        help="batch x prompt tokens, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--masked-max-steps", type=int, default=30,
                        help="fewer timed steps for the masked path where it is slow (contexts over 64k)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks that the script runs")
    args = parser.parse_args()

    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    rows = [tuple(int(x) for x in r.split("x")) for r in args.rows.split(",")]
    if args.dry_run:
        rows, args.new_tokens, args.runs = [(1, 40), (3, 300)], 4, 1
    ceiling = ceilings(device, 0.25 if args.dry_run else 4)
    read_bps = ceiling["read_tbps"] * 1e12
    config = TINY if args.dry_run else PRESETS[args.arch]
    model = build_random(config, device, dtype)
    log(f"built {args.arch if not args.dry_run else 'tiny'}; read ceiling {ceiling['read_tbps']:.2f} TB/s")

    results = []
    for batch, context in rows:
        live = context + args.new_tokens / 2
        moved = bytes_per_token(model, live, batch)
        row = {"batch": batch, "context": context, "bytes_per_step": moved}
        for kernel in (False, True):
            name = "kernel" if kernel else "masked"
            steps = args.new_tokens if kernel or context <= 65536 else min(args.new_tokens, args.masked_max_steps)
            m = measure(model, batch, context, steps, args.runs, kernel)
            m["tokens_per_s"] = 1 / m["seconds"]
            m["pct_of_read"] = 100 * moved / m["seconds"] / read_bps
            row[name] = m
            log(f"batch {batch} context {context} {name}: {1000 * m['seconds']:.2f} ms/step, "
                f"{m['pct_of_read']:.0f}% of read (cache capacity {m['capacity']}, {m['wall_s']:.0f} s with prefill)")
        results.append(row)

    print(f"\n{args.arch if not args.dry_run else 'tiny'} {str(dtype).split('.')[-1]}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{date.today()}; streaming read {ceiling['read_tbps']:.2f} TB/s; {args.new_tokens} new tokens, "
          f"median of {args.runs}\n")
    print("| batch | context | GB read per step | masked: tokens/s per seq | % of read | "
          "kernel: tokens/s per seq | % of read | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        m, k = r["masked"], r["kernel"]
        print(f"| {r['batch']} | {r['context']} | {r['bytes_per_step'] / 1e9:.1f} | {m['tokens_per_s']:.1f} | "
              f"{m['pct_of_read']:.0f}% | {k['tokens_per_s']:.1f} | {k['pct_of_read']:.0f}% | "
              f"{m['seconds'] / k['seconds']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": date.today().isoformat(), "torch": torch.__version__, **ceiling, "rows": results}, f,
                      indent=2)


if __name__ == "__main__":
    main()
