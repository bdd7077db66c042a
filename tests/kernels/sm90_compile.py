"""Compile every Triton kernel launch of blitzgen/kernels for an H100/H200 (sm_90) on a machine with no GPU.

Run as a script by test_compiles_for_sm90.py, in a process without TRITON_INTERPRET: the interpreter runs
the kernels' Python, so it misses what only the compiler rejects (a constexpr assigned twice inside an
unrolled loop failed every several-row gemv_a8 launch on the GPU while the interpreted tests passed), and
it never sees the inline-PTX paths. Here each launcher runs on small CPU tensors with Triton's driver
replaced by one that reports an sm_90 target, and every launch is compiled (to a cubin, by the ptxas
that ships with Triton) instead of run. Prints one line per compiled kernel configuration.
"""

import torch
import triton  # noqa: F401  (the driver must be replaced before any kernel is launched)
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction


class SM90Driver:
    """What JITFunction.run asks of the driver before a launch, answered for an sm_90 device."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


driver.set_active(SM90Driver())
COMPILED = []
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)  # warmup: compile, do not launch
    COMPILED.append(f"{self.fn.__name__} {kernel.metadata.num_warps} warps")
    return kernel


JITFunction.run = _compile_only

from blitzgen.kernels import dequantize, gemv, gemv_a8, int4_gemv, int8_gemv  # noqa: E402
from blitzgen.kernels import decode_attention, hopper  # noqa: E402
from blitzgen.kernels.decode_attention import _decode_attention_triton  # noqa: E402
from blitzgen.kernels.rope_cache import _rope_cache_op  # noqa: E402

for module in (dequantize, gemv, gemv_a8, int4_gemv, int8_gemv):
    module.triton_runs_on = lambda x: True  # the launchers' "is this a CUDA tensor" test


def main():
    g = torch.Generator().manual_seed(0)
    N, K = 64, 512
    w8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s8 = torch.rand(N, generator=g).bfloat16()
    w4 = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g)
    s4, z4 = torch.rand(N, K // 128, generator=g).bfloat16(), torch.rand(N, K // 128, generator=g).bfloat16()
    for dtype in (torch.bfloat16, torch.float32):
        for rows in (1, 5):  # one row (the one-row paths) and several (the tiles, the unrolled row loops)
            x = torch.randn(rows, K, generator=g).to(dtype)
            int8_gemv.int8_gemv(x, w8, s8)
            int4_gemv.int4_gemv(x, w4, s4, z4)
            int4_gemv.int4_gemv(x, w4, s4, z4, pairs=True)  # several 16-bit rows: weights in 16-bit pairs (PTX)
            int4_gemv.int4_gemv(x.half(), w4, s4.half(), z4.half(), pairs=True)
            gemv_a8.gemv_a8(x, w8, s8)
            gemv_a8.gemv_a8(x, w4, s4, z4)
        dequantize.int8_dequantize(w8, s8, dtype)
        x, wf, nw = torch.randn(1, K).to(dtype), torch.randn(2 * N, K).to(dtype), torch.rand(K).to(dtype)
        gemv.gemv(x, wf, norm_weight=nw, eps=1e-5)  # every epilogue the decode step uses
        gemv.gemv(x, wf, norm_weight=nw, eps=1e-5, gate_up=True)
        gemv.gemv(x, wf, wf[:, 0], residual=torch.randn(1, 2 * N).to(dtype))
        gemv._gemv_op(x, wf, None, None, None, nw, 1e-5, True, None, "float", 4, 256, 4, 2, True)  # a dependent launch
        w8f = torch.randint(-127, 128, (2 * N, K), dtype=torch.int8, generator=g)  # int8 codes, every epilogue
        gemv.INT8_WORDS = gemv.INT8_A8 = False  # the conversion path first
        gemv.gemv(x, w8f, norm_weight=nw, eps=1e-5, gate_up=True, scales=torch.rand(2 * N).to(dtype))
        gemv.gemv(x, w8f, wf[:, 0], residual=torch.randn(1, 2 * N).to(dtype), scales=torch.rand(2 * N).to(dtype))
        gemv.INT8_WORDS = True  # int8 codes as words, bf16 activations as quads (the default; the others ignore it)
        gemv.gemv(x, w8f, norm_weight=nw, eps=1e-5, gate_up=True, scales=torch.rand(2 * N).to(dtype))
        gemv._gemv_op(x, w8f, torch.rand(2 * N).to(dtype), None, None, nw, 1e-5, True, None, "words", 4, 1024, 4, 2,
                      True)
        gemv.INT8_A8 = True  # activations rounded to int8 in the kernel: int8 codes (bf16 only) and packed int4
        gemv.gemv(x, w8f, norm_weight=nw, eps=1e-5, gate_up=True, scales=torch.rand(2 * N).to(dtype))
        gemv.INT8_A8 = False
        if dtype == torch.bfloat16:
            w4f = torch.randint(0, 256, (2 * N, K // 2), dtype=torch.uint8, generator=g)
            s4f, z4f = torch.rand(2 * N, K // 128).to(dtype), torch.rand(2 * N, K // 128).to(dtype)
            gemv.gemv(x, w4f, norm_weight=nw, eps=1e-5, gate_up=True, scales=s4f, zeros=z4f)
            gemv._gemv_op(x, w4f, s4f, z4f, None, None, 0.0, False, torch.randn(1, 2 * N).to(dtype), "a8", 4, 1024, 4,
                          4, True)
        gemv.INT8_WORDS = False
        H, Hkv, D = 8, 2, 64  # wqkv with RoPE and the cache write in the epilogue, plain and as a dependent launch
        wqkv, caches = torch.randn((H + 2 * Hkv) * D, K).to(dtype), torch.zeros(2, 1, 16, Hkv, D, dtype=dtype)
        for pdl in (False, True):
            for w, s, words in ((wqkv, None, False), (wqkv.to(torch.int8), torch.rand(wqkv.shape[0]).to(dtype), False),
                                (wqkv.to(torch.int8), torch.rand(wqkv.shape[0]).to(dtype), True)):
                gemv.INT8_WORDS = words
                gemv._gemv_rope_op(x, w, s, None, wqkv[:, 0], nw, 1e-5, torch.randn(D).to(dtype),
                                   torch.randn(D).to(dtype), torch.zeros(1, dtype=torch.int64), caches[0], caches[1], H,
                                   gemv._mode(x, w, nw), 16, 512, 4, 2, pdl)
            gemv.INT8_WORDS = True
            gemv.INT8_A8 = True  # the default int8 loop, with RoPE
            w8q = wqkv.to(torch.int8)
            gemv._gemv_rope_op(x, w8q, torch.rand(wqkv.shape[0]).to(dtype), None, None, nw, 1e-5,
                               torch.randn(D).to(dtype), torch.randn(D).to(dtype), torch.zeros(1, dtype=torch.int64),
                               caches[0], caches[1], H, gemv._mode(x, w8q, nw), 16, 512, 4, 2, pdl)
            gemv.INT8_A8 = False
        gemv.INT8_A8 = True
        dequantize.int4_dequantize(w4, s4, z4, dtype)
    for dtype in (torch.bfloat16, torch.float32):
        for B, H, Hkv, D, S, splits in ((1, 32, 8, 128, 4096, 33), (8, 16, 16, 64, 256, 1)):  # + merge; one split
            q = torch.randn(B, H, D).to(dtype)
            cache = torch.randn(B, S, Hkv, D).to(dtype)
            _decode_attention_triton(q, cache, cache, torch.full((B,), S // 2), None, num_splits=splits)
            decode_attention.hopper = lambda t: True  # + the merge as a programmatic dependent launch
            _decode_attention_triton(q, cache, cache, torch.full((B,), S // 2), None, num_splits=splits)
            decode_attention.hopper = hopper
            if dtype == torch.bfloat16:  # the other warp counts attention_bench --sweep times
                for warps in (1, 4):
                    _decode_attention_triton(q, cache, cache, torch.full((B,), S // 2), None, num_splits=splits,
                                             num_warps=warps)
        B, H, Hkv, D = 2, 8, 2, 128
        for pdl in (False, True):
            _rope_cache_op(torch.randn(B, 1, (H + 2 * Hkv) * D).to(dtype), torch.randn(B, 1, D).to(dtype),
                               torch.randn(B, 1, D).to(dtype), torch.zeros(B, 1, dtype=torch.int64),
                               torch.zeros(B, 16, Hkv, D, dtype=dtype), torch.zeros(B, 16, Hkv, D, dtype=dtype), H, pdl)
    for line in COMPILED:
        print(line)


if __name__ == "__main__":
    main()
