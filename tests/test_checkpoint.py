"""Loading checkpoints (blitzgen.checkpoint) and reading config.json (blitzgen.config).

Good checkpoints are written by transformers' save_pretrained; broken ones are made by editing
a saved directory the way a bad download or a wrong file would be. Every error must be a
one-line BlitzgenError that names the file and the offending value.
"""

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from blitzgen.cache import KVCache
from blitzgen.checkpoint import load_model
from blitzgen.config import ModelConfig, rope_inv_freq
from blitzgen.errors import BlitzgenError
from conftest import build_tiny_model

# Same reasoning as test_model.py: fp32 on both sides, only the order of operations differs.
ATOL = 1e-4


@torch.inference_mode()
def assert_matches_transformers(hf_model, path):
    model = load_model(path, dtype=torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (20,), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.config, batch_size=1, max_seq_len=32, dtype=torch.float32, device="cpu")
    window = model.config.sliding_window
    ours = model(tokens[None], torch.arange(20)[None], cache, kv_len=20, causal_from_zero=window is None)[0]
    theirs = hf_model(tokens[None]).logits[0]
    assert (ours - theirs).abs().max().item() < ATOL


def load_error(path) -> str:
    with pytest.raises(BlitzgenError) as info:
        load_model(path, dtype=torch.float32)
    message = str(info.value)
    assert "\n" not in message, f"error is not one line: {message!r}"
    return message


def edit_tensors(file, edit):
    """Rewrite a safetensors file with edit(dict of tensors) applied."""
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture
def llama_copy(tiny_models, tmp_path):
    """A fresh, editable copy of the saved llama_gqa2 checkpoint (one safetensors file)."""
    path = tmp_path / "llama"
    shutil.copytree(tiny_models("llama_gqa2")[1], path)
    assert (path / "model.safetensors").is_file()
    return path


@pytest.fixture(scope="module")
def sharded_models(tmp_path_factory):
    """Two variants saved in 30 KB shards: untied llama and tied qwen2 with q/k/v biases."""
    return {
        variant: build_tiny_model(variant, tmp_path_factory.mktemp(f"{variant}_sharded"), max_shard_size="30KB")
        for variant in ("llama_gqa2", "qwen2")
    }


@pytest.fixture
def sharded_copy(sharded_models, tmp_path):
    path = tmp_path / "sharded"
    shutil.copytree(sharded_models["llama_gqa2"][1], path)
    return path


# ---- good checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llama_gqa2", "qwen2"])
def test_sharded_checkpoint_loads_and_matches(sharded_models, variant):
    hf_model, path = sharded_models[variant]
    assert (path / "model.safetensors.index.json").is_file()
    assert not (path / "model.safetensors").exists()
    assert len(list(path.glob("model-*.safetensors"))) >= 3
    assert_matches_transformers(hf_model, path)


def test_weights_are_loaded_exactly(tiny_models):
    """Loading is renaming and concatenating: fp32 in, the same bits out."""
    hf_model, path = tiny_models("qwen2")
    model = load_model(path, dtype=torch.float32)
    hf_layer = hf_model.model.layers[1]
    attention = model.layers[1].attention
    expected_qkv = torch.cat([hf_layer.self_attn.q_proj.weight, hf_layer.self_attn.k_proj.weight,
                              hf_layer.self_attn.v_proj.weight])
    assert torch.equal(attention.wqkv.weight, expected_qkv)
    expected_bias = torch.cat([hf_layer.self_attn.q_proj.bias, hf_layer.self_attn.k_proj.bias,
                               hf_layer.self_attn.v_proj.bias])
    assert torch.equal(attention.wqkv.bias, expected_bias)
    expected_w13 = torch.cat([hf_layer.mlp.gate_proj.weight, hf_layer.mlp.up_proj.weight])
    assert torch.equal(model.layers[1].feed_forward.w13.weight, expected_w13)
    # Tied: one tensor serves as embedding and output layer.
    assert model.output.weight is model.tok_embeddings.weight
    assert torch.equal(model.output.weight, hf_model.lm_head.weight)


def test_bf16_load_casts_every_parameter(tiny_models):
    model = load_model(tiny_models("qwen3")[1], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32  # RoPE frequencies stay fp32, as in transformers


def test_tied_checkpoint_that_also_stores_lm_head_loads(tiny_models, tmp_path):
    """Some tied checkpoints still store lm_head.weight (a copy of the embedding); it must be ignored."""
    hf_model, saved = tiny_models("qwen2")
    path = tmp_path / "qwen2"
    shutil.copytree(saved, path)
    edit_tensors(path / "model.safetensors",
                 lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    assert_matches_transformers(hf_model, path)


def test_old_checkpoint_with_rotary_inv_freq_loads(tiny_models, tmp_path):
    hf_model, saved = tiny_models("llama_gqa2")
    path = tmp_path / "llama"
    shutil.copytree(saved, path)
    edit_tensors(path / "model.safetensors",
                 lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)))
    assert_matches_transformers(hf_model, path)


# ---- errors --------------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    message = load_error(tmp_path / "no_such_model")
    assert "no_such_model" in message and "directory" in message


def test_directory_without_config(tmp_path):
    message = load_error(tmp_path)
    assert "config.json" in message and str(tmp_path) in message


def test_invalid_json_config(llama_copy):
    (llama_copy / "config.json").write_text('{"model_type": "llama", ')
    message = load_error(llama_copy)
    assert "config.json" in message and "JSON" in message


def test_unknown_model_type_lists_supported(llama_copy):
    edit_config(llama_copy, model_type="gpt2")
    message = load_error(llama_copy)
    assert "config.json" in message and "gpt2" in message
    for supported in ("llama", "mistral", "qwen2", "qwen3"):
        assert supported in message


def test_missing_safetensors(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    message = load_error(llama_copy)
    assert str(llama_copy) in message and "model.safetensors" in message


def test_wrong_tensor_shape_names_tensor_and_both_shapes(llama_copy):
    name = "model.layers.1.self_attn.k_proj.weight"  # (Hkv * D, C) = (32, 64)
    edit_tensors(llama_copy / "model.safetensors", lambda t: t.__setitem__(name, torch.zeros(48, 64)))
    message = load_error(llama_copy)
    assert "model.safetensors" in message and name in message
    assert "(48, 64)" in message and "(32, 64)" in message


def test_missing_tensor_is_named(llama_copy):
    name = "model.layers.1.mlp.down_proj.weight"
    edit_tensors(llama_copy / "model.safetensors", lambda t: t.pop(name))
    message = load_error(llama_copy)
    assert str(llama_copy) in message and name in message


def test_unexpected_tensor_is_named(llama_copy):
    name = "model.layers.2.mlp.down_proj.weight"  # a third layer in a two-layer config
    edit_tensors(llama_copy / "model.safetensors", lambda t: t.__setitem__(name, torch.zeros(64, 128)))
    message = load_error(llama_copy)
    assert "model.safetensors" in message and name in message


@pytest.mark.parametrize("name, shape", [
    ("model.layers.0.self_attn.q_proj.bias", (64,)),  # a bias in a config without attention_bias
    ("model.layers.0.self_attn.q_norm.weight", (16,)),  # Qwen3's q_norm in a llama checkpoint
])
def test_tensor_of_a_feature_the_config_lacks_is_unexpected(llama_copy, name, shape):
    """HF names blitzgen knows, but that this config does not use: a clear error, not a KeyError."""
    edit_tensors(llama_copy / "model.safetensors", lambda t: t.__setitem__(name, torch.zeros(shape)))
    message = load_error(llama_copy)
    assert "model.safetensors" in message and name in message


def test_shard_listed_in_index_but_missing(sharded_copy):
    index = json.loads((sharded_copy / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (sharded_copy / shard).unlink()
    message = load_error(sharded_copy)
    assert shard in message and "model.safetensors.index.json" in message


def test_corrupt_safetensors_file(llama_copy):
    (llama_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    message = load_error(llama_copy)
    assert "model.safetensors" in message


# ---- config.json ---------------------------------------------------------------------------------

# Written the way pre-transformers-5 checkpoints are: rope_theta at the top level and rope_scaling
# beside it (meta-llama/Llama-3.1-8B's values, on a tiny model), or no scaling (Qwen2.5's theta).
OLD_STYLE_CONFIGS = {
    "llama3.1": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=300, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu", rope_theta=500000.0,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        tie_word_embeddings=False, torch_dtype="bfloat16",
    ),
    "qwen2.5": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=300, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu", rope_theta=1000000.0,
        rope_scaling=None, sliding_window=32768, use_sliding_window=False, tie_word_embeddings=True,
    ),
}


@pytest.mark.parametrize("name", list(OLD_STYLE_CONFIGS))
def test_old_style_config_gives_transformers_rope(tmp_path, name):
    hf_dict = OLD_STYLE_CONFIGS[name]
    (tmp_path / "config.json").write_text(json.dumps(hf_dict))
    config = ModelConfig.from_hf(tmp_path)
    assert config.rope_theta == hf_dict["rope_theta"]
    assert config.n_kv_heads == hf_dict["num_key_value_heads"]
    assert config.norm_eps == hf_dict["rms_norm_eps"]
    assert config.tie_embeddings == hf_dict["tie_word_embeddings"]
    assert config.sliding_window is None
    if hf_dict["rope_scaling"]:
        assert config.rope_llama3 == (8.0, 1.0, 4.0, 8192)

    hf_config = transformers.AutoConfig.from_pretrained(tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    theirs = hf_model.model.rotary_emb.inv_freq
    ours = rope_inv_freq(config)
    # Same float32 formula on both sides; a few float32 operations apart at most (eps 1.2e-7).
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    if hf_dict["rope_scaling"]:
        # The scaling must actually change something at these sizes, or the comparison proves little.
        assert not torch.allclose(ours, rope_inv_freq(ModelConfig.from_hf_dict({**hf_dict, "rope_scaling": None})))


def test_config_reads_head_dim_and_flags(tiny_models):
    qwen3 = ModelConfig.from_hf(tiny_models("qwen3")[1])
    assert (qwen3.head_dim, qwen3.qk_norm, qwen3.qkv_bias) == (32, True, False)
    qwen2 = ModelConfig.from_hf(tiny_models("qwen2")[1] / "config.json")
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.tie_embeddings) == (True, False, True)
    mistral = ModelConfig.from_hf(tiny_models("mistral_window")[1])
    assert mistral.sliding_window == 8
    llama_bias = ModelConfig.from_hf(tiny_models("llama_bias")[1])
    assert (llama_bias.qkv_bias, llama_bias.o_bias) == (True, True)


@pytest.mark.parametrize("change, words", [
    ({"num_key_value_heads": 3}, ["num_attention_heads=4", "num_key_value_heads=3"]),
    ({"hidden_act": "gelu"}, ["hidden_act", "gelu"]),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, ["yarn"]),
    ({"hidden_size": None}, ["hidden_size"]),
])
def test_bad_config_values_are_named(tiny_models, tmp_path, change, words):
    config = json.loads((tiny_models("llama_gqa2")[1] / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BlitzgenError) as info:
        ModelConfig.from_hf(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message
