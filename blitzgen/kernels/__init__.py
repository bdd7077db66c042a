"""Triton kernels, each in a file beside the plain-PyTorch reference of the same function.

A kernel file holds, in order: the math and the shape/dtype contract, `<op>_ref` (the CPU path
and the test oracle), the Triton kernels, and the launcher `<op>()` that validates, allocates,
picks the grid and falls back to the reference where Triton cannot run. Each op is registered
as `torch.ops.blitzgen.<op>` so torch.compile traces it into the CUDA-graphed decode step.
Nothing is imported here: import the module of the op you need.
"""
