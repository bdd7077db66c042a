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
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, generator=g).to(dtype)  # as the fused wqkv product gives them
    q, k, v = (t.view(B, -1, D) for t in qkv.split([H * D, Hkv * D, Hkv * D], dim=-1))
    config = ModelConfig(model_type="llama", vocab_size=8, dim=H * D, n_layers=1, n_heads=H, n_kv_heads=Hkv,
                         head_dim=D, intermediate_size=8, max_seq_len=S, norm_eps=1e-5)
    positions = torch.randint(0, S, (B,), generator=g)
    cos, sin = rope_cos_sin(rope_inv_freq(config), positions[:, None], dtype)  # (B, 1, D)
    # Caches with garbage and a batch stride of a wider (L, B, S, Hkv, D) buffer's layer view.
    k_cache = torch.randn(2, B, S, Hkv, D, generator=g).to(dtype)[1]
    v_cache = torch.randn(2, B, S, Hkv, D, generator=g).to(dtype)[1]
    tensors = (q, k, v, cos[:, 0], sin[:, 0], positions, k_cache, v_cache)
    return tuple(t.to(DEVICE) for t in tensors)


# GQA 1, 4, 8 and head dims 64, 128 and an odd half (D = 6: 3 rotated pairs, no power of two).
@pytest.mark.parametrize("B,H,Hkv,D", [(1, 4, 4, 64), (3, 8, 2, 128), (2, 8, 1, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_and_transformers(B, H, Hkv, D, dtype):
    q, k, v, cos, sin, positions, k_cache, v_cache = _inputs(B, H, Hkv, D, 37, dtype)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    q_ref = rope_cache_write_ref(q, k, v, cos, sin, positions, kc_ref, vc_ref)
    q_out = rope_cache_write(q, k, v, cos, sin, positions, k_cache, v_cache)
    # float32 math rounded once against the reference's per-product rounding: one ulp in 16-bit dtypes.
    tol = dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 * torch.finfo(dtype).eps, atol=1e-2)
    torch.testing.assert_close(q_out, q_ref, **tol)
    torch.testing.assert_close(k_cache, kc_ref, **tol)  # untouched positions must be equal too
    assert torch.equal(v_cache, vc_ref)  # v is copied, bit for bit
    # transformers' own RoPE on (B, heads, T=1, D), in float32
    qt, kt = apply_rotary_pos_emb(q.float()[:, :, None], k.float()[:, :, None], cos.float()[:, None], sin.float()[:, None])
    rows = torch.arange(B, device=q.device)
    torch.testing.assert_close(q_out.float(), qt[:, :, 0], **tol)
    torch.testing.assert_close(k_cache[rows, positions].float(), kt[:, :, 0], **tol)


def test_shapes_that_do_not_fit_are_clear_errors():
    q, k, v, cos, sin, positions, k_cache, v_cache = _inputs(2, 4, 2, 8, 9, torch.float32)
    with pytest.raises(BlitzgenError, match="shapes do not fit"):
        rope_cache_write(q, k[:, :1], v, cos, sin, positions, k_cache, v_cache)
    with pytest.raises(BlitzgenError, match="shapes do not fit"):
        rope_cache_write(q, k, v, cos, sin, positions[:1], k_cache, v_cache)
