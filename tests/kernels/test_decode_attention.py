"""decode_attention: the Triton kernels against decode_attention_ref, and the reference against SDPA.

Without a GPU the kernels run under TRITON_INTERPRET=1 (see conftest.py), so sizes stay small; tile
and split sizes are then forced small too (block_n 16, a few splits) so every test crosses several
tiles and splits. Tolerances (outputs are averages of values of magnitude <= ~4):
- float32: 1e-5. Same math in another summation order, exp2 for exp: ~1e-6 apart.
- bfloat16: 2e-2. The kernel rounds the probabilities to bf16 before P.V (relative error <= 2**-9
  each, so <= 2**-9 * max|v| ~ 8e-3) and rounds the output to bf16 (<= 2**-9 * |out|).
- float16: 4e-3. The same with 2**-11.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blitzgen.errors import BlitzgenError
from blitzgen.kernels import decode_attention as da
from blitzgen.kernels.decode_attention import decode_attention, decode_attention_ref
from blitzgen.model import attention_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU, the interpreter runs the kernels
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
SMALL = dict(block_n=16, split_min=16)  # interpreter-sized tiles and splits


def make_inputs(B, H, Hkv, D, S, dtype, seed=0):
    """q scaled by 2 so the softmax is peaked rather than flat (the running max matters)."""
    g = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(B, H, D, generator=g)
    k = torch.randn(B, S, Hkv, D, generator=g)
    v = torch.randn(B, S, Hkv, D, generator=g)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def check(out, q, k, v, lengths, window=None):
    ref = decode_attention_ref(q, k, v, lengths, window)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[q.dtype], rtol=0)


# (B, H, Hkv, D, S, lengths, sliding_window, dtype, launch overrides)
CASES = {
    "mha_fp32_ragged": (3, 2, 2, 64, 80, [1, 37, 80], None, torch.float32, dict(num_splits=4, **SMALL)),
    "gqa4_bf16_d128": (3, 8, 2, 128, 70, [1, 50, 70], None, torch.bfloat16, dict(num_splits=3, **SMALL)),
    "gqa8_fp16_d64": (2, 8, 1, 64, 100, [100, 17], None, torch.float16, dict(num_splits=5, **SMALL)),
    "gqa3_fp32_d96": (2, 6, 2, 96, 50, [33, 50], None, torch.float32, dict(num_splits=2, **SMALL)),
    # 40 splits (merged as 32 + 8 rows): 32 columns a merge program, and 80 = 32 + 32 + 16 leaves the last half masked
    "gqa2_bf16_d80_merge_chunks": (2, 4, 2, 80, 70, [70, 5], None, torch.bfloat16, dict(num_splits=40, **SMALL)),
    # 100 splits (merged as 64 + 64 rows, the last 28 padding): 16 columns a merge program
    "gqa4_fp32_d128_merge_chunks": (1, 8, 2, 128, 300, [300], None, torch.float32, dict(num_splits=100, **SMALL)),
    "window_bf16": (2, 4, 1, 64, 90, [90, 25], 20, torch.bfloat16, dict(num_splits=3, **SMALL)),
    "window_fp32_wider_than_live": (2, 4, 2, 32, 40, [7, 40], 30, torch.float32, dict(num_splits=2, **SMALL)),
    "one_split_fp32": (3, 4, 2, 64, 60, [1, 33, 60], None, torch.float32, dict(num_splits=1, **SMALL)),
    "one_split_window_bf16": (2, 4, 2, 64, 60, [60, 9], 16, torch.bfloat16, dict(num_splits=1, **SMALL)),
    "d16_fp16": (2, 4, 2, 16, 40, [40, 3], None, torch.float16, dict(num_splits=3, **SMALL)),
    "d256_bf16": (1, 2, 1, 256, 40, [39], None, torch.bfloat16, dict(num_splits=2, **SMALL)),
    "defaults_bf16_gqa4": (2, 8, 2, 128, 300, [300, 130], None, torch.bfloat16, {}),
    "defaults_fp32_gqa1": (2, 2, 2, 64, 200, [1, 200], None, torch.float32, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name):
    B, H, Hkv, D, S, lengths, window, dtype, launch = CASES[name]
    q, k, v = make_inputs(B, H, Hkv, D, S, dtype)
    lengths = torch.tensor(lengths, device=DEVICE)
    out = da._decode_attention_triton(q, k, v, lengths, window, **launch)
    check(out, q, k, v, lengths, window)


def test_public_op_matches_reference():
    """decode_attention() itself: torch.ops.blitzgen.decode_attention on CPU under the interpreter."""
    q, k, v = make_inputs(2, 8, 2, 64, 150, torch.float16)
    lengths = torch.tensor([150, 61], dtype=torch.int32, device=DEVICE)
    check(decode_attention(q, k, v, lengths), q, k, v, lengths)
    check(decode_attention(q, k, v, lengths, 40), q, k, v, lengths, 40)


def test_one_grid_follows_growing_lengths():
    """What a CUDA graph replays: one launch configuration while the lengths grow on the device,
    past tile and split boundaries, up to the capacity; a late key with a far larger score than the
    earlier ones moves the max within a split and across splits."""
    q, k, v = make_inputs(2, 4, 2, 64, 48, torch.float32)
    k[1, 40] = 3 * q[1, 2:4].sum(0)  # sequence 1, kv head 1 (query heads 2, 3): a dominant key at 40
    for n in (1, 2, 15, 16, 17, 31, 33, 41, 47, 48):
        lengths = torch.tensor([n, 49 - n], device=DEVICE)
        out = da._decode_attention_triton(q, k, v, lengths, None, num_splits=3, **SMALL)
        check(out, q, k, v, lengths)
    # A length past the capacity is clamped to it (never a read past the cache), as the reference reads it.
    lengths = torch.tensor([48 + 7, 3], device=DEVICE)
    check(da._decode_attention_triton(q, k, v, lengths, None, num_splits=3, **SMALL), q, k, v, lengths)


@pytest.mark.parametrize("num_splits", [33, 9])
def test_merge_reads_the_splits_past_the_power_of_two(num_splits):
    """The merge reads the splits as [LO] + [HI] rows (33 = 32 + 1, 9 = 8 + 1). A dominant key in the last split
    puts the largest lse in the HI block; a length with LO or fewer live splits leaves the HI block masked."""
    B, H, Hkv, D = 3, 4, 1, 64
    S = num_splits * 16  # split_len 16 at full length: every split live, the last one holding key S - 1
    q, k, v = make_inputs(B, H, Hkv, D, S, torch.float32)
    k[0, S - 1, 0] = 3 * q[0].sum(0)  # sequence 0: the last split's key outweighs all others
    lengths = torch.tensor([S, S - 16, 17], device=DEVICE)  # all splits live; one fewer; two
    out = da._decode_attention_triton(q, k, v, lengths, None, num_splits=num_splits, **SMALL)
    check(out, q, k, v, lengths)
    assert da._merge_blocks(num_splits) == (num_splits - 1, 1)


@pytest.mark.parametrize("name", ["gqa4_bf16_d128", "mha_fp32_ragged", "window_fp32_wider_than_live", "one_split_fp32"])
def test_programs_dealt_kv_head_first_past_the_threshold(name, monkeypatch):
    """Past HEADS_FIRST_MIN_KEYS live keys the first kernel maps its programs to (split, kv head) kv head first. With
    the threshold at 15 these batches hold sequences on both sides of it in one launch."""
    monkeypatch.setattr(da, "HEADS_FIRST_MIN_KEYS", 15)
    B, H, Hkv, D, S, lengths, window, dtype, launch = CASES[name]
    live = [min(n, window or n) for n in lengths]  # a sliding window's live keys
    assert min(live) <= 15 < max(live)
    q, k, v = make_inputs(B, H, Hkv, D, S, dtype, seed=1)
    lengths = torch.tensor(lengths, device=DEVICE)
    check(da._decode_attention_triton(q, k, v, lengths, window, **launch), q, k, v, lengths, window)


def test_stale_cache_entries_never_leak():
    """Positions at or past a length (or before a sliding window) may hold NaN, inf or huge values
    from an earlier sequence; the output must be the same as with a clean cache."""
    B, H, Hkv, D, S = 3, 4, 2, 64, 64
    q, k, v = make_inputs(B, H, Hkv, D, S, torch.bfloat16)
    lengths = torch.tensor([1, 23, 64], device=DEVICE)
    positions = torch.arange(S, device=DEVICE)[None, :]  # (1, S)
    for window in (None, 10):
        clean = decode_attention_ref(q, k, v, lengths, window)
        stale = positions >= lengths[:, None]  # (B, S)
        if window is not None:
            stale |= positions < lengths[:, None] - window
        for poison in (float("nan"), float("inf"), 1e30):
            k_bad, v_bad = k.clone(), v.clone()
            k_bad[stale], v_bad[stale] = poison, poison
            out = da._decode_attention_triton(q, k_bad, v_bad, lengths, window, num_splits=3, **SMALL)
            torch.testing.assert_close(out.float(), clean.float(), atol=ATOL[torch.bfloat16], rtol=0)
            assert torch.equal(decode_attention_ref(q, k_bad, v_bad, lengths, window), clean)


def test_cache_views_with_batch_and_head_strides():
    """The model passes a layer's rows of the (L, B, S, Hkv, D) cache (slots may be a sub-range) and a
    q that is a view of (B, 1, H, D); only the last dim needs to be contiguous."""
    L, B, S, Hkv, D, H = 2, 4, 40, 2, 64, 8
    g = torch.Generator().manual_seed(1)
    cache_k = torch.randn(L, B, S, Hkv, D, generator=g).to(DEVICE)
    cache_v = torch.randn(L, B, S, Hkv, D, generator=g).to(DEVICE)
    k, v = cache_k[1, 1:4:2], cache_v[1, 1:4:2]  # (2, S, Hkv, D), batch stride 2 * S * Hkv * D
    q = torch.randn(2, 1, 2 * H, D, generator=g).to(DEVICE)[:, 0, ::2]  # (2, H, D), head stride 2 * D
    lengths = torch.tensor([40, 11], device=DEVICE)
    check(da._decode_attention_triton(q, k, v, lengths, None, num_splits=2, **SMALL), q, k, v, lengths)


@pytest.mark.parametrize("window", [None, 6])
def test_reference_matches_sdpa_with_the_prefill_mask(window):
    """The oracle agrees with PyTorch's SDPA under the mask the model's prefill uses: a query at
    position p = length - 1 sees positions <= p (and > p - window)."""
    B, H, Hkv, D, S = 3, 8, 2, 32, 24
    q, k, v = make_inputs(B, H, Hkv, D, S, torch.float32)
    lengths = torch.tensor([1, 13, 24], device=DEVICE)
    positions = (lengths - 1)[:, None]  # (B, T=1): where this step's token was written
    mask = attention_mask(positions, S, window)  # (B, 1, 1, S)
    expected = F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                              enable_gqa=True)[:, :, 0]  # (B, H, D)
    torch.testing.assert_close(decode_attention_ref(q, k, v, lengths, window), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_with_fullgraph(backend):
    """torch.compile(fullgraph=True) traces a call to the op. Under the interpreter the op is an opaque
    custom_op (interpreted kernels cannot be traced through); on CUDA it is a triton_op, whose tracing
    test_gpu_build_without_a_gpu checks."""

    def step(q, k, v, lengths):
        return decode_attention(q * 2, k, v, lengths + 1, 50) + 1

    q, k, v = make_inputs(2, 4, 2, 64, 70, torch.float32)
    lengths = torch.tensor([69, 3], device=DEVICE)
    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True, backend=backend)(q, k, v, lengths)
    torch.testing.assert_close(out, decode_attention_ref(q * 2, k, v, lengths + 1, 50) + 1, atol=1e-5, rtol=0)


def test_bad_inputs_are_one_line_errors():
    q, k, v = make_inputs(1, 4, 2, 64, 8, torch.float32)
    lengths = torch.tensor([8], device=DEVICE)
    bad = {
        "H not a multiple of Hkv": (q[:, :3], k, v, lengths, None),
        "dtypes differ": (q, k.half(), v, lengths, None),
        "float lengths": (q, k, v, lengths.float(), None),
        "lengths shape": (q, k, v, torch.tensor([8, 8], device=DEVICE), None),
        "window 0": (q, k, v, lengths, 0),
        "int8 inputs": (q.to(torch.int8), k.to(torch.int8), v.to(torch.int8), lengths, None),
    }
    for what, args in bad.items():
        with pytest.raises(BlitzgenError):
            decode_attention(*args)
        with pytest.raises(BlitzgenError):
            da._decode_attention_triton(*args)
    q12, k12, v12 = make_inputs(1, 4, 2, 12, 8, torch.float32)
    with pytest.raises(BlitzgenError, match="head dim 12"):
        da._decode_attention_triton(q12, k12, v12, lengths, None)
    with pytest.raises(BlitzgenError, match="contiguous"):
        k_strided = k.transpose(1, 3).contiguous().transpose(1, 3)  # same shape, last dim not contiguous
        da._decode_attention_triton(q, k_strided, v, lengths, None)
    with pytest.raises(BlitzgenError, match="lengths must be contiguous"):
        q2, k2, v2 = make_inputs(2, 4, 2, 64, 8, torch.float32)
        da._decode_attention_triton(q2, k2, v2, torch.tensor([[8, 1], [8, 1]], device=DEVICE)[:, 0], None)


def test_plan_splits_is_static():
    """The split count comes from shapes and the SM count only (Llama-3-8B on an H100's 132 SMs), rounded down so
    that no SM gets more than two programs: 264 / 8 = 33, 264 / 64 = 4.1 -> 4, 264 / 16 = 16.5 -> 16; but not down to
    one split while rounding up gives more (264 / 256 -> 2, Llama-2-7B's 32 kv heads at batch 8)."""
    assert da.plan_splits(batch=1, kv_heads=8, capacity=131072, sm_count=132, split_min=128) == 33
    assert da.plan_splits(batch=8, kv_heads=8, capacity=131072, sm_count=132, split_min=128) == 4
    assert da.plan_splits(batch=2, kv_heads=8, capacity=131072, sm_count=132, split_min=128) == 16
    assert da.plan_splits(batch=8, kv_heads=32, capacity=4096, sm_count=132, split_min=128) == 2
    assert da.plan_splits(batch=64, kv_heads=8, capacity=131072, sm_count=132, split_min=128) == 1
    assert da.plan_splits(batch=1, kv_heads=8, capacity=256, sm_count=132, split_min=128) == 2
    assert da.plan_splits(batch=1, kv_heads=1, capacity=1 << 20, sm_count=132, split_min=128) == da.MAX_SPLITS


def test_gpu_build_without_a_gpu():
    """Run _gpu_build_checks (below) in a fresh process without TRITON_INTERPRET, so the kernels are
    real JIT functions: the op traces into the two kernels writing only their outputs, and both
    kernels compile to H100 (sm_90) machine code without spilling registers."""
    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))  # blitzgen uninstalled too
    result = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    assert "ok" in result.stdout


def _gpu_build_checks():
    """Without a GPU, pretend the active Triton target is an H100 and build what CUDA would build."""
    import triton
    from functorch.compile import aot_function
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)

    class H100Driver:
        def get_current_target(self):
            return target

    triton.runtime.driver.set_active(H100Driver())
    assert not da._INTERPRET
    da._sm_count = lambda device: 132  # plan splits as on an H100

    def traced_kernels(*inputs):
        """Trace the op as torch.compile does; returns [(kernel, config, kwargs, tensors it writes)]."""
        nodes = []

        def compiler(graph_module, example_inputs):
            nodes.extend(n for n in graph_module.graph.nodes if "triton_kernel_wrapper" in str(n.target))
            return lambda *args: [torch.empty(inputs[0].shape)]

        with torch.no_grad():
            aot_function(lambda *a: torch.ops.blitzgen.decode_attention(*a), fw_compiler=compiler)(*inputs)
        found = []
        for node in nodes:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            config = kernel.configs[0]  # num_warps and num_stages travel as a one-config autotuner
            kwargs = {**kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"]), **node.kwargs["kwargs"]}
            kwargs = {name: getattr(arg, "meta", {}).get("val", arg) for name, arg in kwargs.items()}  # fx nodes -> fakes
            found.append((kernel.fn, config, kwargs, set(node.kwargs["tensors_to_clone"])))
        return found

    def machine_code_resources(fn, config, kwargs):
        """Compile for sm_90 as a launch with these arguments would; cuobjdump's resource line."""
        constexprs = {p.name: kwargs[p.name] for p in fn.params if p.is_constexpr}
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            value = kwargs[name]
            if name in constexprs:
                signature[name] = "constexpr"
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                                         torch.int64: "i64", torch.int32: "i32"}[value.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        cubin = triton.compile(source, target=target, options=options).asm["cubin"]
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"decode_attention_check_{os.getpid()}.cubin"
        path.write_bytes(cubin)
        cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
        dump = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)], capture_output=True, text=True)
        path.unlink()
        return dump.stdout

    shapes = [  # (B, H, Hkv, D, S, dtype): Llama-3-8B at batch 1 and 64, a Llama-2-style MHA, float32
        (1, 32, 8, 128, 8192, torch.bfloat16),
        (64, 32, 8, 128, 512, torch.bfloat16),
        (1, 32, 32, 64, 4096, torch.float16),
        (1, 32, 8, 128, 4096, torch.float32),
    ]
    for B, H, Hkv, D, S, dtype in shapes:
        q, k, v = (torch.zeros(shape, dtype=dtype) for shape in [(B, H, D), (B, S, Hkv, D), (B, S, Hkv, D)])
        lengths = torch.full((B,), S)
        kernels = traced_kernels(q, k, v, lengths, None, False)
        names = [fn.__name__ for fn, *_ in kernels]
        num_splits = kernels[0][2]["NUM_SPLITS"]
        expected = ["_decode_attention_kernel"] + (["_decode_attention_merge_kernel"] if num_splits > 1 else [])
        assert names == expected, names
        for fn, config, kwargs, written in kernels:
            # Inductor copies every tensor a kernel may write: the cache must never be one of them.
            assert written <= {"out_ptr", "part_out_ptr", "part_lse_ptr"}, (fn.__name__, written)
            resources = machine_code_resources(fn, config, kwargs)
            assert "LOCAL:0" in resources and "STACK:0" in resources, (fn.__name__, resources)  # no spills
            print(fn.__name__, B, H, Hkv, D, dtype, f"splits={num_splits}", resources.split("Function")[-1].strip())

    # Without the interpreter, CPU tensors take the reference path.
    q, k, v = (t.cpu() for t in make_inputs(2, 4, 2, 64, 16, torch.float32))
    lengths = torch.tensor([16, 5])
    assert torch.equal(decode_attention(q, k, v, lengths), decode_attention_ref(q, k, v, lengths))
    print("ok")


if __name__ == "__main__":
    _gpu_build_checks()
