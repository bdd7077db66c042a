"""The benchmark behind `blitzgen bench`: the figures that matter, measured in one run.

Decode at batch 1 reads every weight once per token, so the figure of merit is achieved bytes
per second against what the device can read: every run measures its own ceilings (a streaming
read and a device-to-device copy) and reports decode as tokens/s, GB/s and % of the read ceiling.
Bytes per token = every weight the step reads (all linears, norms; the embedding only if tied to
the output projection) + the K/V bytes of the live prefix.

Phases: ceilings; build (random weights of a named real architecture, made on the device) or load
(a checkpoint); cold start = build/load + compile + CUDA-graph capture + first token; time to first
token at several prompt lengths; decode (CUDA events around N graph replays, prefill excluded;
median of runs) per batch size, and the same through the streaming API; the "GEMV roof": the
step's weight matmuls alone as cuBLAS calls replayed in one CUDA graph, i.e. what plain matrix
products of these shapes allow before attention, norms and sampling; optionally the same decode
uncompiled (--compare-eager).
"""

import argparse
import ast
import contextlib
import dataclasses
import gc
import importlib
import json
import statistics
import time
from datetime import date

import torch
import torch.nn.functional as F
from tqdm import tqdm

from torch._dynamo.utils import counters as compile_counters

from blitzgen.checkpoint import load_model
from blitzgen.config import PRESETS, ModelConfig
from blitzgen.errors import BlitzgenError
from blitzgen.generate import DEFAULT_MODEL, DTYPES, Generator, resolve_device
from blitzgen.model import Transformer
from blitzgen.sampling import SamplingParams, params_to_tensors


class NullTokenizer:
    """Enough of a tokenizer to drive the Generator with token ids only (random-weight models)."""

    eos_ids = frozenset()
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        raise BlitzgenError("this benchmark model has no tokenizer; pass token ids")

    def decode(self, ids, skip_special_tokens=False):
        return ""


class Timer:
    """Elapsed seconds between start() and stop(): CUDA events on a GPU, the wall clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return self.begin.elapsed_time(self.end) / 1000
        return time.perf_counter() - self.t0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ceilings(device: torch.device, gib: float) -> dict[str, float]:
    """Streaming-read and copy bandwidth in TB/s, best of several timed passes."""
    n = int(gib * 2**30) // 2
    x = torch.ones(n, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    timer, out = Timer(device), {}
    for name, fn, moved in [("read", lambda: x.sum(), x.nbytes), ("copy", lambda: y.copy_(x), 2 * x.nbytes)]:
        fn()
        best = float("inf")
        for _ in range(5):
            timer.start()
            fn()
            best = min(best, timer.stop())
        out[f"{name}_tbps"] = moved / best / 1e12
    del x, y
    return out


def build_random(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A Transformer of `config` with random weights made directly on `device` (no host copy)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def bytes_per_token(model: Transformer, live_kv_tokens: float, batch_size: int) -> float:
    """Bytes one decode step reads: weights once (shared by the batch) + each sequence's live K/V."""
    c = model.config
    embedding = model.tok_embeddings.weight
    # Parameters and buffers: quantized linears keep their packed weights and scales as buffers.
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    weights = sum(t.nbytes for name, t in tensors if name not in ("tok_embeddings.weight", "inv_freq"))
    if getattr(model.output, "weight", None) is embedding:
        weights += embedding.nbytes  # tied: the output projection reads the whole embedding
    kv = 2 * c.n_layers * c.n_kv_heads * c.head_dim * embedding.element_size() * live_kv_tokens * batch_size
    return weights + kv


def gemv_roof(model: Transformer, batch_size: int, device: torch.device, iters: int) -> float | None:
    """Seconds for the step's weight matmuls alone (fused qkv, o, gate/up, down per layer, output) as
    plain cuBLAS products; None for a quantized model, whose products are not plain ones."""
    linears = [m for layer in model.layers for m in (layer.attention.wqkv, layer.attention.wo,
                                                     layer.feed_forward.w13, layer.feed_forward.w2)]
    linears.append(model.output)
    if not all(type(m) is torch.nn.Linear for m in linears):
        return None
    weights = [m.weight for m in linears]
    inputs = [torch.randn(batch_size, w.shape[1], dtype=w.dtype, device=device) for w in weights]

    def run():
        for x, w in zip(inputs, weights):
            F.linear(x, w)

    timer = Timer(device)
    if device.type == "cuda":
        run()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        run = graph.replay
    run()
    timer.start()
    for _ in range(iters):
        run()
    return timer.stop() / iters


def prepare_decode(gen: Generator, batch_size: int, prompt_len: int, steps: int,
                   sampling: SamplingParams | None = None):
    """Prefill `batch_size` random prompts of `prompt_len` tokens and return the built (compiled,
    captured) decode step, with cache room for `steps` more tokens and a warm-up: greedy, or the step
    that generate() would run for every row sampled with `sampling` (seed 0)."""
    vocab = gen.config.vocab_size
    prompts = [torch.randint(1, vocab, (prompt_len,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(batch_size)]
    gen._ensure_cache(batch_size, prompt_len + steps + 8)
    for i, prompt in enumerate(prompts):
        gen.prefill(i, prompt)
    if sampling is None or sampling.greedy:
        return gen._step(greedy=True)
    step = gen._step(greedy=False, sort=sampling.sorts)
    for name, t in params_to_tensors([dataclasses.replace(sampling, seed=0)], gen.device).items():
        step.sampling[name].fill_(t[0])
    return step


def time_steps(gen: Generator, step, batch_size: int, prompt_len: int, steps: int) -> float:
    """Seconds per decode step of a prepared step over `steps` steps from `prompt_len` live tokens."""
    timer = Timer(gen.device)
    gen.cache.lengths[:batch_size] = prompt_len
    kv_len = prompt_len
    step.run(kv_len + 1)  # not timed: first replay after a reset
    timer.start()
    for _ in range(steps):
        kv_len += 1
        step.run(kv_len + 1)
    return timer.stop() / steps


def decode_seconds_per_step(gen: Generator, batch_size: int, prompt_len: int, steps: int, runs: int,
                            sampling: SamplingParams | None = None) -> float:
    """Median over runs of the time per decode step, prefill excluded, host streaming excluded."""
    step = prepare_decode(gen, batch_size, prompt_len, steps, sampling)
    times = [time_steps(gen, step, batch_size, prompt_len, steps) for _ in range(runs)]
    gen.reset()
    return statistics.median(times)


# bench --variants: what each named variant changes in the Generator; "a+b" applies both;
# "inductor:KEY=VALUE" adds one torch.compile option; "set:MODULE.NAME=VALUE" sets a module constant of
# blitzgen (e.g. set:kernels.decode_attention.NUM_WARPS=4) while that variant compiles and captures, so a
# kernel's tuning can be compared in one process. "base" is the command line's own settings.
VARIANTS = {
    "base": {},
    "rope-kernel": {"rope_kernel": True},
    "inductor-products": {"gemv_kernels": False},  # the one-row products as Inductor compiles them
    "combo-kernels": {"inductor_options": {"combo_kernels": True}},
}


def _split_top_level(text: str) -> list[str]:
    """Split at the commas outside brackets: 'a,set:m.X=(1, 2),b' -> ['a', 'set:m.X=(1, 2)', 'b']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def module_constant(text: str) -> tuple[str, str, object]:
    """'kernels.decode_attention.NUM_WARPS=4' -> ('kernels.decode_attention', 'NUM_WARPS', 4): an existing
    upper-case constant of a blitzgen module and a Python literal of the same type (an int may stand for a
    float). Anything else is a BlitzgenError."""
    target, eq, value_text = text.partition("=")
    module_name, _, name = target.strip().rpartition(".")
    if not eq or not module_name or not name:
        raise BlitzgenError(f"expected MODULE.NAME=VALUE, got {text!r}")
    try:
        module = importlib.import_module(f"blitzgen.{module_name}")
    except ImportError:
        raise BlitzgenError(f"no module blitzgen.{module_name}") from None
    if not name.isupper() or not hasattr(module, name):
        raise BlitzgenError(f"blitzgen.{module_name} has no constant {name}")
    try:
        value = ast.literal_eval(value_text.strip())
    except (ValueError, SyntaxError):
        raise BlitzgenError(f"{value_text.strip()!r} is not a Python literal") from None
    old = getattr(module, name)
    if type(value) is not type(old) and not (isinstance(old, float) and type(value) is int):
        raise BlitzgenError(f"blitzgen.{module_name}.{name} holds {type(old).__name__} values, got {value!r}")
    return module_name, name, value


@contextlib.contextmanager
def module_constants(constants: dict[tuple[str, str], object]):
    """Set blitzgen module constants {(module, NAME): value} inside the block, restore them after. While any is
    set, Inductor's and AOTAutograd's caches are off: a constant read where a traced kernel's launcher runs
    becomes part of the compiled code without being part of the cache key."""
    with contextlib.ExitStack() as stack:  # undoes everything below in reverse order, on errors too
        if constants:
            import torch._functorch.config
            import torch._inductor.config

            stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
            stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
        for (module_name, name), value in constants.items():
            module = importlib.import_module(f"blitzgen.{module_name}")
            stack.callback(setattr, module, name, getattr(module, name))
            setattr(module, name, value)
        yield


def parse_variants(text: str) -> list[tuple[str, dict]]:
    """'base,rope-kernel+combo-kernels' -> [(name, Generator settings)]; unknown names are a BlitzgenError.
    Module constants (set:...) come back under the key "constants", {(module, NAME): value}."""
    from blitzgen.cli import inductor_option

    out = []
    for name in filter(None, (part.strip() for part in _split_top_level(text))):
        settings = {}
        for piece in name.split("+"):
            if piece.startswith("set:"):
                try:
                    module_name, constant, value = module_constant(piece.removeprefix("set:"))
                except BlitzgenError as error:
                    raise BlitzgenError(f"--variants: {piece!r}: {error}") from None
                changes = {"constants": {(module_name, constant): value}}
            elif piece.startswith("inductor:"):
                try:
                    key, value = inductor_option(piece.removeprefix("inductor:"))
                except argparse.ArgumentTypeError as error:
                    raise BlitzgenError(f"--variants: {piece!r}: {error}") from None
                changes = {"inductor_options": {key: value}}
            elif piece in VARIANTS:
                changes = VARIANTS[piece]
            else:
                raise BlitzgenError(f"--variants: unknown variant {piece!r}; expected {', '.join(VARIANTS)}, "
                                    "inductor:KEY=VALUE, set:MODULE.NAME=VALUE, or several joined by '+'")
            for key, value in changes.items():
                settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
        out.append((name, settings))
    return out


def compare_variants(make_generator, variants: list[tuple[str, dict]], prompt_len: int, steps: int,
                     runs: int, batch: int = 1, sampling: SamplingParams | None = None) -> list[dict]:
    """Decode of each variant at `batch` sequences in this one process, the runs interleaved (A B C A B C
    ...), so that a difference between variants is not one between processes or machines (on an H200 the
    same code measured 3.99-4.26 ms a step across processes). At batch 1 also each variant's kernel totals."""
    built = []
    for name, settings in variants:
        settings = dict(settings)
        with module_constants(settings.pop("constants", {})):  # set while the step compiles and is captured
            gen = make_generator(**settings)
            built.append((name, gen, prepare_decode(gen, batch, prompt_len, steps, sampling)))
    times = [[] for _ in built]  # by position: a name may repeat ("base,base" times two captures)
    for _ in range(runs):
        for i, (_, gen, step) in enumerate(built):
            times[i].append(time_steps(gen, step, batch, prompt_len, steps))
    rows = []
    for (name, gen, _), runs_s in zip(built, times):
        seconds = statistics.median(runs_s)
        row = {"variant": name, "batch": batch, "step_ms": 1000 * seconds, "tokens_per_s": 1 / seconds,
               "runs_ms": [1000 * t for t in runs_s], "kernel_us_per_step": None, "launches_per_step": None}
        if batch == 1:  # profile_step replays the batch-1 step captured above
            _, totals = profile_step(gen, prompt_len, steps=10, sampling=sampling)
            row.update(kernel_us_per_step=totals["us_per_step"], launches_per_step=totals["launches_per_step"])
        rows.append(row)
    return rows


def profile_step(gen: Generator, prompt_len: int, steps: int, top: int = 15,
                 sampling: SamplingParams | None = None) -> tuple[list[dict], dict]:
    """Where a batch-1 decode step's time goes: the kernels (CUDA) or operators (CPU) of `steps`
    replayed steps, by total time, as time per step and share of the step; and the totals over all
    of them (time and launches per step), which a step time above their time says is spent between
    kernels."""
    from torch.profiler import ProfilerActivity, profile

    step = prepare_decode(gen, 1, prompt_len, steps + 1, sampling)
    step.run(prompt_len + 1)  # not profiled: the first run after building
    cuda = gen.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step.run(prompt_len + i + 2)
        sync(gen.device)
    gen.reset()
    time_of = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = sorted((e for e in prof.key_averages() if time_of(e) > 0), key=time_of, reverse=True)
    total = sum(time_of(e) for e in events) or 1
    rows = [{"name": e.key[:80], "calls_per_step": e.count / steps, "us_per_step": time_of(e) / steps,
             "share": 100 * time_of(e) / total} for e in events[:top]]
    return rows, {"us_per_step": total / steps, "launches_per_step": sum(e.count for e in events) / steps}


def cache_counts() -> dict[str, int]:
    """What the compile caches did since compile_counters.clear(): FX graph and AOTAutograd cache hits
    and misses, and how many kernel configurations Inductor benchmarked (autotuning, coordinate
    descent): a warm start should hit every cache and benchmark nothing."""
    inductor, aot = compile_counters["inductor"], compile_counters["aot_autograd"]
    return {
        "fx_graph_hits": inductor["fxgraph_cache_hit"],
        "fx_graph_misses": inductor["fxgraph_cache_miss"],
        "aot_autograd_hits": aot["autograd_cache_hit"],
        "aot_autograd_misses": aot["autograd_cache_miss"],
        "configs_benchmarked": sum(n for key, n in inductor.items() if key.startswith("benchmarking."))
        + inductor["coordesc_tuning_bench"],
    }


def run(args) -> dict:
    """Measure everything `args` asks for; returns the results as a JSON-ready dict."""
    device = resolve_device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if dtype_name not in DTYPES:
        raise BlitzgenError(f"--dtype {dtype_name!r}: expected one of {', '.join(DTYPES)}")
    dtype = DTYPES[dtype_name]
    if args.arch and args.model:
        raise BlitzgenError("give --model or --arch, not both")
    if args.arch and args.arch not in PRESETS:
        raise BlitzgenError(f"--arch {args.arch!r}: expected one of {', '.join(PRESETS)}")
    if args.quantize not in (None, "int8", "int4"):
        raise BlitzgenError(f"--quantize {args.quantize!r}: expected int8 or int4")
    batch_sizes = sorted(set(args.batch_size or [1]))
    if any(b < 1 for b in batch_sizes) or args.new_tokens < 2 or args.runs < 1:
        raise BlitzgenError("--batch-size, --runs must be >= 1 and --new-tokens >= 2")
    # A bad value fails here, before the model is built.
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=0)
    variants = parse_variants(args.variants) if args.variants else []
    phases = (4 + len(batch_sizes) * (2 + bool(args.compare_eager)) + len(args.prompt_lengths) + bool(args.profile)
              + bool(variants))
    # The bar closes (and clears) before any error is printed: `with`, and leave=False.
    with tqdm(total=phases, desc="bench", unit="phase", leave=False) as progress:

        def phase(name):
            # Generators hold reference cycles (a captured step refers back to its generator): collect
            # them so each phase starts with only the model in device memory.
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                name += f" ({torch.cuda.memory_allocated(device) / 1e9:.1f} GB in use)"
            progress.set_postfix_str(name)

        res = {
            "date": date.today().isoformat(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "dtype": dtype_name,
            "model": args.arch or str(args.model or DEFAULT_MODEL),
            "quantize": args.quantize,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "rope_kernel": args.rope_kernel,
            "inductor_options": dict(args.inductor or []),
        }
        phase("ceilings")
        res.update(ceilings(device, args.ceiling_gib))
        read_bps = res["read_tbps"] * 1e12
        progress.update()

        phase("build" if args.arch else "load")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        if args.arch:
            model = build_random(PRESETS[args.arch], device, dtype)
        else:
            model = load_model(args.model or DEFAULT_MODEL, device=device, dtype=dtype)
        if args.quantize:
            from blitzgen.quantize import quantize_model  # imports Triton: only when asked

            quantize_model(model, args.quantize)
        sync(device)
        res["load_s"] = time.perf_counter() - t0
        config = model.config
        res["weights_gb"] = bytes_per_token(model, 0, 1) / 1e9
        progress.update()

        def generator(compile=True, rope_kernel=args.rope_kernel, inductor_options=None, gemv_kernels=None):
            gen = Generator(model, NullTokenizer(), compile=compile,
                            attention_kernel=False if args.masked_attention else None,
                            rope_kernel=rope_kernel, gemv_kernels=gemv_kernels)
            if args.compile_scope:
                gen.compile_scope = args.compile_scope
            gen.inductor_options = {**dict(args.inductor or []), **(inductor_options or {})}
            return gen

        phase("cold start: compile + capture")
        gen = generator()
        prompt = list(range(1, args.prompt_len + 1))
        params = dataclasses.replace(sampling, max_new_tokens=args.new_tokens, ignore_eos=True)
        compile_counters.clear()
        t1 = time.perf_counter()
        events = gen.stream([prompt], params)
        next(events)  # first token: compile + capture happen before it
        res["compile_s"] = time.perf_counter() - t1
        res["compile_caches"] = cache_counts()
        res["cold_start_s"] = res["load_s"] + res["compile_s"]
        for _ in events:
            pass
        progress.update()

        phase("time to first token")
        res["ttft_ms"] = {}
        for length in args.prompt_lengths:
            if length + 1 > min(config.max_seq_len, args.max_context):
                res["ttft_ms"][str(length)] = None
            else:
                ttft = generator(compile=False)  # prefill is never compiled; a small cache of its own
                ids = torch.randint(1, config.vocab_size, (length,)).tolist()
                one = SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True)
                times = []
                for _ in range(args.runs + 1):
                    ttft.reset()
                    ttft.generate([ids], one)
                    times.append(ttft.last_stats.time_to_first_token)
                res["ttft_ms"][str(length)] = 1000 * statistics.median(times[1:])
                del ttft
            progress.update()

        res["decode"], res["eager"] = [], []
        for b in batch_sizes:
            phase(f"decode batch {b}")
            gen = generator()
            seconds = decode_seconds_per_step(gen, b, args.prompt_len, args.new_tokens, args.runs, sampling)
            live = args.prompt_len + args.new_tokens / 2
            moved = bytes_per_token(model, live, b)
            row = {"batch": b, "step_ms": 1000 * seconds, "tokens_per_s": 1 / seconds, "total_tokens_per_s": b / seconds,
                   "gbps": moved / seconds / 1e9, "pct_of_read": 100 * moved / seconds / read_bps}
            progress.update()
            phase(f"end-to-end batch {b}")
            prompts = [list(range(1 + i, args.prompt_len + 1 + i)) for i in range(b)]
            e2e = []
            for _ in range(args.runs):
                gen.reset()
                gen.generate(prompts, params)
                e2e.append(gen.last_stats.decode_tokens_per_second / b)
            row["stream_tokens_per_s"] = statistics.median(e2e)
            roof = gemv_roof(model, b, device, iters=max(3, args.new_tokens // 4))
            weights_only = bytes_per_token(model, 0, b)
            row["roof_tokens_per_s"] = None if roof is None else 1 / roof
            row["roof_pct_of_read"] = None if roof is None else 100 * weights_only / roof / read_bps
            res["decode"].append(row)
            del gen
            progress.update()
            if args.compare_eager:
                phase(f"eager batch {b}")
                seconds = decode_seconds_per_step(generator(compile=False), b, args.prompt_len,
                                                  max(2, args.new_tokens // 4), args.runs, sampling)
                res["eager"].append({"batch": b, "tokens_per_s": 1 / seconds,
                                     "pct_of_read": 100 * moved / seconds / read_bps})
                progress.update()
        if args.profile:
            phase("profile")
            res["profile"], res["profile_totals"] = profile_step(generator(), args.prompt_len, steps=20,
                                                                 sampling=sampling)
        progress.update(bool(args.profile))
        res["variants"] = []
        for b in batch_sizes if variants else []:
            phase(f"variants, batch {b}")
            rows = compare_variants(generator, variants, args.prompt_len, args.new_tokens, max(args.runs, 3), b,
                                    sampling)
            for row in rows:
                row["vs_first"] = rows[0]["step_ms"] / row["step_ms"]
            res["variants"] += rows
        progress.update(bool(variants))
        res["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        return res


def format_table(res: dict) -> str:
    lines = [
        f"{res['model']} ({res['weights_gb']:.2f} GB of weights, {res['dtype']}"
        + (f", quantized {res['quantize']}" if res.get("quantize") else "") + f") on {res['device']}, "
        f"torch {res['torch']}, {res['date']}"
        + (", RoPE + cache-write kernel" if res.get("rope_kernel") else "")
        + (f", sampled at temperature {res['temperature']:g}" if res.get("temperature") else "")
        + (f" with top-k {res['top_k']}" if res.get("temperature") and res.get("top_k") else "")
        + (f" with top-p {res['top_p']:g}" if res.get("temperature") and res.get("top_p", 1) < 1 else "")
        + "".join(f", {k}={v}" for k, v in res.get("inductor_options", {}).items()),
        f"ceilings: streaming read {res['read_tbps']:.2f} TB/s, copy {res['copy_tbps']:.2f} TB/s",
        f"load {res['load_s']:.1f} s; compile + capture + first token {res['compile_s']:.1f} s; "
        f"cold start {res['cold_start_s']:.1f} s"
        + (f"; peak memory {res['peak_memory_gb']:.1f} GB" if res["peak_memory_gb"] else ""),
        "time to first token: "
        + ", ".join(f"{k} tokens {v:.1f} ms" if v is not None else f"{k} tokens: beyond the context"
                    for k, v in res["ttft_ms"].items()),
        "",
        "| batch | step ms | tokens/s per seq | total tokens/s | GB/s | % of read | streamed tokens/s per seq "
        "| GEMV roof tokens/s | roof % of read |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if any(res.get("compile_caches", {}).values()):
        lines.insert(3, "compile caches: FX graph {fx_graph_hits} hits / {fx_graph_misses} misses, AOTAutograd "
                     "{aot_autograd_hits} / {aot_autograd_misses}; kernel configurations benchmarked "
                     "{configs_benchmarked}".format(**res["compile_caches"]))
    for r in res["decode"]:
        lines.append(
            f"| {r['batch']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.1f} | {r['total_tokens_per_s']:.0f} | "
            f"{r['gbps']:.0f} | {r['pct_of_read']:.0f}% | {r['stream_tokens_per_s']:.1f} | "
            + (f"{r['roof_tokens_per_s']:.1f} | {r['roof_pct_of_read']:.0f}% |" if r["roof_tokens_per_s"]
               else "n/a (quantized) | |")
        )
    if res.get("profile"):
        lines += ["", "| kernel (batch 1 decode step) | calls per step | us per step | share |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['calls_per_step']:g} | {r['us_per_step']:.1f} | {r['share']:.1f}% |"
                  for r in res["profile"]]
        totals, step_us = res["profile_totals"], 1000 * res["decode"][0]["step_ms"]
        lines.append(f"all kernels: {totals['us_per_step']:.0f} us and {totals['launches_per_step']:.0f} launches "
                     f"per step; the timed batch-{res['decode'][0]['batch']} step: {step_us:.0f} us")
        if totals["us_per_step"] > step_us:
            lines.append("(more than the step: the one-row GEMV kernels launch as programmatic dependents on this "
                         "GPU, so each starts during the previous kernel and its time includes that wait)")
    for r in res["eager"]:
        lines.append(f"eager (uncompiled, no CUDA graph), batch {r['batch']}: {r['tokens_per_s']:.1f} tokens/s "
                     f"per sequence, {r['pct_of_read']:.0f}% of read")
    if res.get("variants"):
        lines += ["", "| variant (one process, runs interleaved) | batch | step ms | tokens/s per seq | speed vs first "
                  "| all kernels us per step | launches per step | each run, ms |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['batch']} | {r['step_ms']:.3f} | {r['tokens_per_s']:.1f} | "
                  f"{r['vs_first']:.3f}x | "
                  + ("- | - | " if r["kernel_us_per_step"] is None else
                     f"{r['kernel_us_per_step']:.0f} | {r['launches_per_step']:.0f} | ")
                  + ", ".join(f"{t:.3f}" for t in r["runs_ms"]) + " |" for r in res["variants"]]
    return "\n".join(lines)


def main(args):
    res = run(args)
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
