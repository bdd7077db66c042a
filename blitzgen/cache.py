"""The static KV cache: fixed-size K/V buffers for every layer plus one live length per slot.

A slot is one row of the batch dimension: one sequence (a prompt and what was generated
after it). Buffers never change shape, so a compiled, graph-captured decode step can read
and write them at fixed addresses; how much of a slot is live is `lengths[slot]`, a device
tensor, so the step never needs the host to tell it.

Layout (L, B, S, Hkv, D), the layout of FlashAttention's and flash-decoding's KV caches:
a token's K for all heads is one contiguous row, so writing a step's keys is one scatter.
Positions at or past a slot's length hold stale values from an earlier, longer sequence;
attention never reads them because a query at position p only sees keys at positions <= p.
"""

import torch

from blitzgen.config import ModelConfig


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (config.n_layers, batch_size, max_seq_len, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, S, Hkv, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, S, Hkv, D)
        # Next position to write for each slot == number of live tokens in it.
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=device)  # (B,)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]
