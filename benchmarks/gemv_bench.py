"""bf16 decode products: kernels/gemv.py against what Inductor compiles for the same halves of a layer.

    python benchmarks/gemv_bench.py                 # GPU: Llama-2-7B and Llama-3.1-8B layer shapes
    python benchmarks/gemv_bench.py --dry-run       # CPU, tiny shapes, Triton interpreted: checks the script
    python benchmarks/gemv_bench.py --quantize int4 # int8 / int4 g128 codes, int8 activations (the a8 loop)

A layer's products for one activation row (a batch-1 decode step), in three pieces, each timed as one
function inside a CUDA graph over enough copies of its weights to overflow the L2 (every byte from
HBM), against a streaming-read ceiling measured in the same run (torch.sum of 4 GiB):

    attention in:  qkv = wqkv(rmsnorm(x))
    attention out: h = x + wo(a)
    feed-forward:  h + w2(silu(gate) * up), gate, up = w13(rmsnorm(h))

"inductor" compiles each piece with torch.compile as the Generator does (coordinate-descent tuning,
one function per piece, so its norm statistics and fusions are its own); "cuBLAS" is eager F.linear
for the products alone (norms and gates in eager too); "ours" is kernels/gemv.py with its defaults, and
the sweep tries each product's block sizes. % = weight bytes / time / ceiling. "no PDL" launches our
kernels without programmatic dependent launch (kernels/gemv.py), which only shows between kernels:
in the pieces that repeat one product over the copies, and in the layer row that chains the pieces.

With --quantize the same products read int8 codes (per-row scales) or int4 g128 codes (group scales and
zeros) through the a8 loop (activations rounded to int8 blocks of 32 in the kernel), each checked against
gemv_ref(a8=True) and timed with the defaults (gemv.A8_BLOCKS), then over a sweep of (rows, codes, warps,
words a thread); % counts the codes, scales and zeros a product reads.
"""

import argparse
import os
import sys
import time

if "--dry-run" in sys.argv:  # before triton is imported: the kernels run under its interpreter on a CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_bench import read_ceiling  # noqa: E402

from blitzgen import inductor_fix  # noqa: E402
from blitzgen.attention_bench import time_in_graph, time_on_cpu  # noqa: E402
from blitzgen.kernels import gemv as gemv_kernels  # noqa: E402
from blitzgen.kernels.gemv import gemv, gemv_ref  # noqa: E402

SHAPES = {  # name: (dim, qkv rows, intermediate)
    "llama-2-7b": (4096, 12288, 11008),
    "llama-3.1-8b": (4096, 6144, 14336),
}
TINY = {"tiny": (128, 192, 176)}
SWEEP = [(bn, bk, w) for bn in (1, 2, 4, 8, 16) for bk in (256, 512, 1024, 2048) for w in (2, 4, 8)
         if 512 <= bn * bk <= 16384]
A8_SWEEP = {  # (block_n, block_k in codes, num_warps, words a thread), at most 32 words a thread
    "int4": [(bn, bk, w, v) for bn in (8, 16, 32) for bk in (1024, 2048, 4096) for w in (4, 8) for v in (2, 4)
             if 8 <= bn * bk // 8 // (32 * w) <= 32 and v * 32 * w <= bk // 8 * 4],
    "int8": [(bn, bk, w, v) for bn in (4, 8, 16) for bk in (512, 1024, 2048) for w in (4, 8) for v in (2, 4, 8)
             if 8 <= bn * bk // 4 // (32 * w) <= 32 and v * 32 * w <= bk // 4 * 4],
}
EPS = 1e-5


def rmsnorm(x, g):
    xf = x.float()
    return g * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def piece_attn_in(x, g, wqkv):
    return F.linear(rmsnorm(x, g), wqkv)


def piece_attn_out(x, a, wo):
    return x + F.linear(a, wo)


def piece_ffn(h, g, w13, w2):
    gate, up = F.linear(rmsnorm(h, g), w13).chunk(2, dim=-1)
    return h + F.linear(F.silu(gate) * up, w2)


def ours_attn_in(x, g, wqkv, blocks=None):
    return gemv(x, wqkv, norm_weight=g, eps=EPS, blocks=blocks)


def ours_attn_out(x, a, wo, blocks=None):
    return gemv(a, wo, residual=x, blocks=blocks)


def ours_ffn(h, g, w13, w2, blocks_up=None, blocks_down=None):
    act = gemv(h, w13, norm_weight=g, eps=EPS, gate_up=True, blocks=blocks_up)
    return gemv(act, w2, residual=h, blocks=blocks_down)


def seconds_per_call(call, copies, device):
    """Seconds per call(i), i cycling over the weight copies: replayed from a CUDA graph on a GPU (the
    attention bench's timer), wall clock on a CPU."""
    return time_in_graph(call, copies) if device.type == "cuda" else time_on_cpu(call, copies)


def warm_gpu(device, seconds=1.0):
    """Matrix products for about `seconds`, so that the first timings do not meet an idle GPU's low clocks."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def weights(dim, qkv, inter, device, copies, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape: (torch.randn(*shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)  # noqa: E731
    return [dict(wqkv=rand(qkv, dim), wo=rand(dim, dim), w13=rand(2 * inter, dim), w2=rand(dim, inter))
            for _ in range(copies)]


def quantized(w, fmt, group):
    """gemv's weight arguments for w in quantize.py's int8 or int4 format."""
    from blitzgen.quantize import Int4Linear, int8_quantize

    if fmt == "int8":
        codes, scales = int8_quantize(w)
        return dict(weight=codes, scales=scales)
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    linear.weight.data = w
    m = Int4Linear.from_float(linear, group)
    return dict(weight=m.packed, scales=m.scales, zeros=m.zeros)


def quantized_products(args, device, shapes, ceiling):
    """The four products of a layer with int8 / int4 codes through the a8 loop: correctness, defaults, sweep."""
    fmt = args.quantize
    group = 128 if device.type == "cuda" else 32
    if device.type != "cuda":
        shapes = {"tiny": (128, 192, 160)}  # K a multiple of the int4 group
    for model, (dim, qkv, inter) in shapes.items():
        gen = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(1, dim, generator=gen, device=device).to(torch.bfloat16)
        a = torch.randn(1, inter, generator=gen, device=device).to(torch.bfloat16)
        g = (torch.rand(dim, generator=gen, device=device) + 0.5).to(torch.bfloat16)
        specs = {  # product: (weight shape, gemv keywords, activation)
            "norm + wqkv": ((qkv, dim), dict(norm_weight=g, eps=EPS), x),
            "wo + residual": ((dim, dim), dict(residual=x), x),
            "norm + w13 gated": ((2 * inter, dim), dict(norm_weight=g, eps=EPS, gate_up=True), x),
            "w2 + residual": ((dim, inter), dict(residual=x), a),
        }
        print(f"\n### {model}, {fmt} codes, int8 activations, one row\n")
        sweep = A8_SWEEP[fmt] if device.type == "cuda" and not args.no_sweep else []
        columns = ["product", "MB", "max rel. error vs gemv_ref(a8)", "defaults"]
        columns += [f"{bn}x{bk} w{w} v{v}" for bn, bk, w, v in sweep]
        print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
        for name, (shape, kw, act) in specs.items():
            def make():
                return quantized(torch.randn(*shape, generator=gen, device=device).mul(0.02).bfloat16(), fmt, group)

            one = make()
            nbytes = sum(t.nbytes for t in one.values())
            copies = max(2, -(-(256 << 20) // nbytes)) if device.type == "cuda" else 1
            ws = [one] + [make() for _ in range(copies - 1)]
            ref = gemv_ref(act, **one, **kw, a8=True).float()
            err = ((gemv(act, **one, **kw).float() - ref).abs().max() / ref.abs().max()).item()
            cells = []
            for blocks in [None] + sweep:
                s = seconds_per_call(lambda i: gemv(act, **ws[i], **kw, blocks=blocks), copies, device)
                cells.append(f"{100 * nbytes / s / ceiling:.0f}%")
            print(f"| {name} | {nbytes / 1e6:.1f} | {err:.1e} | " + " | ".join(cells) + " |")
        print(f"(defaults: {gemv_kernels.A8_BLOCKS[fmt]}; PDL on)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreted kernels")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--quantize", choices=("int8", "int4"), help="int8 / int4 g128 codes through the a8 loop")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    shapes = TINY if args.dry_run else {m: SHAPES[m] for m in args.models.split(",")}
    ceiling = read_ceiling(device, 0.01 if args.dry_run else 4)
    if device.type == "cuda":
        warm_gpu(device)
    print(f"read ceiling {ceiling / 1e12:.2f} TB/s; torch {torch.__version__}; "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    if args.quantize:
        return quantized_products(args, device, shapes, ceiling)
    inductor_fix.install()
    compile_ = lambda f: torch.compile(f, fullgraph=True, dynamic=False,  # noqa: E731
                                       options={"coordinate_descent_tuning": device.type == "cuda"})
    inductor = {f.__name__: compile_(f) for f in (piece_attn_in, piece_attn_out, piece_ffn)}
    for model, (dim, qkv, inter) in shapes.items():
        layer_bytes = 2 * dim * (qkv + dim + 3 * inter)
        # Enough copies that the smallest matrix (wo) rotates through 256 MB: no product is served from L2.
        copies = max(2, -(-(256 << 20) // (2 * dim * dim))) if device.type == "cuda" else 1
        ws = weights(dim, qkv, inter, device, copies)
        gen = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(1, dim, generator=gen, device=device).to(torch.bfloat16)
        a = torch.randn(1, dim, generator=gen, device=device).to(torch.bfloat16)
        g = (torch.rand(dim, generator=gen, device=device) + 0.5).to(torch.bfloat16)
        pieces = {  # piece: (weight bytes, {row: call(i)})
            "attention in (norm + wqkv)": (2 * qkv * dim, {
                "cuBLAS": lambda i: piece_attn_in(x, g, ws[i]["wqkv"]),
                "inductor": lambda i: inductor["piece_attn_in"](x, g, ws[i]["wqkv"]),
                "ours": lambda i: ours_attn_in(x, g, ws[i]["wqkv"])}),
            "attention out (wo + residual)": (2 * dim * dim, {
                "cuBLAS": lambda i: piece_attn_out(x, a, ws[i]["wo"]),
                "inductor": lambda i: inductor["piece_attn_out"](x, a, ws[i]["wo"]),
                "ours": lambda i: ours_attn_out(x, a, ws[i]["wo"])}),
            "feed-forward (norm + w13 + gate + w2 + residual)": (6 * inter * dim, {
                "cuBLAS": lambda i: piece_ffn(x, g, ws[i]["w13"], ws[i]["w2"]),
                "inductor": lambda i: inductor["piece_ffn"](x, g, ws[i]["w13"], ws[i]["w2"]),
                "ours": lambda i: ours_ffn(x, g, ws[i]["w13"], ws[i]["w2"])}),
        }
        # Correctness at the real shapes first: each row against the fp32 reference of its piece.
        w0 = ws[0]
        refs = {
            "attention in (norm + wqkv)": gemv_ref(x, w0["wqkv"], norm_weight=g, eps=EPS),
            "attention out (wo + residual)": gemv_ref(a, w0["wo"], residual=x),
            "feed-forward (norm + w13 + gate + w2 + residual)": gemv_ref(
                gemv_ref(x, w0["w13"], norm_weight=g, eps=EPS, gate_up=True), w0["w2"], residual=x),
        }
        print(f"\n### {model}, one row: dim {dim}, qkv {qkv}, intermediate {inter}; "
              f"{copies} weight copies\n")
        print("| piece | weight MB | row | us | GB/s | % of read | max rel. error vs fp32 ref |")
        print("|---|---|---|---|---|---|---|")
        for piece, (nbytes, rows) in pieces.items():
            ref = refs[piece].float()
            for row, call in rows.items():
                for pdl in ((True, False) if row == "ours" and device.type == "cuda" else (True,)):
                    gemv_kernels.PDL = pdl
                    err = ((call(0).float() - ref).abs().max() / ref.abs().max()).item()
                    s = seconds_per_call(call, copies, device)
                    name = row if pdl or device.type != "cuda" else row + ", no PDL"
                    print(f"| {piece} | {nbytes / 1e6:.1f} | {name} | {s * 1e6:.1f} | {nbytes / s / 1e9:.0f} | "
                          f"{100 * nbytes / s / ceiling:.0f}% | {err:.1e} |")
        gemv_kernels.PDL = True
        # A layer's products one after another, as in a decode step (minus attention): what the pieces
        # cost together, launch gaps and, with PDL, the overlap of one kernel's tail with the next included.
        print("\n| a layer's products in sequence | us | % of read |\n|---|---|---|")
        for row in ("cuBLAS", "inductor", "ours", "ours, no PDL"):
            gemv_kernels.PDL = row != "ours, no PDL"
            key = row.split(",")[0]
            layer = lambda i: [rows[key](i) for _, rows in pieces.values()]  # noqa: E731
            s = seconds_per_call(layer, copies, device)
            print(f"| {row} | {s * 1e6:.1f} | {100 * layer_bytes / s / ceiling:.0f}% |")
        gemv_kernels.PDL = True
        if args.no_sweep:
            continue
        products = {  # product: (weight bytes, call(i, blocks))
            "norm + wqkv": (2 * qkv * dim, lambda i, b: ours_attn_in(x, g, ws[i]["wqkv"], b)),
            "wo + residual": (2 * dim * dim, lambda i, b: ours_attn_out(x, a, ws[i]["wo"], b)),
            "norm + w13 gated": (4 * inter * dim, lambda i, b: gemv(x, ws[i]["w13"], norm_weight=g, eps=EPS,
                                                                   gate_up=True, blocks=b)),
            "w2 + residual": (2 * inter * dim, lambda i, b: gemv(a.new_ones(1, inter), ws[i]["w2"], residual=x,
                                                                blocks=b)),
        }
        sweep = SWEEP if device.type == "cuda" else [(4, 64, 4), (2, 128, 2)]
        print("\n| product | " + " | ".join(f"{bn}x{bk} w{w}" for bn, bk, w in sweep) + " |")
        print("|---|" + "---|" * len(sweep))
        for name, (nbytes, call) in products.items():
            cells = []
            for blocks in sweep:
                s = seconds_per_call(lambda i: call(i, blocks), copies, device)
                cells.append(f"{100 * nbytes / s / ceiling:.0f}%")
            print(f"| {name} | " + " | ".join(cells) + " |")
        print(f"(defaults: {gemv_kernels.BLOCKS}; PDL on)")


if __name__ == "__main__":
    main()
