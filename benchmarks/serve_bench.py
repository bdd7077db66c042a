"""Throughput and latency of `blitzgen serve` under N concurrent streams.

Starts the server in a child process (so the load generator here never competes with the engine
for the GIL), waits for /health, then for each concurrency N runs N streams at once; each stream
sends --requests-per-stream streaming completions one after the other. Prompts are random token
ids (distinct per request, so no request reuses another's cached prefix), greedy, ignore_eos, so
every request generates exactly --output-len tokens.

Reported per N: aggregate generated tokens/s (all tokens / wall time from the first request sent to
the last response done), tokens/s per stream, time to first token (request sent -> first token's
chunk) and inter-token latency (gaps between a stream's token chunks), median and p99.

    python benchmarks/serve_bench.py                                   # default model on CPU
    python benchmarks/serve_bench.py --arch llama-3.1-8b --device cuda --concurrency 1,8,32,64 \\
        --prompt-len 512 --output-len 256 --max-seq-len 1024

With --arch (random weights, no tokenizer) each token chunk is asked for with logprobs=0, since
its text is empty; with a real tokenizer a chunk carries each token's text.
"""

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from datetime import date

import httpx


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default: the built-in model)")
    p.add_argument("--arch", help="random weights of a real architecture (see `blitzgen bench --help`)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--max-seq-len", type=int, default=None, help="slot size (default: the model's context)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated stream counts (default 1,8,32)")
    p.add_argument("--max-batch-size", type=int, default=None, help="server slots (default: the largest N)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--requests-per-stream", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="untimed requests first (compilation, caches)")
    p.add_argument("--prefill", choices=["auto", "together", "one-by-one"], default="auto",
                   help="how the engine prefills the new requests of a step boundary (auto: together on CUDA)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child process
    return p.parse_args(argv)


# ---- the server (child process) -------------------------------------------------------------------
def serve(args):
    import uvicorn

    import blitzgen
    from blitzgen.server import create_app

    if args.arch:
        import torch

        from blitzgen.bench import NullTokenizer, build_random
        from blitzgen.config import PRESETS
        from blitzgen.generate import DTYPES, Generator, resolve_device

        device = resolve_device(args.device)
        dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
        with torch.no_grad():
            model = build_random(PRESETS[args.arch], device, dtype)
        generator = Generator(model, NullTokenizer(), compile=args.compile, max_seq_len=args.max_seq_len)
    else:
        generator = blitzgen.load(args.model, device=args.device, dtype=args.dtype, compile=args.compile,
                                  max_seq_len=args.max_seq_len)
    app = create_app(generator, model_name="bench", max_batch_size=args.max_batch_size, max_queue=4096,
                     max_logprobs=1)
    if args.prefill != "auto":
        app.state.engine.batch_prefill = args.prefill == "together"
    print(json.dumps({"context": generator.context, "vocab_size": generator.config.vocab_size,
                      "device": str(generator.device)}), flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


# ---- the load (this process) ----------------------------------------------------------------------
def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


async def one_request(client, prompt, args, random_weights):
    body = {"model": "bench", "prompt": prompt, "max_tokens": args.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if random_weights:
        body["logprobs"] = 0
    sent = time.perf_counter()
    arrivals, tokens = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"]:
                arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": arrivals[0] - sent, "itl": [b - a for a, b in zip(arrivals, arrivals[1:])], "tokens": tokens,
            "chunks": len(arrivals)}


async def run_level(url, n, args, vocab_size, random_weights, rng):
    prompts = [[rng.randrange(1, vocab_size) for _ in range(args.prompt_len)]
               for _ in range(n * args.requests_per_stream)]
    async with httpx.AsyncClient(base_url=url, timeout=3600,
                                 limits=httpx.Limits(max_connections=n + 4)) as client:
        async def stream(i):
            return [await one_request(client, prompts[i * args.requests_per_stream + j], args, random_weights)
                    for j in range(args.requests_per_stream)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(stream(i) for i in range(n))) for r in rs]
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    return {"concurrency": n, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "tokens_per_s_per_stream": tokens / wall / n,
            "ttft_median_ms": 1000 * statistics.median(ttft), "ttft_p99_ms": 1000 * percentile(ttft, 99),
            "itl_median_ms": 1000 * statistics.median(itl), "itl_p99_ms": 1000 * percentile(itl, 99)}


def main(argv=None):
    args = parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    args.max_batch_size = args.max_batch_size or max(levels)
    if args.serve:
        return serve(args)
    if not args.port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
    child_argv = [sys.executable, __file__, "--serve", "--port", str(args.port),
                  "--max-batch-size", str(args.max_batch_size), "--prefill", args.prefill]
    for name in ("model", "arch", "device", "dtype", "max_seq_len"):
        if getattr(args, name) is not None:
            child_argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.compile is not None:
        child_argv.append("--compile" if args.compile else "--no-compile")
    child = subprocess.Popen(child_argv, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(child.stdout.readline())
        url = f"http://127.0.0.1:{args.port}"
        deadline = time.monotonic() + 3600
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if child.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        rng = random.Random(0)
        random_weights = args.arch is not None
        for _ in range(args.warmup):
            asyncio.run(run_level(url, 1, argparse.Namespace(**{**vars(args), "requests_per_stream": 1}),
                                  info["vocab_size"], random_weights, rng))
        import torch

        results = {"date": str(date.today()), "command": " ".join(sys.argv), "torch": torch.__version__,
                   "device": info["device"], "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                   "model": args.arch or args.model or "default", "prompt_len": args.prompt_len,
                   "output_len": args.output_len, "max_batch_size": args.max_batch_size, "levels": []}
        print("| streams | requests | tokens | wall s | tokens/s | tokens/s per stream | TTFT median / p99 ms "
              "| ITL median / p99 ms |")
        print("|---|---|---|---|---|---|---|---|")
        for n in levels:
            r = asyncio.run(run_level(url, n, args, info["vocab_size"], random_weights, rng))
            results["levels"].append(r)
            print(f"| {n} | {r['requests']} | {r['tokens']} | {r['wall_s']:.2f} | {r['tokens_per_s']:.1f} | "
                  f"{r['tokens_per_s_per_stream']:.1f} | {r['ttft_median_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
                  f"{r['itl_median_ms']:.1f} / {r['itl_p99_ms']:.1f} |", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        child.terminate()
        child.wait(60)


if __name__ == "__main__":
    main()
