"""Perplexity of a model over a text: sliding-window evaluation, each token scored once.

The text is tokenized whole (as a prompt would be) into ids t_0 .. t_{L-1}. Token t_p (p >= 1)
is scored by -log P(t_p | the tokens before it in its window). Windows hold at most `context`
tokens of input and start every `stride` tokens (the usual strided evaluation of Hugging Face's
perplexity guide): a window reads t_b .. t_{e-2} and is charged only for the targets not scored
by an earlier window, so every token but t_0 is scored exactly once, with between
context - stride + 1 and context tokens before it (all of them near the start of the text).

    loss = mean over p of -log P(t_p | window),   perplexity = exp(loss)

stride = context gives non-overlapping windows (the fastest; how the default model's training
script reports its held-out loss); a smaller stride gives every token more context and costs
context / stride times as much. The forward passes go through Generator.logits, so a quantized
model is evaluated with exactly the code that generates with it.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from blitzgen.errors import BlitzgenError


@dataclass
class Perplexity:
    tokens: int  # tokens scored (all but the first of the text)
    loss: float  # mean negative log-likelihood, nats per token
    perplexity: float  # exp(loss)


def windows(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) per window: the model reads ids[begin:end - 1] and scores the
    targets ids[first_target:end], each target once over all windows."""
    out, scored = [], 1  # t_0 has nothing before it
    begin = 0
    while scored < num_tokens:
        end = min(begin + context + 1, num_tokens)
        out.append((begin, end, scored))
        scored = end
        begin += stride
    return out


def perplexity(generator, text: str | list[int], context: int | None = None, stride: int | None = None,
               progress: bool | None = None) -> Perplexity:
    """Score `text` (a string, or token ids) with `generator`'s model.

    context: input tokens per window (default: the generator's context); stride: tokens between
    window starts, 1..context (default: context, non-overlapping).
    """
    context = generator.context if context is None else context
    stride = context if stride is None else stride
    if not 1 <= context <= generator.context:
        raise BlitzgenError(f"--context {context}: expected 1 to {generator.context} (the model's context)")
    if not 1 <= stride <= context:
        raise BlitzgenError(f"--stride {stride}: expected 1 to --context ({context})")
    ids = generator.tokenizer.encode(text) if isinstance(text, str) else list(text)
    if len(ids) < 2:
        raise BlitzgenError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    targets = torch.tensor(ids, device=generator.device)
    total, count = 0.0, 0
    for begin, end, first in tqdm(windows(len(ids), context, stride), desc="evaluating", unit="window",
                                  disable=None if progress is None else not progress, leave=False):
        logits = generator.logits(ids[begin : end - 1])  # (end - 1 - begin, V): row j predicts ids[begin + j + 1]
        rows = logits[first - 1 - begin :]  # the rows predicting ids[first:end]
        nll = F.cross_entropy(rows, targets[first:end], reduction="sum")
        total += nll.item()
        count += end - first
    loss = total / count
    return Perplexity(tokens=count, loss=loss, perplexity=math.exp(loss))
