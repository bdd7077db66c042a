"""Load Hugging Face checkpoints into a Transformer; the only module that knows HF tensor names.

Weights are read straight from safetensors (memory-mapped; one file, or shards listed in
model.safetensors.index.json), renamed through one table, checked for shape, cast, and moved
to the device tensor by tensor, so peak host memory stays near one tensor. q/k/v and gate/up
are fused after loading, keeping the checkpoint's own layout (rotate-half RoPE, (out, in)).

Quantized checkpoints (written by `blitzgen quantize`, see save_quantized) are recognised by the
"quantization" section of their config.json and loaded without being told the mode.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
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


# ---- quantized checkpoints -------------------------------------------------------------------
# blitzgen's own format: config.json is the source checkpoint's plus a "quantization" section
# (quantize.quantization_metadata: the format of the block linears, the group size, the output
# projection's format, and how the weights were made). Tensors are saved under our module names,
# fused q/k/v and gate/up included, since that is what was quantized.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def save_quantized(model: Transformer, source: str | Path, out: str | Path, section: dict):
    """Write a quantized `model` to directory `out`: model.safetensors, config.json (the one of the
    checkpoint `source` plus the "quantization" `section`) and source's tokenizer and generation files."""
    source, out = Path(source), Path(out)
    hf = json.loads((source / "config.json").read_text())
    hf["quantization"] = section
    # Float tensors (norms, embedding, biases) in the source's own dtype, whatever the run's was.
    stored = {"float32": torch.float32, "float16": torch.float16}.get(hf.get("dtype") or hf.get("torch_dtype"),
                                                                       torch.bfloat16)
    tensors = {}
    for name, t in model.state_dict().items():
        keep = name.endswith((".scales", ".zeros")) or not t.dtype.is_floating_point
        tensors[name] = t.detach().to("cpu", dtype=None if keep else stored).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)


def load_quantized(path: Path, config: ModelConfig, section: dict, files: list[Path],
                   device: torch.device | str, dtype: torch.dtype) -> Transformer:
    """Load a checkpoint written by save_quantized: float tensors (norms, embedding, biases) cast to
    `dtype`, codes, scales and zero points kept as stored."""
    from blitzgen.quantize import build_quantized_shells  # imports Triton: only when a checkpoint needs it

    if not isinstance(section, dict):
        raise BlitzgenError(f"{path}/config.json: 'quantization' must be an object, got {section!r}")
    with torch.device("meta"):
        model = Transformer(config)
    build_quantized_shells(model, section)
    expected = model.state_dict()  # meta tensors: the shape and dtype of every tensor to read
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                if name not in expected:
                    raise BlitzgenError(f"{file}: unexpected tensor {name!r} for this quantized {config.model_type}")
                tensor, want = handle.get_tensor(name), expected[name]
                if tensor.shape != want.shape:
                    raise BlitzgenError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                        f"expected {tuple(want.shape)}")
                keep = name.endswith((".scales", ".zeros")) or not want.dtype.is_floating_point
                if keep and tensor.dtype != want.dtype:
                    raise BlitzgenError(f"{file}: tensor {name!r} is {tensor.dtype}, expected {want.dtype}")
                weights[name] = tensor.to(device=device, dtype=None if keep else dtype)
    missing = [name for name in expected if name not in weights]
    if missing:
        raise BlitzgenError(f"{path}: quantized checkpoint is missing {len(missing)} tensor(s), e.g. {missing[0]}")
    model.load_state_dict(weights, assign=True, strict=True)
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.eval().requires_grad_(False)


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16):
    """Build the Transformer for the checkpoint directory `path`, weights on `device` in `dtype`."""
    path = Path(path)
    if not path.is_dir():
        raise BlitzgenError(f"{path}: not a directory; expected a Hugging Face checkpoint directory")
    config = ModelConfig.from_hf(path)
    files = safetensors_files(path)
    hf = json.loads((path / "config.json").read_text())
    if "quantization" in hf:  # written by `blitzgen quantize`
        return load_quantized(path, config, hf["quantization"], files, device, dtype)
    if "quantization_config" in hf:
        raise BlitzgenError(f"{path}: pre-quantized Hugging Face checkpoints "
                            f"({hf['quantization_config'].get('quant_method', '?')}) are not supported; "
                            f"quantize the original weights with `blitzgen quantize`")
    with torch.device("meta"):
        model = Transformer(config)
    expected = _expected_shapes(model)
    table = _hf_to_ours(config)

    weights: dict[str, torch.Tensor] = {}
    # A progress bar on a terminal only (disable=None): a 7B model reads for tens of seconds.
    # `with` closes (and clears) it before an error line is printed.
    with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
              desc="loading weights", disable=None, leave=False) as progress:
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
    return model.eval().requires_grad_(False)
