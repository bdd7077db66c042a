"""Make a warm start reuse Inductor's coordinate-descent results on torch 2.11 and 2.12.

The decode step's matrix-vector products are Inductor reductions tuned by coordinate descent
(generate.py). The tuned configuration is saved next to the kernel (a .best_config file marked
"found_by_coordesc"), so a second process with warm caches should launch it without tuning. On
torch 2.11 a kernel reloaded from the FX graph cache comes back as a pickled autotuner holding the
configurations compiled before tuning, and its autotune-cache check (recheck_autotune_cache)
either ignores the saved result (a kernel with one starting configuration) or picks the matching
compiled configuration without the "found by coordinate descent" mark. Either way the kernel is
tuned again at its first launch: measured on an H100, 118 benchmarks and ~4 s of a 10.5 s warm
start of Llama-2-7B, and the re-tuned configuration can differ from the first run's. torch 2.13
checks the saved result for every reloaded kernel and keeps the mark.

install() wraps that check on torch < 2.13: after it, a kernel whose saved result was found by
coordinate descent runs exactly that configuration (the compiled one when it matches, else
compiled now), marked so it is not tuned again. Later torch versions are left alone. Measured on
the H100 (torch 2.11, `blitzgen bench --arch llama-2-7b`, benchmarks/BENCHMARKS.md): warm start
10.5 s with 118 configurations benchmarked before, 4.8 s with none after.
"""

import torch

_installed = False


def _needs_fix() -> bool:
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) < (2, 13)


def install() -> None:
    """Apply the fix once per process (no-op on torch >= 2.13 or where the hook is missing)."""
    global _installed
    if _installed or not _needs_fix():
        return
    try:
        from torch._inductor.runtime import triton_heuristics as th
    except ImportError:  # builds without Triton: nothing is tuned
        return
    autotuner = th.CachingAutotuner
    recheck = getattr(autotuner, "recheck_autotune_cache", None)
    if recheck is None or not hasattr(th, "check_autotune_cache") or not hasattr(th, "triton_config_to_hashable"):
        return

    def recheck_keeping_tuned(self, reload_kernel_from_src):
        recheck(self, reload_kernel_from_src)
        configs = [result.config for result in self.compile_results]
        cached, _, _ = th.check_autotune_cache(configs, self.filename, self.inductor_meta)
        if len(cached) != 1 or not getattr(cached[0], "found_by_coordesc", False):
            return
        best = cached[0]
        key = th.triton_config_to_hashable(best)
        same = [result for result in self.compile_results if th.triton_config_to_hashable(result.config) == key]
        if same:
            same[0].config.found_by_coordesc = True
            self.compile_results = same[:1]
        else:
            if self.fn.fn is None:
                self.fn = reload_kernel_from_src().fn
            self.compile_results = [self._precompile_config(best)]

    autotuner.recheck_autotune_cache = recheck_keeping_tuned
    _installed = True
