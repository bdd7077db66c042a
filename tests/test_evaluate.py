"""evaluate.perplexity against the same quantity computed plainly with transformers, token by token."""

import math

import pytest
import torch

import blitzgen
from blitzgen.cli import main
from blitzgen.errors import BlitzgenError
from blitzgen.evaluate import perplexity, windows


def reference_loss(hf_model, ids, context, stride):
    """Mean -log P(t_p | t_b .. t_{p-1}) over p >= 1, where b = k * stride for the first window k
    that reaches p (k * stride + context >= p): one transformers forward per token."""
    total = 0.0
    for p in range(1, len(ids)):
        begin = max(0, math.ceil((p - context) / stride)) * stride
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids[begin:p]])).logits[0, -1]
        total -= torch.log_softmax(logits.double(), -1)[ids[p]].item()
    return total / (len(ids) - 1)


@pytest.mark.parametrize("context,stride", [(32, 32), (32, 20), (24, 7), (200, 200)])
def test_matches_transformers(tiny_models, context, stride):
    hf_model, path = tiny_models("llama_gqa2")
    gen = blitzgen.load(path, device="cpu", dtype="fp32")
    ids = torch.randint(0, hf_model.config.vocab_size, (101,), generator=torch.Generator().manual_seed(0)).tolist()
    result = perplexity(gen, ids, context=context, stride=stride, progress=False)
    assert result.tokens == len(ids) - 1
    # fp32 logits of the same model in two implementations: ~1e-6 apart per token.
    assert result.loss == pytest.approx(reference_loss(hf_model, ids, context, stride), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))


def test_windows_score_every_token_once():
    for length, context, stride in [(2, 1, 1), (100, 10, 10), (100, 10, 3), (37, 50, 50), (64, 16, 1)]:
        targets = [p for _, end, first in windows(length, context, stride) for p in range(first, end)]
        assert targets == list(range(1, length))
        for begin, end, first in windows(length, context, stride):
            assert end - 1 - begin <= context and first > begin  # every target has context in its window


def test_bad_values_are_one_line_errors():
    gen = blitzgen.load()
    with pytest.raises(BlitzgenError, match="--stride 600"):
        perplexity(gen, "To be or not to be", context=512, stride=600)
    with pytest.raises(BlitzgenError, match="--context 9999"):
        perplexity(gen, "To be or not to be", context=9999)
    with pytest.raises(BlitzgenError, match="at least 2"):
        perplexity(gen, [5])


def test_cli_eval_prints_tokens_loss_and_perplexity(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet "
                    "is the sun.\n" * 6)
    assert main(["eval", "--text", str(text), "--context", "64", "--stride", "32"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    expected = perplexity(blitzgen.load(), text.read_text(), context=64, stride=32)
    assert out == (f"tokens {expected.tokens}, loss {expected.loss:.4f} nats/token, "
                   f"perplexity {expected.perplexity:.2f}")
    assert main(["eval", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
