"""Load Hugging Face checkpoints into a Transformer; the only module that knows HF tensor names.

Weights are read straight from safetensors (memory-mapped; one file, or shards listed in
model.safetensors.index.json), renamed through one table, checked for shape, cast, and moved
to the device tensor by tensor, so peak host memory stays near one tensor. q/k/v and gate/up
are fused after loading, keeping the checkpoint's own layout (rotate-half RoPE, (out, in)).
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from blitzgen.config import ModelConfig, rope_inv_freq
from blitzgen.errors import BlitzgenError
from blitzgen.model import Transformer

# HF name (layer index as {}) -> our name. q/k/v and gate/up land in pieces and are fused below.
_LAYER_NAMES = {
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.wq.bias",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.wk.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.wv.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attention.wo.bias",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attention.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attention.k_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
# Pieces -> the fused parameter they are concatenated into (along the output dimension).
_FUSED = {
    "attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
    "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3"),
}


def _hf_to_ours(config: ModelConfig) -> dict[str, str]:
    table = dict(_TOP_NAMES)
    for i in range(config.n_layers):
        for hf, ours in _LAYER_NAMES.items():
            table[hf.format(i)] = ours.format(i)
    return table


def _expected_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor we expect from the checkpoint, in our names, before fusion."""
    c = model.config
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    for i in range(c.n_layers):
        a, f = f"layers.{i}.attention", f"layers.{i}.feed_forward"
        del shapes[f"{a}.wqkv.weight"], shapes[f"{f}.w13.weight"]
        shapes[f"{a}.wq.weight"], shapes[f"{a}.wk.weight"], shapes[f"{a}.wv.weight"] = (
            (q, c.dim), (kv, c.dim), (kv, c.dim))
        if c.qkv_bias:
            del shapes[f"{a}.wqkv.bias"]
            shapes[f"{a}.wq.bias"], shapes[f"{a}.wk.bias"], shapes[f"{a}.wv.bias"] = (q,), (kv,), (kv,)
        shapes[f"{f}.w1.weight"] = shapes[f"{f}.w3.weight"] = (c.intermediate_size, c.dim)
    if c.tie_embeddings:
        del shapes["output.weight"]
    return shapes


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BlitzgenError(f"{index}: expected JSON with a 'weight_map' object ({e!r})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise BlitzgenError(f"{f}: missing; {index.name} lists it as a shard")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise BlitzgenError(f"{path}: no model.safetensors or model.safetensors.index.json found")


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16):
    """Build the Transformer for the checkpoint directory `path`, weights on `device` in `dtype`."""
    path = Path(path)
    if not path.is_dir():
        raise BlitzgenError(f"{path}: not a directory; expected a Hugging Face checkpoint directory")
    config = ModelConfig.from_hf(path)
    files = safetensors_files(path)
    with torch.device("meta"):
        model = Transformer(config)
    expected = _expected_shapes(model)
    table = _hf_to_ours(config)

    weights: dict[str, torch.Tensor] = {}
    # A progress bar on a terminal only (disable=None): a 7B model reads for tens of seconds.
    progress = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
                    desc="loading weights", disable=None, leave=False)
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise BlitzgenError(f"{file}: not a readable safetensors file ({e})") from None
        with handle:
            for hf_name in handle.keys():
                if hf_name == "lm_head.weight" and config.tie_embeddings:
                    continue  # some tied checkpoints still store a copy
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue  # older checkpoints saved this buffer; we compute it
                ours = table.get(hf_name)
                if ours not in expected:  # unknown, or a feature this config lacks (a bias, a q/k norm)
                    raise BlitzgenError(f"{file}: unexpected tensor {hf_name!r} for this {config.model_type} config")
                tensor = handle.get_tensor(hf_name)
                if tuple(tensor.shape) != expected[ours]:
                    raise BlitzgenError(
                        f"{file}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, expected {expected[ours]}"
                    )
                weights[ours] = tensor.to(device=device, dtype=dtype)
                progress.update(tensor.nbytes)
    progress.close()
    missing = [name for name in expected if name not in weights]
    if missing:
        hf_names = {v: k for k, v in table.items()}
        names = ", ".join(hf_names.get(m, m) for m in missing[:3])
        raise BlitzgenError(f"{path}: checkpoint is missing {len(missing)} tensor(s), e.g. {names}")

    for i in range(config.n_layers):
        for fused, parts in _FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"layers.{i}.{p}.{kind}" for p in parts]
                if names[0] in weights:
                    weights[f"layers.{i}.{fused}.{kind}"] = torch.cat([weights.pop(n) for n in names])
    if config.tie_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    model.load_state_dict(weights, assign=True, strict=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # assign=True replaced the tied parameter
    model.inv_freq = rope_inv_freq(config).to(device)  # buffers are not in the state dict
    return model.eval()
