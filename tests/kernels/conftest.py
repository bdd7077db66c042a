"""Kernel tests run the Triton launchers; without CUDA they run under Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported, hence here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
