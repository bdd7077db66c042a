"""Check the CUDA path end to end on a GPU machine against transformers.

Tiny random Llama / Qwen3 / Mistral (sliding window) models saved by transformers: blitzgen's
compiled, CUDA-graphed greedy decode (fp32, TF32 off) must give exactly transformers' generate()
tokens, and a seed must repeat its sampled tokens. Each model runs with the masked attention, with
the split-KV kernel, with the split-KV kernel plus the RoPE + cache-write kernel, and with the split-KV
kernel plus the GEMV kernels (each prompt alone, batch 1, and the three together); `--inductor
KEY=VALUE` (as `blitzgen bench --inductor`) compiles every step with that option too, to check one
before it is measured. Speed is `blitzgen bench`'s job.

    python scripts/gpu_check.py [--inductor combo_kernels=true]
"""

import argparse
import dataclasses
import tempfile

import torch

from blitzgen.bench import NullTokenizer
from blitzgen.checkpoint import load_model
from blitzgen.cli import inductor_option
from blitzgen.generate import Generator
from blitzgen.sampling import SamplingParams


def check_correctness(inductor_options: dict):
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
        prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, 23, 40)]
        # the gemv kernels take one sequence: with them each prompt is decoded alone
        for kernel, rope, gemv in ((False, False, False), (True, False, False), (True, True, False),
                                   (True, False, True)):
            gen = Generator(model, NullTokenizer(), compile=True, attention_kernel=kernel, rope_kernel=rope,
                            gemv_kernels=gemv)
            gen.inductor_options = inductor_options
            check_generator(name + (" +attention-kernel" if kernel else "") + (" +rope-kernel" if rope else "")
                            + (" +gemv-kernels, one prompt at a time" if gemv else ""), hf, prompts, gen, alone=gemv)
            if kernel and not rope and not gemv:
                check_slots(name + " +attention-kernel", prompts, gen)


def check_generator(name, hf, prompts, gen, alone=False):
    """alone: each prompt decoded by itself (batch 1, the only shape the gemv kernels take)."""
    greedy = SamplingParams(temperature=0, max_new_tokens=32, ignore_eos=True)
    outs = [gen.generate([p], greedy)[0] for p in prompts] if alone else gen.generate(prompts, greedy)
    same = []
    for p, o in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        same.append(ref == o.token_ids)
    # Sampling inside the graph: the same seed gives the same tokens.
    a = gen.generate(prompts, SamplingParams(temperature=1.0, seed=7, max_new_tokens=16, ignore_eos=True))
    b = gen.generate(prompts, SamplingParams(temperature=1.0, seed=7, max_new_tokens=16, ignore_eos=True))
    c = gen.generate(prompts, SamplingParams(temperature=1.0, seed=8, max_new_tokens=16, ignore_eos=True))
    # With a top-p row in the batch the step sorts the vocabulary: the other rows must draw what they drew
    # in the step that does not sort (a above).
    seeded = SamplingParams(temperature=1.0, seed=7, max_new_tokens=16, ignore_eos=True)
    mixed = gen.generate(prompts, [seeded] * (len(prompts) - 1) + [dataclasses.replace(seeded, top_p=0.9)])
    print(f"{name}: greedy equal to transformers: {same}; seeded repeat equal: "
          f"{[x.token_ids == y.token_ids for x, y in zip(a, b)]}; other seed differs: "
          f"{[x.token_ids != y.token_ids for x, y in zip(a, c)]}; sorting step draws the same: "
          f"{[x.token_ids == y.token_ids for x, y in zip(a[:-1], mixed[:-1])]}", flush=True)


def check_slots(name, prompts, gen):
    """The slot API (the server's): a seeded request draws what it draws alone, in the step that does not sort
    and, once a top-p request joins, in the one that does."""
    plain = SamplingParams(temperature=1.0, seed=3, max_new_tokens=24, ignore_eos=True)
    nucleus = dataclasses.replace(plain, top_p=0.9, seed=4)
    alone = gen.generate([prompts[0]], plain)[0].token_ids
    gen.open_slots(2, 128)
    got = [gen.add_sequence(0, prompts[0], plain)]
    for _ in range(8):
        got.append(gen.step(rows=1)[0])
    gen.add_sequence(1, prompts[1], nucleus)
    while len(got) < len(alone):
        got.append(gen.step()[0])
    print(f"{name}, slots: seeded tokens equal alone, unsorted then sorting step: {got == alone}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inductor", type=inductor_option, action="append", metavar="KEY=VALUE",
                        help="an extra torch.compile option for every decode step (repeatable)")
    args = parser.parse_args()
    check_correctness(dict(args.inductor or []))
