"""int8_gemv (Triton, under TRITON_INTERPRET=1 on CPU) against int8_gemv_ref at awkward sizes."""

import pytest
import torch

from blitzgen.errors import BlitzgenError
from blitzgen.kernels.int8_gemv import int8_gemv, int8_gemv_ref
from kernel_checks import assert_matches

INTERPRETED = not torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(M, N, K, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s = (torch.rand(N, generator=g) * 0.01 + 1e-3).bfloat16()
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return [t if t is None else t.to(DEVICE) for t in (x, w, s, b)]


# N and K are deliberately not multiples of any block size; the default plan splits K on the CPU.
@pytest.mark.parametrize("N,K", [(37, 300), (5, 1000), (130, 17)])
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(M, N, K, dtype):
    if INTERPRETED and dtype == torch.bfloat16 and M > 1:
        pytest.skip("Triton 3.9's interpreter multiplies bf16 bit patterns in tl.dot; checked on the GPU")
    x, w, s, b = _inputs(M, N, K, dtype, bias=N != 5)
    assert_matches(int8_gemv(x, w, s, b), int8_gemv_ref(x, w, s, b))


@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize("blocks", [(1, 16, 64, 4), (16, 32, 32, 4), (16, 32, 64, 4)])
@pytest.mark.parametrize("words", [True, False])
def test_split_k_and_blocks(split_k, blocks, words):
    # K = 252: a multiple of 4 (one row reads the codes as int32 words unless words=False), not of a block.
    M = 1 if blocks[0] == 1 else 7
    x, w, s, b = _inputs(M, 45, 252, torch.float32, bias=True, seed=split_k)
    assert_matches(int8_gemv(x, w, s, b, blocks=blocks, split_k=split_k, words=words), int8_gemv_ref(x, w, s, b))


def test_every_code_converts_exactly():
    """The one-row path turns bytes into floats by bit pattern: every code -128..127, each alone in
    its row (so no rounding is involved), must come out exactly."""
    codes = torch.arange(-128, 128, dtype=torch.int8)
    w = torch.zeros(256, 256, dtype=torch.int8)
    w[torch.arange(256), torch.arange(256)] = codes
    x = torch.ones(1, 256, device=DEVICE)
    s = torch.ones(256, device=DEVICE)
    y = int8_gemv(x, w.to(DEVICE), s, blocks=(1, 16, 64, 4), split_k=1)
    assert torch.equal(y[0].cpu(), codes.float())


def test_more_rows_than_one_tile():
    x, w, s, b = _inputs(19, 33, 70, torch.float16, bias=False)
    assert_matches(int8_gemv(x, w, s, b), int8_gemv_ref(x, w, s, b))


def test_bad_shapes_are_clear_errors():
    x, w, s, _ = _inputs(2, 8, 16, torch.float32, bias=False)
    with pytest.raises(BlitzgenError, match="must be"):
        int8_gemv(x[:, :15], w, s)
    with pytest.raises(BlitzgenError, match="int8 weight"):
        int8_gemv(x, w.float(), s)
    with pytest.raises(BlitzgenError, match="bias"):
        int8_gemv(x, w, s, torch.zeros(9, device=DEVICE))
    with pytest.raises(BlitzgenError, match="powers of two"):
        int8_gemv(x, w, s, blocks=(1, 16, 48, 4))


@pytest.mark.skipif(INTERPRETED, reason="wrap_triton cannot trace an interpreted kernel with fake tensors")
def test_compiles_as_one_graph():
    # torch.compile must trace the op (triton_op) into one graph, as the CUDA-graphed decode step does.
    x, w, s, b = _inputs(3, 40, 96, torch.float32, bias=True)
    fn = torch.compile(lambda x: int8_gemv(x, w, s, b) * 2, fullgraph=True)
    assert_matches(fn(x), int8_gemv_ref(x, w, s, b) * 2)
