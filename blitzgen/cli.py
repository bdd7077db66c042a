"""The `blitzgen` command: parse, validate, call the Generator, format. Nothing else lives here.

User mistakes (bad paths, values, configs) print one line `blitzgen: error: ...` and exit 2,
never a traceback.
"""

import argparse
import sys
import time
from pathlib import Path

from blitzgen.errors import BlitzgenError
from blitzgen.sampling import SamplingParams


def _add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", help="Hugging Face checkpoint directory (default: the small model shipped inside blitzgen)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="weight dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step, CUDA-graphed on GPU (default: on for cuda, off for cpu)")
    p.add_argument("--max-seq-len", type=int, help="cap on prompt + generated tokens (default: the model's context)")
    p.add_argument("--quantize", help="int8 | int4 (group size 128): quantize the weights at load "
                                      "(a checkpoint written by `blitzgen quantize` needs no flag)")


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int):
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    p.add_argument("--seed", type=int, help="same seed, same text")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")


def _sampling_params(args) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def _load(args):
    from blitzgen.generate import load

    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise BlitzgenError(f"--max-seq-len {args.max_seq_len}: expected at least 2")
    t0 = time.perf_counter()
    print(f"Loading {args.model or 'the default model'} ...", file=sys.stderr, flush=True)
    generator = load(args.model, device=args.device, dtype=args.dtype, compile=args.compile,
                     max_seq_len=args.max_seq_len, quantize=args.quantize)
    c = generator.config
    print(f"Loaded {c.model_type} ({c.n_layers} layers, width {c.dim}, context {generator.context}) on "
          f"{generator.device} in {str(generator.dtype).removeprefix('torch.')} in {time.perf_counter() - t0:.2f} s"
          + (" ; the first decode step compiles" if generator.compile else ""), file=sys.stderr, flush=True)
    return generator


def _print_stats(stats):
    print(
        f"[prompt tokens {stats.prompt_tokens}, new tokens {stats.new_tokens}, "
        f"time to first token {stats.time_to_first_token * 1000:.0f} ms, "
        f"{stats.decode_tokens_per_second:.1f} tokens/s]",
        file=sys.stderr,
        flush=True,
    )


def cmd_generate(args):
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise BlitzgenError(f"--prompt-file {path}: no such file")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise BlitzgenError("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE")
    params = _sampling_params(args)
    generator = _load(args)
    if len(prompts) == 1:
        # One prompt streams as it is generated, after the prompt itself.
        sys.stdout.write(prompts[0])
        for event in generator.stream(prompts, params, truncate=args.truncate):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        # A batch generates together; each completion prints once finished, in prompt order.
        for i, c in enumerate(generator.generate(prompts, params, truncate=args.truncate)):
            print(f"--- [{i}] finish: {c.finish_reason}\n{prompts[i]}{c.text}")
    _print_stats(generator.last_stats)


def cmd_chat(args):
    from blitzgen.chat import ChatSession

    params = _sampling_params(args)
    session = ChatSession(_load(args), params, system=args.system)
    mode = "chat template" if session.templated else "no chat template: raw text continuation"
    print(f"Chat ({mode}). /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        try:
            for piece in session.send(line):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except BlitzgenError as e:
            print(f"\nblitzgen: error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            print("\n(interrupted)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        if args.stats:
            _print_stats(session.generator.last_stats)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def inductor_option(text: str) -> tuple[str, object]:
    """KEY=VALUE for torch.compile's options; VALUE true / false / an integer / a float / text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for parse in (int, float):
        try:
            return key, parse(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def cmd_bench(args):
    import torch

    from blitzgen import bench

    if args.attention:
        if not torch.cuda.is_available():
            raise BlitzgenError("bench --attention needs a CUDA GPU "
                                "(`python -m blitzgen.attention_bench --dry-run` checks it on a CPU)")
        from blitzgen import attention_bench

        attention_bench.main(["--batches", ",".join(map(str, args.batch_size or [1, 8]))])
        return

    if args.ceiling_gib is None:
        args.ceiling_gib = 0.25 if args.device == "cpu" or not torch.cuda.is_available() else 4.0
    bench.main(args)


def cmd_serve(args):
    import os

    for name, low in (("max_batch_size", 1), ("max_queue", 0), ("max_prefill_tokens", 1), ("max_body_bytes", 1024),
                      ("max_logprobs", 0)):
        if getattr(args, name) < low:
            raise BlitzgenError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected at least {low}")
    if not 0 <= args.port < 65536:
        raise BlitzgenError(f"--port {args.port}: expected 0 to 65535")
    api_key = args.api_key or os.environ.get("BLITZGEN_API_KEY") or None
    try:
        import uvicorn

        from blitzgen.server import create_app
    except ImportError as e:
        raise BlitzgenError(f"serve needs {e.name}: pip install 'blitzgen[serve]'") from None
    generator = _load(args)
    name = args.served_model_name or (Path(args.model).resolve().name if args.model else "blitzgen-default")
    try:
        app = create_app(generator, model_name=name, api_key=api_key, max_batch_size=args.max_batch_size,
                         max_queue=args.max_queue, max_prefill_tokens=args.max_prefill_tokens,
                         max_body_bytes=args.max_body_bytes, max_logprobs=args.max_logprobs)
    except __import__("torch").OutOfMemoryError:
        raise BlitzgenError(f"a KV cache of {args.max_batch_size} slots x {generator.context} tokens does not fit "
                            "in memory; lower --max-batch-size or --max-seq-len") from None
    print(f"Serving '{name}' at http://{args.host}:{args.port}/v1 with {args.max_batch_size} slots of "
          f"{generator.context} tokens" + (", API key required" if api_key else ""), file=sys.stderr, flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {args.host} without an API key (--api-key or BLITZGEN_API_KEY)",
              file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


def cmd_quantize(args):
    from blitzgen.checkpoint import save_quantized
    from blitzgen.generate import DEFAULT_MODEL, load
    from blitzgen.quantize import check_mode, quantization_metadata, quantize_model

    group_size = check_mode(args.mode, args.group_size)
    gptq = args.mode == "int4-gptq"
    if not gptq and (args.calib or args.act_order):
        raise BlitzgenError("--calib and --act-order apply to --mode int4-gptq only")
    source = Path(args.model) if args.model else DEFAULT_MODEL
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BlitzgenError(f"--out {out}: exists and is not an empty directory; choose a new one")
    if gptq:
        from blitzgen.gptq import calibration_tokens, quantize_gptq, read_calibration_text

        text = read_calibration_text(args.calib)  # checked before the model loads
        if args.calib_samples < 1 or (args.calib_seq_len is not None and args.calib_seq_len < 2):
            raise BlitzgenError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
    t0 = time.perf_counter()
    generator = load(args.model, device=args.device, dtype=args.dtype, compile=False)
    model = generator.model
    if gptq:
        seq_len = args.calib_seq_len or min(2048, generator.context)
        tokens = calibration_tokens(generator.tokenizer, text, args.calib_samples, seq_len)
        how = quantize_gptq(model, tokens, group_size, act_order=args.act_order)
        how["calibration"] = str(args.calib) if args.calib else "blitzgen default (default_model/calib.txt.gz)"
    else:
        quantize_model(model, args.mode, group_size)
        how = {"method": "rtn"}
    section = {"mode": args.mode, **quantization_metadata(model), **how}
    save_quantized(model, source, out, section)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"Wrote {out} ({args.mode}{f' g{group_size}' if group_size else ''}, {size / 1e6:.1f} MB of weights) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def cmd_eval(args):
    from blitzgen.evaluate import perplexity

    path = Path(args.text)
    if not path.is_file():
        raise BlitzgenError(f"--text {path}: no such file")
    text = path.read_text(encoding="utf-8")
    generator = _load(args)
    result = perplexity(generator, text, context=args.context, stride=args.stride)
    print(f"tokens {result.tokens}, loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.2f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blitzgen", description="Fast LLM text generation in plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from one or more prompts")
    g.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    g.add_argument("--prompt-file", help="file with one prompt per line (generated together as a batch)")
    g.add_argument("--truncate", action="store_true",
                   help="drop the start of prompts that do not fit the context instead of failing")
    _add_model_args(g)
    _add_sampling_args(g, max_new_tokens=200)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat with the checkpoint's chat template")
    c.add_argument("--system", help="system prompt")
    c.add_argument("--stats", action="store_true", help="print speed after each reply")
    _add_model_args(c)
    _add_sampling_args(c, max_new_tokens=512)
    c.set_defaults(func=cmd_chat)

    b = sub.add_parser("bench", help="measure load, compile, time to first token and decode speed vs the bandwidth")
    b.add_argument("--model", help="checkpoint directory (default: the built-in model unless --arch is given)")
    b.add_argument("--arch", help="random weights of a real architecture, built on the device: "
                                  "llama-2-7b, llama-3.1-8b, mistral-7b, qwen2.5-7b")
    b.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    b.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    b.add_argument("--quantize", help="int8 | int4 (group size 128): quantize the weights after building / loading")
    b.add_argument("--batch-size", type=int, action="append", help="decode batch size (repeatable; default 1)")
    b.add_argument("--prompt-len", type=int, default=128, help="prompt length before the timed decode (default 128)")
    b.add_argument("--prompt-lengths", type=_int_list, default=[128, 1024, 4096],
                   help="prompt lengths for time to first token (default 128,1024,4096)")
    b.add_argument("--new-tokens", type=int, default=200, help="decode steps timed per run (default 200)")
    b.add_argument("--temperature", type=float, default=0.0,
                   help="decode sampled at this temperature (default 0: greedy); times the sampler's filters and "
                        "draw in every step")
    b.add_argument("--top-k", type=int, default=0, help="with --temperature: top-k of every row (default 0: off)")
    b.add_argument("--top-p", type=float, default=1.0,
                   help="with --temperature: top-p of every row (default 1: off); top-k or top-p sort the vocabulary "
                        "each step")
    b.add_argument("--runs", type=int, default=3, help="runs per figure; the median is reported (default 3)")
    b.add_argument("--compare-eager", action="store_true", help="also time the uncompiled decode step")
    b.add_argument("--profile", action="store_true", help="also list where a batch-1 decode step's time goes")
    b.add_argument("--attention", action="store_true",
                   help="instead: decode attention alone, every PyTorch path beside ours, at 1k-128k live tokens")
    b.add_argument("--masked-attention", action="store_true",
                   help="decode attention over the whole cache under a length mask (the plain-PyTorch twin "
                        "of the split-KV kernel, which is the default on CUDA), for comparison")
    b.add_argument("--rope-kernel", action="store_true",
                   help="RoPE and the K/V cache write as one Triton kernel in decode steps the GEMV kernels do not "
                        "take (several sequences; one sequence has them in the q/k/v product's epilogue)")
    b.add_argument("--variants", metavar="A,B+C,...",
                   help="also time decode of these variants at each --batch-size in this one process, runs "
                        "interleaved: base (the command line's settings), inductor-products (batch-1 products as "
                        "Inductor compiles them, not kernels/gemv.py), rope-kernel, combo-kernels, "
                        "inductor:KEY=VALUE, set:MODULE.NAME=VALUE (a blitzgen module constant while the variant "
                        "compiles, e.g. set:kernels.decode_attention.NUM_WARPS=4), or several joined by '+'")
    b.add_argument("--inductor", type=inductor_option, action="append", metavar="KEY=VALUE",
                   help="an extra torch.compile option for the decode step, e.g. combo_kernels=true (repeatable)")
    b.add_argument("--compile-scope", choices=["block", "step"], help="compile one shared block or the whole step")
    b.add_argument("--ceiling-gib", type=float, help="buffer size for the bandwidth ceilings (default 4 on cuda)")
    b.add_argument("--max-context", type=int, default=1 << 30, help="skip prompt lengths beyond this")
    b.add_argument("--json", help="also write the results to this JSON file")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="default 8000")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (default: $BLITZGEN_API_KEY)")
    s.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint folder's name)")
    s.add_argument("--max-batch-size", type=int, default=32, help="KV-cache slots decoding together (default 32)")
    s.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a slot; more get 429 with Retry-After (default 256)")
    s.add_argument("--max-prefill-tokens", type=int, default=4096,
                   help="prompt tokens prefilled between two decode steps (default 4096; one prompt always fits)")
    s.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413 (default 4 MiB)")
    s.add_argument("--max-logprobs", type=int, default=20,
                   help="most logprobs / top_logprobs a request may ask for; 0 turns them off (default 20)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_model_args(s)
    s.set_defaults(func=cmd_serve)

    q = sub.add_parser("quantize", help="write a weight-only int8 / int4 / GPTQ int4 checkpoint")
    q.add_argument("--model", help="Hugging Face checkpoint directory (default: the built-in model)")
    q.add_argument("--mode", required=True, help="int8 (per channel) | int4 (groups, round to nearest) | "
                                                 "int4-gptq (groups, calibrated)")
    q.add_argument("--group-size", type=int, help="int4 group size: 32, 64 or 128 (default 128)")
    q.add_argument("--out", required=True, help="new directory for the quantized checkpoint")
    q.add_argument("--calib", help="int4-gptq calibration text, plain or .gz (default: a sample of the "
                                   "built-in model's training text shipped with blitzgen)")
    q.add_argument("--calib-samples", type=int, default=128, help="int4-gptq: calibration windows (default 128)")
    q.add_argument("--calib-seq-len", type=int, help="int4-gptq: tokens per window (default min(2048, context))")
    q.add_argument("--act-order", action="store_true", help="int4-gptq: quantize columns by decreasing activation")
    q.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    q.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="dtype the model is loaded and run in (default: bf16 on cuda, fp32 on cpu)")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a text file, sliding window")
    e.add_argument("--text", required=True, help="UTF-8 text file to score")
    e.add_argument("--context", type=int, help="tokens per window (default: the model's context)")
    e.add_argument("--stride", type=int, help="tokens between window starts (default: --context, no overlap)")
    _add_model_args(e)
    e.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except BlitzgenError as e:
        print(f"blitzgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `blitzgen generate ... | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
