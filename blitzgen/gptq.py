"""GPTQ: int4 weights chosen with calibration text so that each layer's output changes least.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (arXiv 2210.17323), algorithm 1, with the reference code's lazy block
updates, dampening and optional act-order. The stored format is quantize.Int4Linear's
(group-wise scale + float zero point, groups of G consecutive input features); only the codes
and the group parameters differ from round-to-nearest.

For a linear layer y = x W^T with calibration inputs X (rows = tokens), GPTQ minimises
||X W^T - X W_q^T||^2 one input column at a time. With H = 2 X^T X / n (+ dampening), quantizing
column j makes the error e = (w_j - q(w_j)) / [H^-1]_jj, which is pushed onto the columns not yet
quantized: W[:, j:] -= e [H^-1]_{j, j:}, using the rows of the upper Cholesky factor of H^-1
(the "Cholesky reformulation"). Columns go in blocks of 128; updates to later blocks are applied
once per block. A group's scale and zero point are computed when its first column comes up,
from the group's current (error-compensated) values. With act-order, columns go in order of
decreasing diag(H) (most active inputs first); groups stay the contiguous K ranges of the
format, so the kernels need no permutation index.

Layer by layer (what lets a 7B model calibrate on one 80 GB GPU): only one block's input
activations (samples x seq_len x width) are held. Within a block the linears are done in
execution order (q/k/v, o, gate/up, down), each one's Hessian collected by a forward hook with the
earlier ones already quantized ("true sequential"), and the block's output, computed with its
quantized linears, becomes the next block's input. The output projection gets int8
round-to-nearest and the embedding stays float, as in quantize.quantize_model.

Calibration text: `--calib FILE`, by default blitzgen/default_model/calib.txt.gz, ~0.5 MB of the
default model's training split (excerpts of every training play and poem; none of the held-out
plays; made by scripts/prepare_quant_text.py). Samples are random windows of its tokens.
"""

import gzip
from pathlib import Path

import torch
from tqdm import tqdm

from blitzgen.errors import BlitzgenError
from blitzgen.model import attention_mask, rope_cos_sin
from blitzgen.quantize import (BLOCK_LINEARS, Int4Linear, Int8Linear, check_mode, int4_codes, int4_group_params,
                               quantization_metadata, replace_module)

DEFAULT_CALIBRATION = Path(__file__).parent / "default_model" / "calib.txt.gz"
BLOCK_SIZE = 128  # columns per lazy-update block (the reference code's value)


def read_calibration_text(path: str | Path | None) -> str:
    """The calibration text of `path` (plain or .gz UTF-8), or the default sample when None."""
    path = DEFAULT_CALIBRATION if path is None else Path(path)
    if not path.is_file():
        raise BlitzgenError(f"--calib {path}: no such file")
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BlitzgenError(f"--calib {path}: not a UTF-8 text (or gzip of one) file ({e})") from None


def calibration_tokens(tokenizer, text: str, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """(num_samples, seq_len) int64: windows of the tokenized text at seeded random offsets."""
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
    if len(ids) < seq_len:
        raise BlitzgenError(f"calibration text has {len(ids)} tokens, fewer than one sample of {seq_len}; "
                            f"give a longer --calib file or a smaller --calib-seq-len")
    starts = torch.randint(0, len(ids) - seq_len + 1, (num_samples,), generator=torch.Generator().manual_seed(seed))
    return ids[starts[:, None] + torch.arange(seq_len)]  # (n, T)


def _upper_cholesky_of_inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; more dampening if H is not
    positive definite in floating point."""
    mean_diag = torch.diag(H).mean()
    for attempt in range(5):
        damped = H + (damp * 10**attempt) * mean_diag * torch.eye(len(H), device=H.device)
        L, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    raise BlitzgenError("GPTQ: the calibration Hessian is singular even with 10000x dampening; "
                        "use more or more varied calibration text")


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, H: torch.Tensor, group_size: int, act_order: bool = False,
                         damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ one (N, K) weight given its inputs' Hessian H (K, K) -> Int4Linear codes (N, K) uint8,
    scales and zeros (N, K / G) bf16."""
    W = weight.float().clone()  # (N, K), columns quantized in place of the error updates
    N, K = W.shape
    H = H.float().clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: any value works, 0 is exact
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K, device=W.device)
    position = torch.argsort(perm)  # position[k]: when column k is quantized
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _upper_cholesky_of_inverse(H, damp)

    groups = K // group_size
    scales = torch.empty(N, groups, dtype=torch.bfloat16, device=W.device)
    zeros = torch.empty_like(scales)
    ready = [False] * groups
    group_of = (perm // group_size).tolist()  # group of the column at each position
    codes = torch.empty(N, K, dtype=torch.uint8, device=W.device)
    for i1 in range(0, K, BLOCK_SIZE):
        i2 = min(i1 + BLOCK_SIZE, K)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            g = group_of[i1 + i]
            if not ready[g]:
                # The group's current values: its columns in this block from W1 (updated), the later
                # ones from W plus this block's updates so far (applied to W only at the block's end).
                members = position[g * group_size : (g + 1) * group_size]  # all at positions >= i1 + i
                inside = members < i2
                current = W[:, members] - Err1[:, :i] @ Hinv[i1 : i1 + i, members]
                current[:, inside] = W1[:, members[inside] - i1]
                scales[:, g], zeros[:, g] = int4_group_params(current)
                ready[g] = True
            w = W1[:, i]
            q = int4_codes(w[:, None], scales[:, g], zeros[:, g])[:, 0]  # (N,)
            codes[:, i1 + i] = q
            error = (w - (q.float() * scales[:, g].float() + zeros[:, g].float())) / Hinv1[i, i]
            W1[:, i:] -= error[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = error
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes[:, position], scales, zeros  # codes back in column order


def _block_inputs(model, T: int, batch: int, device, dtype):
    """cos, sin, positions, mask and scratch K/V buffers for running a block on (batch, T) tokens."""
    c = model.config
    positions = torch.arange(T, device=device)[None].expand(batch, T)  # (b, T)
    cos, sin = rope_cos_sin(model.inv_freq, positions, dtype)
    windowed = c.sliding_window is not None and T > c.sliding_window
    mask = attention_mask(positions, T, c.sliding_window) if windowed else None  # None: plain causal
    k, v = (torch.empty(batch, T, c.n_kv_heads, c.head_dim, device=device, dtype=dtype) for _ in range(2))
    return cos, sin, positions, mask, k, v


@torch.no_grad()
def quantize_gptq(model, tokens: torch.Tensor, group_size: int = 128, act_order: bool = False,
                  damp: float = 0.01, batch_size: int = 8) -> dict:
    """GPTQ int4 for every block linear of `model` in place, calibrated on `tokens` (n, T); the output
    projection to int8 (round to nearest). Returns the settings, for the checkpoint's metadata."""
    group_size = check_mode("int4-gptq", group_size)
    if quantization_metadata(model) is not None:
        raise BlitzgenError("the model is already quantized; load the original weights to quantize again")
    device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    for name in BLOCK_LINEARS:
        K = model.layers[0].get_submodule(name).in_features
        if K % group_size:
            raise BlitzgenError(f"int4: {name} has {K} input features, not a multiple of the group size "
                                f"{group_size}; use a group size that divides it, or int8")
    n, T = tokens.shape
    x = torch.cat([model.tok_embeddings(tokens[i : i + batch_size].to(device)) for i in range(0, n, batch_size)])
    cos, sin, positions, mask, k, v = _block_inputs(model, T, min(batch_size, n), device, dtype)

    def run(block, x):
        out = torch.empty_like(x)
        for i in range(0, n, batch_size):
            b = min(batch_size, n - i)
            out[i : i + b] = block(x[i : i + b], cos[:b], sin[:b], positions[:b], k[:b], v[:b],
                                   None if mask is None else mask[:b], T)
        return out

    for index, block in enumerate(tqdm(model.layers, desc="GPTQ", unit="block", disable=None, leave=False)):
        for name in BLOCK_LINEARS:
            linear = block.get_submodule(name)
            K = linear.in_features
            H = torch.zeros(K, K, dtype=torch.float32, device=device)
            rows = [0]

            def collect(module, inputs, output, H=H, rows=rows):
                a = inputs[0].reshape(-1, module.in_features).float()  # (tokens, K)
                H.addmm_(a.t(), a)
                rows[0] += a.shape[0]

            handle = linear.register_forward_hook(collect)
            run(block, x)  # earlier linears of this block already quantized
            handle.remove()
            H.mul_(2 / rows[0])
            codes, scales, zeros = gptq_quantize_weight(linear.weight, H, group_size, act_order, damp)
            replace_module(block, name, Int4Linear.from_codes(codes, scales, zeros, linear.bias))
            del H, linear
        x = run(block, x)  # this block's output through its quantized linears: the next one's input
    model.output = Int8Linear.from_float(model.output)
    return {"method": "gptq", "act_order": act_order, "damp": damp, "calibration_samples": n,
            "calibration_seq_len": T}
