"""Check the CUDA path end to end on a GPU machine: correctness against transformers, then speed.

1. Tiny random Llama/Qwen3/Mistral models saved by transformers: blitzgen's compiled, CUDA-graphed
   greedy decode (fp32, TF32 off) must give exactly transformers' generate() tokens.
2. A random-weight Llama-2-7B in bf16 (real shapes, no weights needed): compile + capture time and
   decode tokens/s at batch 1, with the bandwidth it implies next to a streaming-read ceiling.

    python scripts/gpu_check.py [--skip-speed]
"""

import argparse
import tempfile
import time

import torch

from blitzgen.config import ModelConfig
from blitzgen.bench import NullTokenizer
from blitzgen.checkpoint import load_model
from blitzgen.generate import Generator
from blitzgen.model import Transformer
from blitzgen.sampling import SamplingParams


def check_correctness():
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    small = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                 num_attention_heads=4, max_position_embeddings=512)
    variants = {
        "llama-gqa2": (LlamaForCausalLM, LlamaConfig(num_key_value_heads=2, **small)),
        "qwen3-hd64": (Qwen3ForCausalLM, Qwen3Config(num_key_value_heads=1, head_dim=64, **small)),
        "mistral-sw16": (MistralForCausalLM, MistralConfig(num_key_value_heads=2, sliding_window=16, **small)),
    }
    for name, (cls, cfg) in variants.items():
        torch.manual_seed(0)
        hf = cls(cfg).eval()
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            model = load_model(d, device="cuda", dtype=torch.float32)
        hf = hf.cuda()
        gen = Generator(model, NullTokenizer(), compile=True)
        prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, 23, 40)]
        outs = gen.generate(prompts, SamplingParams(temperature=0, max_new_tokens=32, ignore_eos=True))
        same = []
        for p, o in zip(prompts, outs):
            ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
            same.append(ref == o.token_ids)
        # Sampling inside the graph: the same seed gives the same tokens.
        a = gen.generate(prompts, SamplingParams(temperature=1.0, seed=7, max_new_tokens=16, ignore_eos=True))
        b = gen.generate(prompts, SamplingParams(temperature=1.0, seed=7, max_new_tokens=16, ignore_eos=True))
        c = gen.generate(prompts, SamplingParams(temperature=1.0, seed=8, max_new_tokens=16, ignore_eos=True))
        print(f"{name}: greedy equal to transformers: {same}; seeded repeat equal: "
              f"{[x.token_ids == y.token_ids for x, y in zip(a, b)]}; other seed differs: "
              f"{[x.token_ids != y.token_ids for x, y in zip(a, c)]}", flush=True)


def read_ceiling_tbps() -> float:
    x = torch.empty(4 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda")
    x.fill_(1.0)
    for _ in range(3):
        x.sum()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        x.sum()
    end.record()
    torch.cuda.synchronize()
    return 10 * x.nbytes / (start.elapsed_time(end) / 1000) / 1e12


def check_speed(batch_sizes):
    ceiling = read_ceiling_tbps()
    config = ModelConfig(model_type="llama", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                         head_dim=128, intermediate_size=11008, max_seq_len=4096, norm_eps=1e-5)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Transformer(config).eval()
    torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    weight_bytes = sum(p.nbytes for p in model.parameters())
    print(f"built random Llama-2-7B in {time.perf_counter() - t0:.1f} s; weights {weight_bytes / 1e9:.2f} GB; "
          f"streaming-read ceiling {ceiling:.2f} TB/s", flush=True)
    gen = Generator(model, NullTokenizer(), compile=True)
    for bs in batch_sizes:
        prompts = [list(range(1, 101))] * bs
        params = SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True)
        t0 = time.perf_counter()
        gen.generate(prompts, params)  # compiles and captures
        warm = time.perf_counter() - t0
        rates = []
        for _ in range(3):
            gen.reset()
            gen.generate(prompts, params)
            rates.append(gen.last_stats.decode_tokens_per_second / bs)
        rate = sorted(rates)[1]
        kv_bytes = 2 * config.n_layers * config.n_kv_heads * config.head_dim * 2 * 200 * bs  # rough, live part
        gbps = rate * (weight_bytes + kv_bytes) / 1e9
        print(f"batch {bs}: first call (compile+capture+200 tok) {warm:.1f} s; decode {rate:.1f} tok/s per sequence "
              f"({rate * bs:.0f} total); {gbps:.0f} GB/s = {100 * gbps / (ceiling * 1000):.0f}% of ceiling", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--batch-sizes", default="1")
    args = parser.parse_args()
    check_correctness()
    if not args.skip_speed:
        check_speed([int(b) for b in args.batch_sizes.split(",")])
