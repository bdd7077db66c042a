"""Weight-only quantization: int8 per output channel, int4 per group, and quantize_model().

One nn.Module per format, each with from_float() (round to nearest), dequantize() (the
plain-PyTorch reference of what the stored numbers mean) and forward():

- Int8Linear: symmetric int8 codes, one scale per output channel: w[n, k] ~ q[n, k] * s[n].
- Int4Linear: asymmetric 4-bit codes in groups of G = 32, 64 or 128 consecutive input features,
  a scale and a zero point per group: w[n, k] ~ q[n, k] * s[n, k // G] + z[n, k // G], q in
  [0, 15], z the value of code 0 (a float zero point, as in tinygemm / HQQ, rather than GPTQ's
  integer one, so both ends of every group lie on the grid). Two codes per byte, (N, K / 2).

Scales and zero points are stored in bfloat16 whatever the model's dtype, rounded outward (scale
up, zero point down) before the codes are chosen, so every weight stays within half a step of
its code: |w - w_hat| <= s / 2.

forward(): a decode step (at most DECODE_MAX_ROWS = 32 activation rows) on CUDA calls
the Triton GEMV kernels (blitzgen/kernels/int8_gemv.py, int4_gemv.py), which read the packed
weights once and never build a dequantized matrix; a one-row bf16 / fp16 step takes
kernels/gemv_a8.py instead, which rounds the activations to int8 for integer dot products
(INT8_ACTIVATIONS_INT8, INT4_ACTIVATIONS_INT8 below). Longer inputs (prefill) are compute-bound
and run cuBLAS on a dense matrix made for the call by one Triton pass over the codes
(kernels/dequantize.py). On CPU both formats use the plain-PyTorch path. A Generator's one-sequence
decode step does not call Int8Linear.forward at all: Block.gemv_decode hands the codes and scales to
kernels/gemv.py, whose fused kernels read them (BENCHMARKS.md, 2026-12-02: faster than gemv_a8).

What quantize_model() quantizes, and why:
- Every transformer block's linears (fused q/k/v, attention output, fused gate/up, down): ~97% of
  the bytes a decode step reads in a 7B model; int8 or int4 as asked (q/k/v and o biases kept
  in the model dtype).
- The output projection (vocab x width): always int8, also in the int4 modes. It is read whole
  every step (2% of a bf16 Llama-2-7B, 7% of its int4 blocks if left in bf16), and int8
  per-channel costs no measurable quality, while 4 bits on the logits layer is the most damaging
  place to cut (llama.cpp keeps it at 6 bits; GPTQ and AWQ leave it in 16). A tied output is
  quantized as its own int8 copy; the embedding keeps the float weight.
- The embedding table: not quantized. A decode step reads only B of its rows, so quantizing it
  saves memory but no time, and a quantized lookup would need a module of its own.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from blitzgen.errors import BlitzgenError
from blitzgen.kernels import unpack_int4  # the inverse of pack_int4

try:  # CUDA builds of torch ship Triton; CPU-only installs run the plain-PyTorch path everywhere.
    from blitzgen.kernels.dequantize import int4_dequantize, int8_dequantize
    from blitzgen.kernels.int4_gemv import int4_gemv
    from blitzgen.kernels.int8_gemv import int8_gemv
    from blitzgen.kernels.gemv_a8 import gemv_a8

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

MODES = ("int8", "int4", "int4-gptq")  # int4-gptq: the int4 format, calibrated by gptq.py
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128
# Activation rows up to which forward() takes the GEMV kernels on CUDA: decode at batch 1..8, and the
# decode steps of a continuous-batching server with up to 32 slots. Past 8 rows the kernels' tensor-core
# path reads each weight tile once per 16 rows, still far less traffic than unpacking the whole matrix.
DECODE_MAX_ROWS = 32
SCALE_DTYPE = torch.bfloat16
BLOCK_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


def check_mode(mode: str, group_size: int | None) -> int | None:
    """Validate a --mode / --group-size pair; returns the group size to use (None for int8)."""
    if mode not in MODES:
        raise BlitzgenError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "int8":
        if group_size is not None:
            raise BlitzgenError("--group-size applies to the int4 modes only (int8 has one scale per output channel)")
        return None
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        raise BlitzgenError(f"--group-size {group_size}: expected one of {', '.join(map(str, GROUP_SIZES))}")
    return group_size


def _round_up(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The nearest `dtype` value >= v (v float32). Nudging by 2^-8 relative, at least half a bf16
    step, and rounding to nearest lands on or above v."""
    r = v.to(dtype)
    return torch.where(r.float() < v, (v + v.abs() * 2**-8).to(dtype), r)


def _round_down(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The nearest `dtype` value <= v (v float32)."""
    r = v.to(dtype)
    return torch.where(r.float() > v, (v - v.abs() * 2**-8).to(dtype), r)


# One activation row inside torch.compile (the batch-1 decode step): the plain expressions below
# instead of the Triton kernels, for Inductor to turn into one fused reduction per linear (as it does
# for the bf16 model's GEMVs). benchmarks/quant_bench.py measures both; on an H100 the int8 products
# alone ran faster this way at most shapes, but the whole decode step slower (213 against 259
# tokens/s, BENCHMARKS.md), so it is off.
ONE_ROW_BY_INDUCTOR = False


def int8_one_row(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (weight * scales).T -> (M, N) float32, written as a broadcast multiply and sum over K
    so that Inductor fuses the int8 -> float cast into the reduction (no dequantized matrix)."""
    return (x.float()[:, None, :] * weight.float()[None]).sum(-1) * scales.float()


def int4_one_row(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ W.T for the packed int4 format (see Int4Linear) -> (M, N) float32, as one broadcast
    multiply and sum: even k are the low nibbles, odd k the high ones."""
    M, K = x.shape
    N, groups = scales.shape
    half = K // groups // 2
    xs = x.float().view(M, 1, groups, half, 2)
    codes = packed.view(1, N, groups, half)
    s, z = scales.float().view(1, N, groups, 1), zeros.float().view(1, N, groups, 1)
    w_even, w_odd = (codes & 0xF).float() * s + z, (codes >> 4).float() * s + z  # (1, N, groups, half)
    return (xs[..., 0] * w_even + xs[..., 1] * w_odd).sum((-1, -2))


# One-row decode steps in bf16 / fp16 on CUDA can round the activations to int8 blocks of 32 and multiply
# with integer dot products (kernels/gemv_a8.py) instead of the weight-only kernels, which are bound by
# their int-to-float work at one row. It changes the numerics (x to 8 bits per block of 32: +0.01%
# perplexity for either format on the default model, scripts/a8_quality.py). Measured on an H200
# (BENCHMARKS.md, 2026-12-01 sessions 5-6), Llama-2-7B batch 1: int4 g128 364.7 against 262.9 tokens/s in
# one run (401-413 since session 6's k-order activations); int8 343.3, against 324.4-328.0 for the
# weight-only kernels in two other runs, and faster than them at every GEMV shape of the same run.
# One row only: at 8 rows the kernel's unrolled row loop measured 2-4x slower than the weight-only
# kernels' tensor-core path. Set False for exact activations.
INT8_ACTIVATIONS_INT8 = True
INT4_ACTIVATIONS_INT8 = True


def _a8(enabled: bool, x: torch.Tensor, rows: int) -> bool:
    # gemv_a8 needs K in whole blocks of 32 (true of every real model; tiny test models may differ).
    return enabled and rows == 1 and x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] % 32 == 0


def _by_inductor(x: torch.Tensor, rows: int) -> bool:
    return ONE_ROW_BY_INDUCTOR and rows == 1 and x.is_cuda and torch.compiler.is_compiling()


def _kernels_apply(x: torch.Tensor) -> bool:
    """Whether forward() takes the Triton paths: CUDA tensors (tests patch this to run the kernels
    on the CPU under TRITON_INTERPRET=1)."""
    return HAVE_TRITON and x.is_cuda


# ---- int8 ---------------------------------------------------------------------------------------
def int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 codes (N, K) and bf16 scales (N,), symmetric per output channel."""
    w = w.float()
    amax = w.abs().amax(dim=1)  # (N,)
    scales = _round_up(torch.where(amax > 0, amax / 127, 1.0), SCALE_DTYPE)  # >= amax / 127: no clipping
    codes = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


class Int8Linear(nn.Module):
    """y = (x @ q.T) * s + b with q (N, K) int8 and s (N,) one scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight
        module = cls(w.shape[1], w.shape[0], linear.bias is not None, device=w.device)
        module.weight, module.scales = int8_quantize(w)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def dequantize(self) -> torch.Tensor:
        """The float32 (N, K) matrix the codes stand for."""
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if _by_inductor(x, rows):
            y = int8_one_row(x.reshape(1, self.in_features), self.weight, self.scales)
            y = y if self.bias is None else y + self.bias.float()
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        if _kernels_apply(x):
            if rows <= DECODE_MAX_ROWS:
                x2 = x.reshape(rows, self.in_features)
                if _a8(INT8_ACTIVATIONS_INT8, x, rows):
                    y = gemv_a8(x2, self.weight, self.scales, bias=self.bias)
                else:
                    y = int8_gemv(x2, self.weight, self.scales, self.bias)
                return y.view(*x.shape[:-1], self.out_features)
            return F.linear(x, int8_dequantize(self.weight, self.scales, x.dtype), self.bias)
        # Per-channel scales commute with the product: scale the (T, N) output, not the matrix.
        y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ---- int4 ---------------------------------------------------------------------------------------
def int4_group_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of groups: w (..., G) float -> bf16 (...,) each, covering [min, max]."""
    w = w.float()
    zeros = _round_down(w.amin(dim=-1), SCALE_DTYPE)  # the value of code 0, <= the group's minimum
    span = w.amax(dim=-1) - zeros.float()
    scales = _round_up(torch.where(span > 0, span / 15, 1.0), SCALE_DTYPE)  # code 15 >= the maximum
    return scales, zeros


def int4_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Nearest codes in [0, 15] for w (..., G) given per-group scales and zeros (...,) -> uint8 (..., G)."""
    q = torch.round((w.float() - zeros.float()[..., None]) / scales.float()[..., None])
    return q.clamp_(0, 15).to(torch.uint8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K / 2) bytes: even k in the low nibble, odd k in the high one."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


class Int4Linear(nn.Module):
    """y = x @ W.T + b with W[n, k] = q[n, k] * s[n, k // G] + z[n, k // G], q 4-bit, packed in pairs."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, device=None):
        super().__init__()
        if group_size not in GROUP_SIZES or in_features % group_size:
            raise BlitzgenError(f"int4: in_features {in_features} is not a multiple of the group size "
                                f"{group_size}; use a group size in {GROUP_SIZES} that divides it, or int8")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bias: torch.Tensor | None) -> "Int4Linear":
        """Build from codes (N, K) uint8 in [0, 15] and bf16 scales, zeros (N, K / G) (RTN or GPTQ)."""
        N, K = codes.shape
        module = cls(K, N, bias is not None, K // scales.shape[1], device=codes.device)
        module.packed, module.scales, module.zeros = pack_int4(codes), scales, zeros
        if bias is not None:
            module.bias = bias.detach().clone()
        return module

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> "Int4Linear":
        w = linear.weight
        N, K = w.shape
        if group_size not in GROUP_SIZES or K % group_size:
            raise BlitzgenError(f"int4: in_features {K} is not a multiple of the group size {group_size}; "
                                f"use a group size in {GROUP_SIZES} that divides it, or int8")
        groups = w.detach().float().view(N, K // group_size, group_size)  # (N, K / G, G)
        scales, zeros = int4_group_params(groups)
        codes = int4_codes(groups, scales, zeros).view(N, K)
        return cls.from_codes(codes, scales, zeros, linear.bias)

    def dequantize(self) -> torch.Tensor:
        """The float32 (N, K) matrix the codes stand for."""
        N, G = self.out_features, self.group_size
        codes = unpack_int4(self.packed).float().view(N, -1, G)  # (N, K / G, G)
        return (codes * self.scales.float()[..., None] + self.zeros.float()[..., None]).view(N, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if _by_inductor(x, rows):
            y = int4_one_row(x.reshape(1, self.in_features), self.packed, self.scales, self.zeros)
            y = y if self.bias is None else y + self.bias.float()
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        if _kernels_apply(x):
            if rows <= DECODE_MAX_ROWS:
                x2 = x.reshape(rows, self.in_features)
                if _a8(INT4_ACTIVATIONS_INT8, x, rows):
                    y = gemv_a8(x2, self.packed, self.scales, self.zeros, self.bias)
                else:
                    y = int4_gemv(x2, self.packed, self.scales, self.zeros, self.bias)
                return y.view(*x.shape[:-1], self.out_features)
            weight = int4_dequantize(self.packed, self.scales, self.zeros, x.dtype)
        else:
            weight = self.dequantize().to(x.dtype)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


# ---- whole models -------------------------------------------------------------------------------
def replace_module(model: nn.Module, name: str, module: nn.Module):
    """Put `module` at dotted `name` inside `model`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def block_linear_names(model: nn.Module) -> list[str]:
    """Names of every block's linears (fused q/k/v, o, fused gate/up, down), in execution order."""
    return [f"layers.{i}.{name}" for i in range(len(model.layers)) for name in BLOCK_LINEARS]


def quantize_model(model: nn.Module, mode: str, group_size: int | None = None) -> nn.Module:
    """Round-to-nearest quantization in place: block linears to `mode` ("int8" or "int4"), the
    output projection to int8, the embedding untouched (see the module docstring). One matrix at
    a time is upcast to float32, so peak memory is the model plus one layer."""
    group_size = check_mode(mode, group_size)
    if mode == "int4-gptq":
        raise BlitzgenError("int4-gptq needs calibration text: use blitzgen.gptq.quantize_gptq "
                            "(or `blitzgen quantize --mode int4-gptq`)")
    if quantization_metadata(model) is not None:
        raise BlitzgenError("the model is already quantized; load the original weights to quantize again")
    names = block_linear_names(model)
    for name in tqdm(names, desc=f"quantizing to {mode}", disable=None, leave=False):
        linear = model.get_submodule(name)
        replace_module(model, name, Int8Linear.from_float(linear) if mode == "int8"
                 else Int4Linear.from_float(linear, group_size))
    model.output = Int8Linear.from_float(model.output)
    return model


def quantization_metadata(model: nn.Module) -> dict | None:
    """What is quantized, read off the modules (None for a float model): the core of a quantized
    checkpoint's config.json "quantization" section."""
    first = model.get_submodule(block_linear_names(model)[0])
    if not isinstance(first, (Int8Linear, Int4Linear)):
        return None
    int4 = isinstance(first, Int4Linear)
    return {
        "linears": "int4" if int4 else "int8",  # every block's wqkv, wo, w13, w2
        "group_size": first.group_size if int4 else None,
        "output": "int8",
        "embeddings": "float",
        "scale_dtype": str(SCALE_DTYPE).removeprefix("torch."),
    }


def build_quantized_shells(model: nn.Module, section: dict):
    """Swap a (meta-device) float model's linears for empty quantized modules matching a checkpoint's
    "quantization" section, ready for load_state_dict(assign=True)."""
    linears, group_size = section.get("linears"), section.get("group_size")
    if linears not in ("int8", "int4") or section.get("output") != "int8":
        raise BlitzgenError(f"quantization section {section}: expected linears int8|int4 and output int8")
    if linears == "int4":
        check_mode("int4", group_size)
    for name in block_linear_names(model) + ["output"]:
        linear = model.get_submodule(name)
        bias = linear.bias is not None
        if linears == "int8" or name == "output":
            shell = Int8Linear(linear.in_features, linear.out_features, bias, device="meta")
        else:
            shell = Int4Linear(linear.in_features, linear.out_features, bias, group_size, device="meta")
        replace_module(model, name, shell)
