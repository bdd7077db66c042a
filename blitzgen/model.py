"""The transformer: Llama, Mistral, Qwen2 and Qwen3 dense models, one module read top to bottom.

Follows Hugging Face transformers' modeling_llama / modeling_qwen3 (rotate-half RoPE, RMSNorm
in float32, SiLU-gated FFN), which the tests compare against. Architectures differ only by
ModelConfig flags. q/k/v and gate/up are stored fused (`wqkv`, `w13`) so a decode step reads
each layer with four matrix products; checkpoint.py fuses them after loading. In a decode step of
few sequences, Block.gemv_decode runs those four through kernels/gemv.py with the norms, the gate
and the residual adds fused into them, and for one sequence RoPE and the K/V cache write in the first
(the same math; on by default on CUDA for one sequence, bf16 or int8 weights, see Generator).

Shape legend: B batch (cache slots in this call), T tokens this step, S cache length,
H / Hkv query / key-value heads, G = H // Hkv, D head dim, C model width, I FFN width,
V vocabulary.

Attention reads the static cache (cache.py). A query at position p sees cache positions
<= p (and > p - sliding_window), which is all the causal mask needs: no separate length
argument, and stale cache entries past p are never read.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from blitzgen.cache import KVCache
from blitzgen.config import ModelConfig, rope_inv_freq
from blitzgen.kernels.decode_attention import decode_attention, decode_attention_ref
from blitzgen.kernels.gemv import gemv, gemv_rope_cache
from blitzgen.kernels.rope_cache import rope_cache_write
from blitzgen.quantize import Int4Linear, Int8Linear


# Packed int4 layers of bf16 models take kernels/gemv.py's one-row products (its int8-activation loop, with the
# norms, gate, residuals and RoPE fused) instead of kernels/gemv_a8.py beside Inductor's kernels: on an H200 a
# Llama-2-7B int4 step 1.972 ms against 2.325 (507.2 against 430.1 tokens/s, 206 launches against 545; 1.813 ms
# with the tiles tuned after; BENCHMARKS.md, 2026-12-02 session 12). Session 11's first version of that loop was
# slower (3.822 ms).
GEMV_INT4 = True


def gemv_args(linear: nn.Module, dtype: torch.dtype = torch.bfloat16, int4: bool | None = None) -> dict | None:
    """kernels/gemv.py's weight arguments for a product in a model of `dtype`: an nn.Linear's weight and bias, an
    Int8Linear's codes, per-row scales and bias, or (bf16, `int4`, by default GEMV_INT4) an Int4Linear's packed
    codes, group scales, zeros and bias; None for what it does not read. Block.gemv_decode passes int4=True: the
    flag was read when the Generator turned the layer's kernels on, and changing it later must not strand them."""
    if type(linear) is nn.Linear:
        return dict(weight=linear.weight, bias=linear.bias)
    if type(linear) is Int8Linear:
        return dict(weight=linear.weight, bias=linear.bias, scales=linear.scales)
    int4 = GEMV_INT4 if int4 is None else int4
    if type(linear) is Int4Linear and int4 and dtype == torch.bfloat16 and linear.group_size % 32 == 0:
        return dict(weight=linear.packed, bias=linear.bias, scales=linear.scales, zeros=linear.zeros)
    return None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale after casting back, as the reference implementations do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin (B, T, D) for integer positions (B, T), in rotate-half layout."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, h, D); cos, sin (B, T, D). Rotates pairs (i, i + D/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def attention_mask(positions: torch.Tensor, kv_len: int, sliding_window: int | None) -> torch.Tensor:
    """Boolean (B, 1, T, kv_len): query at position p may see keys at positions in (p - window, p]."""
    kv_pos = torch.arange(kv_len, device=positions.device)
    q_pos = positions[:, None, :, None]  # (B, 1, T, 1)
    mask = kv_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (kv_pos > q_pos - sliding_window)
    return mask


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.sliding_window = config.sliding_window
        # Decode through the split-KV Triton kernel (kernels/decode_attention.py), which reads only the
        # live keys; off, through its plain-PyTorch twin over the whole cache under a length mask.
        # Generator turns it on for CUDA (interpreted on a CPU under TRITON_INTERPRET=1: tests only).
        self.decode_kernel = False
        # With decode_kernel: RoPE and the K/V cache write of a decode step as one Triton kernel
        # (kernels/rope_cache.py) instead of Inductor's four; off until measured (Generator(rope_kernel=)).
        self.rope_kernel = False
        qkv_out = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, qkv_out, bias=config.qkv_bias)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, positions, k_cache, v_cache, mask, kv_len, rows=None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C): the q/k/v product, attend() and the output product."""
        return self.wo(self.attend(self.wqkv(x), cos, sin, positions, k_cache, v_cache, mask, kv_len, rows))

    def attend(
        self,
        qkv: torch.Tensor,  # (B, T, (H + 2 Hkv) D), the output of wqkv
        cos: torch.Tensor,  # (B, T, D)
        sin: torch.Tensor,  # (B, T, D)
        positions: torch.Tensor,  # (B, T)
        k_cache: torch.Tensor,  # (B, S, Hkv, D), this layer's cache rows for these sequences
        v_cache: torch.Tensor,  # (B, S, Hkv, D)
        mask: torch.Tensor | None,  # (B, 1, T, kv_len); None for plain causal from position 0, or T == 1
        kv_len: int,  # how many cache positions to attend over (a host-side bound)
        rows: torch.Tensor | None = None,  # (B, 1): k_cache / v_cache are a whole layer and these are the
        # sequences' cache rows (a batched prefill of scattered slots); None: row b is sequence b
    ) -> torch.Tensor:
        """RoPE, the cache write and attention over the cache -> (B, T, H D), before the output product."""
        B, T, _ = qkv.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if T == 1 and self.decode_kernel and self.rope_kernel and rows is None and self.q_norm is None:
            # The decode step with the kernels on: one kernel rotates q and k and writes k and v to the
            # cache (kernels/rope_cache.py), then the split-KV kernel reads only the live keys.
            q1, lengths = rope_cache_write(qkv, cos, sin, positions, k_cache, v_cache, H)  # (B, H, D), (B,)
            out = decode_attention(q1, k_cache, v_cache, lengths, self.sliding_window)  # (B, H, D)
            return out.view(B, 1, H * D)
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D)
        k = k.view(B, T, Hkv, D)
        v = v.view(B, T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        gathered = rows is not None
        if not gathered:
            rows = torch.arange(B, device=qkv.device)[:, None]  # (B, 1)
        k_cache.index_put_((rows, positions), k)  # k_cache[rows[b], positions[b, t]] = k[b, t]
        v_cache.index_put_((rows, positions), v)

        if gathered:  # copies of the sequences' rows, read after the writes above
            keys, values = k_cache[rows[:, 0], :kv_len], v_cache[rows[:, 0], :kv_len]  # (B, kv_len, Hkv, D)
        else:
            keys, values = k_cache[:, :kv_len], v_cache[:, :kv_len]  # (B, kv_len, Hkv, D)
        if T == 1:
            # The query at position p sees keys at positions <= p: p + 1 live keys, a device tensor, so
            # one captured graph serves every length. The kernel reads only those; the reference
            # reads all kv_len under a mask.
            lengths = positions[:, 0] + 1  # (B,)
            if self.decode_kernel:
                k_src, v_src = (keys, values) if gathered else (k_cache, v_cache)
                out = decode_attention(q[:, 0], k_src, v_src, lengths, self.sliding_window)  # (B, H, D)
            else:
                out = decode_attention_ref(q[:, 0], keys, values, lengths, self.sliding_window)
            out = out.view(B, 1, H * D)
        else:
            keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # (B, Hkv, kv_len, D)
            if mask is not None and H != Hkv:
                # A masked chunk (prefill after a cached prefix) runs in the memory-efficient
                # kernel, which takes a mask but not grouped heads: give it H heads of K/V.
                keys = keys.repeat_interleave(H // Hkv, dim=1)  # (B, H, kv_len, D)
                values = values.repeat_interleave(H // Hkv, dim=1)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),  # (B, H, T, D)
                keys,
                values,
                attn_mask=mask,
                is_causal=mask is None,
                enable_gqa=keys.shape[1] != H,
            )  # (B, H, T, D)
            out = out.transpose(1, 2).reshape(B, T, H * D)
        return out


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.w13 = nn.Linear(config.dim, 2 * config.intermediate_size, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.intermediate_size, dim=-1)  # (B, T, I) each
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)
        # Decode steps of one sequence run their four products through kernels/gemv.py, with the norms, the
        # SiLU gate and the residual adds fused into them (gemv_decode below). Generator(gemv_kernels=) sets it,
        # only where gemv.py reads all four (gemv_args: float, int8, or int4 in bf16 models).
        self.gemv_kernels = False

    def forward(self, x, cos, sin, positions, k_cache, v_cache, mask, kv_len, rows=None):
        if x.shape[:2] == (1, 1) and self.gemv_kernels and rows is None:
            return self.gemv_decode(x, cos, sin, positions, k_cache, v_cache, kv_len)
        h = x + self.attention(self.attention_norm(x), cos, sin, positions, k_cache, v_cache, mask, kv_len, rows)
        return h + self.feed_forward(self.ffn_norm(h))

    def gemv_decode(self, x, cos, sin, positions, k_cache, v_cache, kv_len):
        """forward for one token of one sequence, x (1, 1, C): the same math in four GEMV launches around
        attention, where Inductor makes six to eight kernels of the products, norms and adds (and three to four
        more of RoPE and the cache write, which the first launch does too)."""
        att, ffn, C = self.attention, self.feed_forward, x.shape[-1]

        def args(linear):  # the Generator decided which layers take gemv.py (gemv_args' int4)
            return gemv_args(linear, x.dtype, int4=True)

        x = x.view(1, C)
        norm = dict(norm_weight=self.attention_norm.weight, eps=self.attention_norm.eps)
        if att.decode_kernel and att.q_norm is None:
            # RoPE and the cache write happen in the product's epilogue, one launch instead of the product plus
            # Inductor's rotation and scatter kernels (kernels/gemv.py, gemv_rope_cache).
            q, lengths = gemv_rope_cache(x, **args(att.wqkv), **norm, cos=cos, sin=sin, positions=positions,
                                         k_cache=k_cache, v_cache=v_cache, n_heads=att.n_heads)
            out = decode_attention(q, k_cache, v_cache, lengths, att.sliding_window).view(1, 1, -1)  # (1, 1, H D)
        else:  # q/k norms (Qwen3) come between the product and RoPE; or no decode attention kernel
            qkv = gemv(x, **args(att.wqkv), **norm)  # (1, (H + 2 Hkv) D)
            out = att.attend(qkv.view(1, 1, -1), cos, sin, positions, k_cache, v_cache, None, kv_len)  # (1, 1, H D)
        h = gemv(out.view(1, -1), **args(att.wo), residual=x)  # (1, C)
        act = gemv(h, **args(ffn.w13), norm_weight=self.ffn_norm.weight, eps=self.ffn_norm.eps, gate_up=True)
        return gemv(act, **args(ffn.w2), residual=h).view(1, 1, C)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)  # (D/2,)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor):
        """x (B, T, C): the tokens' embeddings, and cos, sin (B, T, D): their positions' RoPE rotation."""
        x = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        return x, cos, sin

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) int64
        positions: torch.Tensor,  # (B, T) int64, each row's cache positions for these tokens
        cache: KVCache,
        slots: slice | torch.Tensor = slice(None),  # which cache rows these B sequences occupy: a slice, or
        # (B,) row indices (batched prefill of scattered slots: each layer's rows are gathered, not viewed)
        kv_len: int | None = None,  # attend over cache[:kv_len]; a bound on positions + 1. None: whole cache
        causal_from_zero: bool = False,  # every row starts at position 0 with no window: use plain causal SDPA
        last_only: bool = False,  # logits of the last token only (prefill), saves a (T, V) product
        last_index: torch.Tensor | None = None,  # (B,): logits at each row's own index instead (padded rows)
        run_block=None,  # calls a Block; the Generator passes one compiled call that every layer shares
        run_embed=None,  # calls Transformer.embed; the Generator passes a compiled call
    ) -> torch.Tensor:
        kv_len = cache.max_seq_len if kv_len is None else kv_len
        T = tokens.shape[1]
        # One token: decode attention finds its live keys from the positions, no mask.
        need_mask = T > 1 and not causal_from_zero
        mask = attention_mask(positions, kv_len, self.config.sliding_window) if need_mask else None
        x, cos, sin = (run_embed or Transformer.embed)(self, tokens, positions)
        run_block = run_block or Block.__call__
        for i, layer in enumerate(self.layers):
            if isinstance(slots, torch.Tensor):
                x = run_block(layer, x, cos, sin, positions, cache.k[i], cache.v[i], mask, kv_len, slots[:, None])
            else:
                x = run_block(layer, x, cos, sin, positions, cache.k[i, slots], cache.v[i, slots], mask, kv_len)
        if last_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last_index][:, None]  # (B, 1, C)
        elif last_only:
            x = x[:, -1:]
        B, T, C = x.shape
        output = gemv_args(self.output, x.dtype)
        if (B, T) == (1, 1) and self.layers[0].gemv_kernels and output is not None:
            # Decode: the final norm folded into the output product, as the blocks' products (Block.gemv_decode).
            logits = gemv(x.view(B, C), **output, norm_weight=self.norm.weight, eps=self.norm.eps)
            return logits.view(B, 1, -1)
        return self.output(self.norm(x))  # (B, T or 1, V)
