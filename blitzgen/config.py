"""ModelConfig: the shape of a decoder-only transformer, read from a Hugging Face config.json.

Architectures differ only by flags here (qkv_bias, qk_norm, tie_embeddings, sliding_window,
rope scaling); model.py reads the flags and never the architecture name. The mapping from
Hugging Face config keys is written once, in `from_hf`. Both config layouts in the wild are
read: the older `rope_theta` + `rope_scaling` keys and transformers 5's `rope_parameters`.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from blitzgen.errors import BlitzgenError

# model_type -> (q/k/v projections carry a bias, per-head RMSNorm on q and k before RoPE)
SUPPORTED_MODEL_TYPES = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    dim: int  # hidden size C
    n_layers: int
    n_heads: int  # query heads H
    n_kv_heads: int  # key/value heads Hkv; H % Hkv == 0 (grouped-query attention)
    head_dim: int  # D; not always dim // n_heads (Qwen3-0.6B: 16 heads x 128 on a 1024 width)
    intermediate_size: int  # FFN width I
    max_seq_len: int  # the model's context (max_position_embeddings)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3.1 frequency scaling: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings.
    rope_llama3: tuple[float, float, float, int] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None  # attend to the last `sliding_window` positions only (Mistral v0.1)

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise BlitzgenError(
                f"num_attention_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}"
            )

    @classmethod
    def from_hf(cls, path: str | Path) -> "ModelConfig":
        """Read `path`/config.json (or a config.json file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise BlitzgenError(f"{file}: no such file; a model directory needs a Hugging Face config.json")
        try:
            hf = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BlitzgenError(f"{file}: not valid JSON ({e})") from None
        return cls.from_hf_dict(hf, source=str(file))

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise BlitzgenError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
            )
        qkv_bias, qk_norm = SUPPORTED_MODEL_TYPES[model_type]

        def need(key):
            if key not in hf or hf[key] is None:
                raise BlitzgenError(f"{source}: missing required field {key!r} for model_type {model_type!r}")
            return hf[key]

        if hf.get("hidden_act", "silu") != "silu":
            raise BlitzgenError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (expected 'silu')")
        if hf.get("mlp_bias"):
            raise BlitzgenError(f"{source}: mlp_bias=true is not supported")
        dim, n_heads = need("hidden_size"), need("num_attention_heads")
        head_dim = hf.get("head_dim") or dim // n_heads

        # Rope: transformers 5 writes rope_parameters (with rope_theta inside); older files write
        # rope_theta at the top level and rope_scaling beside it.
        rope = dict(hf.get("rope_scaling") or {})
        rope.update(hf.get("rope_parameters") or {})
        rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_llama3 = None
        if rope_type == "llama3":
            rope_llama3 = (
                float(rope["factor"]),
                float(rope["low_freq_factor"]),
                float(rope["high_freq_factor"]),
                int(rope["original_max_position_embeddings"]),
            )
        elif rope_type != "default":
            raise BlitzgenError(f"{source}: rope type {rope_type!r} is not supported (expected 'default' or 'llama3')")

        sliding_window = None
        if model_type == "mistral":
            sliding_window = hf.get("sliding_window")
        elif hf.get("use_sliding_window"):
            raise BlitzgenError(f"{source}: use_sliding_window=true is not supported for {model_type}")

        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            dim=dim,
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            intermediate_size=need("intermediate_size"),
            max_seq_len=need("max_position_embeddings"),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_llama3=rope_llama3,
            # Llama's attention_bias puts a bias on all four projections; Qwen2 always has one on q/k/v only.
            qkv_bias=qkv_bias or attention_bias,
            o_bias=attention_bias,
            qk_norm=qk_norm,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=sliding_window,
        )


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (D/2,) float32, with Llama 3.1 scaling applied when configured.

    Llama 3.1 (arXiv 2407.21783 and its reference code): wavelengths shorter than
    orig/high_freq_factor keep their frequency, those longer than orig/low_freq_factor are
    divided by `factor`, and the band between blends the two linearly in orig/wavelength.
    Computed in float32 like the reference implementations, so positions rotate identically.
    """
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if config.rope_llama3 is None:
        return inv
    factor, low, high, orig = config.rope_llama3
    wavelen = 2 * math.pi / inv
    smooth = (orig / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    scaled = torch.where(wavelen > orig / low, inv / factor, blended)
    return torch.where(wavelen < orig / high, inv, scaled)


# Real architectures for random-weight benchmarks (`blitzgen bench --arch NAME`), copied field by
# field from each model's published config.json; nothing here is guessed from a name.
PRESETS = {
    "llama-2-7b": ModelConfig(
        model_type="llama", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
        intermediate_size=11008, max_seq_len=4096, norm_eps=1e-5, rope_theta=10000.0,
    ),
    "llama-3.1-8b": ModelConfig(
        model_type="llama", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        intermediate_size=14336, max_seq_len=131072, norm_eps=1e-5, rope_theta=500000.0,
        rope_llama3=(8.0, 1.0, 4.0, 8192),
    ),
    "mistral-7b": ModelConfig(  # v0.3
        model_type="mistral", vocab_size=32768, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        intermediate_size=14336, max_seq_len=32768, norm_eps=1e-5, rope_theta=1000000.0,
    ),
    "qwen2.5-7b": ModelConfig(
        model_type="qwen2", vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128,
        intermediate_size=18944, max_seq_len=32768, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
    ),
}
