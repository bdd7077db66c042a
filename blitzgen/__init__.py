"""blitzgen: fast, readable LLM text generation in plain PyTorch.

    import blitzgen
    gen = blitzgen.load("path/to/hf_checkpoint")          # or load() for the built-in model
    print(gen.generate(["To be, or not"], blitzgen.SamplingParams(temperature=0))[0].text)
"""

from blitzgen.chat import ChatSession
from blitzgen.errors import BlitzgenError
from blitzgen.generate import Completion, GenerationStats, Generator, TokenEvent, load
from blitzgen.sampling import SamplingParams
from blitzgen.tokenizer import Tokenizer

__all__ = [
    "BlitzgenError",
    "ChatSession",
    "Completion",
    "GenerationStats",
    "Generator",
    "SamplingParams",
    "TokenEvent",
    "Tokenizer",
    "load",
]
