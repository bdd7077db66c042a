"""rope_cache_write (Triton, under TRITON_INTERPRET=1 on CPU) against its reference and transformers' RoPE."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from blitzgen.config import ModelConfig, rope_inv_freq
from blitzgen.errors import BlitzgenError
from blitzgen.kernels.rope_cache import rope_cache_write, rope_cache_write_ref
from blitzgen.model import rope_cos_sin

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, H, Hkv, D, S, dtype, seed=0):
    """As the decode step has them: qkv (B, 1, (H + 2 Hkv) D) from the fused product, cos / sin (B, 1, D),
    positions (B, 1), and caches with garbage and the batch stride of a layer of an (L, B, S, Hkv, D) buffer."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, 1, (H + 2 * Hkv) * D, generator=g).to(dtype)
    config = ModelConfig(model_type="llama", vocab_size=8, dim=H * D, n_layers=1, n_heads=H, n_kv_heads=Hkv,
                         head_dim=D, intermediate_size=8, max_seq_len=S, norm_eps=1e-5)
    positions = torch.randint(0, S, (B, 1), generator=g)
    cos, sin = rope_cos_sin(rope_inv_freq(config), positions, dtype)  # (B, 1, D)
    k_cache = torch.randn(2, B, S, Hkv, D, generator=g).to(dtype)[1]
    v_cache = torch.randn(2, B, S, Hkv, D, generator=g).to(dtype)[1]
    return tuple(t.to(DEVICE) for t in (qkv, cos, sin, positions, k_cache, v_cache))


# GQA 1, 4, 8 and head dims 64, 128 and an odd half (D = 6: 3 rotated pairs, no power of two).
@pytest.mark.parametrize("B,H,Hkv,D", [(1, 4, 4, 64), (3, 8, 2, 128), (2, 8, 1, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_and_transformers(B, H, Hkv, D, dtype):
    qkv, cos, sin, positions, k_cache, v_cache = _inputs(B, H, Hkv, D, 37, dtype)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    q_ref, lengths_ref = rope_cache_write_ref(qkv, cos, sin, positions, kc_ref, vc_ref, H)
    q_out, lengths = rope_cache_write(qkv, cos, sin, positions, k_cache, v_cache, H)
    assert lengths.dtype == torch.int64 and torch.equal(lengths, positions[:, 0] + 1)
    assert torch.equal(lengths_ref, lengths)
    # float32 math rounded once against the reference's per-product rounding: one ulp in 16-bit dtypes.
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 * torch.finfo(dtype).eps, atol=1e-2)
    assert q_out.shape == (B, H, D)
    torch.testing.assert_close(q_out, q_ref, **tol)
    torch.testing.assert_close(k_cache, kc_ref, **tol)  # untouched positions must be equal too
    assert torch.equal(v_cache, vc_ref)  # v is copied, bit for bit
    # transformers' own RoPE on (B, heads, T=1, D), in float32
    q, k, _ = qkv.float().view(B, H + 2 * Hkv, 1, D).split([H, Hkv, Hkv], dim=1)
    qt, kt = apply_rotary_pos_emb(q, k, cos.float(), sin.float())
    rows = torch.arange(B, device=qkv.device)
    torch.testing.assert_close(q_out.float(), qt[:, :, 0], **tol)
    torch.testing.assert_close(k_cache[rows, positions[:, 0]].float(), kt[:, :, 0], **tol)


def test_shapes_that_do_not_fit_are_clear_errors():
    qkv, cos, sin, positions, k_cache, v_cache = _inputs(2, 4, 2, 8, 9, torch.float32)
    with pytest.raises(BlitzgenError, match="shapes do not fit"):
        rope_cache_write(qkv, cos, sin, positions, k_cache, v_cache, 3)  # 3 heads: qkv is too wide
    with pytest.raises(BlitzgenError, match="shapes do not fit"):
        rope_cache_write(qkv, cos, sin, positions[:1], k_cache, v_cache, 4)
