"""Tiny random Hugging Face checkpoints, one per architecture variant blitzgen supports.

Each variant is built by transformers itself (the reference nobody here wrote), its weights
re-drawn so that every feature under test changes the output, and saved with save_pretrained
together with a small byte-level BPE tokenizer, exactly as a real checkpoint directory looks.

Why re-draw the weights: transformers initialises Linear weights with std 0.02, RMSNorm weights
to 1 and biases to 0, which makes attention nearly uniform, norms the identity and biases
absent, so a wrong RoPE, a missing norm or a dropped bias would barely move the logits. Here
Linear weights get std 1/sqrt(fan_in) (unit-variance activations, attention scores of std ~1,
so softmax is neither flat nor one-hot), every RMSNorm weight (q_norm / k_norm included) is
drawn around 1, and every bias is drawn non-zero.

The vocabulary is 300 rather than ~128 because a byte-level BPE needs its 256 byte tokens.
"""

import os
import zlib

import pytest
import torch

# On machines without CUDA, Triton kernels run under Triton's interpreter. The variable must be
# set before anything imports triton (transformers' modeling code does), so here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 300
EOS_TOKEN = "<|endoftext|>"  # id 0: the trainer puts special tokens first

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=None,
    eos_token_id=0,
    pad_token_id=None,
)

# name -> (transformers config class, extra config kwargs)
VARIANTS = {
    "llama_gqa1": (transformers.LlamaConfig, dict(num_key_value_heads=4)),
    "llama_gqa2": (transformers.LlamaConfig, dict(num_key_value_heads=2)),
    # Llama 3.1 RoPE scaling with original_max_position_embeddings=32: wavelengths above 32
    # positions are divided by 8 and those between 8 and 32 blended, so half the frequencies
    # of a 16-wide head are changed, visibly at the positions 0..60 the tests use.
    "llama3_rope_gqa4": (
        transformers.LlamaConfig,
        dict(
            num_key_value_heads=1,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "llama_tied": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_bias": (transformers.LlamaConfig, dict(num_key_value_heads=2, attention_bias=True)),
    # Window 8, shorter than the 17- and 40-token prompts the tests use.
    "mistral_window": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=8)),
    "mistral_nowindow": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # head_dim 32 != hidden_size / heads = 16, as in Qwen3-0.6B (16 heads x 128 on a 1024 width).
    "qwen3": (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=32)),
}
_CAUSAL_LM = {
    transformers.LlamaConfig: transformers.LlamaForCausalLM,
    transformers.MistralConfig: transformers.MistralForCausalLM,
    transformers.Qwen2Config: transformers.Qwen2ForCausalLM,
    transformers.Qwen3Config: transformers.Qwen3ForCausalLM,
}

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tiny model writes tiny stories about the sea, the sky and the stars.",
    "Once upon a time there was a small robot who liked to count: one, two, three.",
    "def add(x, y):\n    return x + y\n",
    "Tokens, tokens everywhere; not a word to read.",
]


def seed_for(name: str) -> int:
    """A stable seed per name (Python's hash() of a str changes between runs)."""
    return zlib.crc32(name.encode())


_tokenizer = None


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A GPT-2 / Llama 3 style byte-level BPE of exactly VOCAB_SIZE tokens, id 0 = EOS_TOKEN."""
    global _tokenizer
    if _tokenizer is None:
        tokenizer = HFTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=[EOS_TOKEN],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tokenizer.train_from_iterator(_CORPUS * 5, trainer)
        assert tokenizer.get_vocab_size() == VOCAB_SIZE and tokenizer.token_to_id(EOS_TOKEN) == 0
        _tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN)
    return _tokenizer


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int):
    """Re-draw every parameter so that each one matters (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():  # a tied lm_head is listed once, as embed_tokens
        if "norm" in name:  # input/post-attention/final RMSNorm, Qwen3 q_norm and k_norm
            torch.nn.init.normal_(param, mean=1.0, std=0.3, generator=generator)
        elif name.endswith(".bias"):
            torch.nn.init.normal_(param, mean=0.0, std=0.5, generator=generator)
        elif "embed_tokens" in name:
            # std 0.25: tied models use this as the output layer too, giving logits of std ~2.
            torch.nn.init.normal_(param, mean=0.0, std=0.25, generator=generator)
        else:  # Linear weights (out, in)
            torch.nn.init.normal_(param, mean=0.0, std=param.shape[1] ** -0.5, generator=generator)


def build_tiny_model(variant: str, path, max_shard_size: str | None = None):
    """Build transformers' model for `variant`, randomise it, save it (and the tokenizer) into `path`.

    Returns (hf_model, path); hf_model is fp32, eager attention, in eval mode, with no eos token in
    its generation config so that generate() always runs to max_new_tokens.
    """
    config_class, extra = VARIANTS[variant]
    config = config_class(**_COMMON, **extra)
    config._attn_implementation = "eager"  # the plain softmax(QK^T)V reference
    torch.manual_seed(seed_for(variant))
    model = _CAUSAL_LM[config_class](config).to(torch.float32).eval()
    randomize_weights(model, seed_for(variant))
    if max_shard_size is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    tiny_tokenizer().save_pretrained(path)
    model.generation_config.eos_token_id = None  # in memory only: the saved files keep eos id 0
    return model, path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """get(variant) -> (hf_model, path), each variant built at most once per test module."""
    built = {}

    def get(variant: str):
        if variant not in built:
            built[variant] = build_tiny_model(variant, tmp_path_factory.mktemp(variant))
        return built[variant]

    return get


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny_model(request, tiny_models):
    """(hf_model, path) for every variant in turn."""
    return tiny_models(request.param)
