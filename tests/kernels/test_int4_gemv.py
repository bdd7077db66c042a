"""int4_gemv (Triton, under TRITON_INTERPRET=1 on CPU) against their references."""

import pytest
import torch

from blitzgen.errors import BlitzgenError
from blitzgen.kernels.int4_gemv import int4_gemv, int4_gemv_ref
from kernel_checks import assert_matches, random_int4

INTERPRETED = not torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(M, N, K, G, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    packed, scales, zeros = random_int4(N, K, G, g)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return [t if t is None else t.to(DEVICE) for t in (x, packed, scales, zeros, b)]


def _check(y, ref):
    # On the tensor-core path each dequantized weight is rounded to the activations' format before the
    # dot too: two units in the last place.
    assert_matches(y, ref, ulps=2)


# K is a multiple of the group but not of the 512-wide default tile; N is not a multiple of any tile.
@pytest.mark.parametrize("N,K,G", [(37, 96, 32), (50, 320, 64), (9, 640, 128)])
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(M, N, K, G, dtype):
    if INTERPRETED and dtype == torch.bfloat16 and M > 1:
        pytest.skip("Triton 3.9's interpreter multiplies bf16 bit patterns in tl.dot; checked on the GPU")
    x, packed, scales, zeros, b = _inputs(M, N, K, G, dtype, bias=N != 9)
    _check(int4_gemv(x, packed, scales, zeros, b), int4_gemv_ref(x, packed, scales, zeros, b))


@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize("blocks", [(1, 16, 64, 4), (1, 8, 256, 4), (16, 32, 128, 4)])
@pytest.mark.parametrize("words", [True, False])
def test_split_k_and_blocks(split_k, blocks, words):
    # One row reads the codes as int32 words unless words=False; (1, 8, 256) puts 4 groups in a tile.
    M = 1 if blocks[0] == 1 else 5
    x, packed, scales, zeros, b = _inputs(M, 41, 448, 64, torch.float32, bias=True, seed=split_k)
    _check(int4_gemv(x, packed, scales, zeros, b, blocks=blocks, split_k=split_k, words=words),
           int4_gemv_ref(x, packed, scales, zeros, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("G", [32, 128])
def test_weights_in_16_bit_pairs(dtype, G):
    """Several 16-bit rows with the tile's weights made two at a time by bit operations (pairs=True: PTX on the
    GPU, the same values by plain arithmetic under the interpreter): against the reference, and every code of
    every nibble position exactly (scale 1, zero point 0, one-hot rows pick single codes). Each weight is rounded
    to the 16-bit dtype once, as the default path rounds it: two units in the last place."""
    if INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("Triton 3.9's interpreter multiplies bf16 bit patterns in tl.dot; checked on the GPU")
    x, packed, scales, zeros, b = _inputs(8, 50, 320 if G == 32 else 640, G, dtype, bias=True, seed=G)
    for pairs in (True, False):  # the default, and the fp32 dequantization it replaced
        _check(int4_gemv(x, packed, scales, zeros, b, pairs=pairs), int4_gemv_ref(x, packed, scales, zeros, b))
    N, K = 32, 2 * G
    codes = torch.arange(N * K, dtype=torch.int64).remainder(16).view(N, K).to(torch.uint8)
    codes = codes[:, torch.randperm(K, generator=torch.Generator().manual_seed(1))]  # each code at many positions
    one_hot = torch.zeros(16, K)
    one_hot[torch.arange(16), torch.arange(16) * (K // 16) + torch.arange(16) % 3] = 1.0  # 16 columns, odd and even
    ones = torch.ones(N, K // G, dtype=dtype, device=DEVICE)
    y = int4_gemv(one_hot.to(DEVICE, dtype), (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(DEVICE), ones, 0 * ones,
                  pairs=True)
    assert torch.equal(y.float().cpu(), (one_hot @ codes.float().t()).to(dtype).float())


def test_every_code_in_every_position_converts_exactly():
    """Codes are turned into floats by bit pattern: each of the 16 codes at each of the 8 positions of
    a 32-bit word, alone in its row with scale 1 and zero point 0, comes out exactly."""
    N, K = 128, 64  # row n holds code n % 16 at column n // 16 (word 0, position n // 16)
    codes = torch.zeros(N, K, dtype=torch.uint8)
    codes[torch.arange(N), torch.arange(N) // 16] = torch.arange(N, dtype=torch.uint8) % 16
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(DEVICE)
    ones, zeros = torch.ones(N, 2, dtype=torch.bfloat16, device=DEVICE), torch.zeros(N, 2, dtype=torch.bfloat16, device=DEVICE)
    y = int4_gemv(torch.ones(1, K, device=DEVICE), packed, ones, zeros, blocks=(1, 16, 64, 4), split_k=1)
    assert torch.equal(y[0].cpu(), (torch.arange(N) % 16).float())


def test_bad_shapes_are_clear_errors():
    x, packed, scales, zeros, _ = _inputs(2, 8, 128, 32, torch.float32, bias=False)
    with pytest.raises(BlitzgenError, match="group size"):
        int4_gemv(x, packed, scales[:, :3], zeros[:, :3])  # 128 / 3 is no group size
    with pytest.raises(BlitzgenError, match="group size"):
        int4_gemv(x, packed, torch.ones(8, 8, device=DEVICE), torch.ones(8, 8, device=DEVICE))  # G = 16
    with pytest.raises(BlitzgenError, match="must be"):
        int4_gemv(x[:, :126], packed, scales, zeros)
    with pytest.raises(BlitzgenError, match="block_k"):
        int4_gemv(x, packed, scales, zeros, blocks=(1, 16, 48, 4))


@pytest.mark.skipif(INTERPRETED, reason="wrap_triton cannot trace an interpreted kernel with fake tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiles_as_one_graph(dtype):
    """bf16 with pairs=True: Inductor must also write the kernel that carries the pairs PTX (a string argument
    with braces once broke its generated Python)."""
    x, packed, scales, zeros, b = _inputs(3, 40, 256, 64, dtype, bias=True)
    fn = torch.compile(lambda x: int4_gemv(x, packed, scales, zeros, b, pairs=True) * 2, fullgraph=True)
    _check(fn(x), int4_gemv_ref(x, packed, scales, zeros, b) * 2)
