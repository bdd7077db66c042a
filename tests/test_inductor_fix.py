"""blitzgen.inductor_fix: on torch < 2.13, a kernel reloaded from the FX graph cache runs the configuration
coordinate descent found in an earlier process, marked so that it is not tuned again."""
from types import SimpleNamespace

import pytest

from blitzgen import inductor_fix

th = pytest.importorskip("torch._inductor.runtime.triton_heuristics")
Config = pytest.importorskip("triton").Config


@pytest.fixture
def fixed(monkeypatch):
    """install() as on torch 2.11, over a stand-in for 2.11's check that leaves the compiled configs as they are."""
    monkeypatch.setattr(inductor_fix, "_needs_fix", lambda: True)
    monkeypatch.setattr(inductor_fix, "_installed", False)
    monkeypatch.setattr(th.CachingAutotuner, "recheck_autotune_cache", lambda self, reload_kernel_from_src: None)

    def saved(found_by_coordesc):
        best = Config({"XBLOCK": 1, "R0_BLOCK": 2048}, num_warps=8, num_stages=1)
        best.found_by_coordesc = found_by_coordesc
        monkeypatch.setattr(th, "check_autotune_cache", lambda configs, filename, meta: ([best], None, {}))
        inductor_fix.install()
        return best

    return saved


def _kernel(*blocks):
    results = [SimpleNamespace(config=Config({"XBLOCK": 1, "R0_BLOCK": r}, num_warps=8, num_stages=1)) for r in blocks]
    compiled = []
    kernel = SimpleNamespace(compile_results=results, filename="k.py", inductor_meta={}, fn=SimpleNamespace(fn=object()),
                             _precompile_config=lambda config: compiled.append(config) or SimpleNamespace(config=config))
    return kernel, compiled


def test_compiled_config_found_by_coordinate_descent_is_marked(fixed):
    fixed(found_by_coordesc=True)
    kernel, compiled = _kernel(1024, 2048)
    th.CachingAutotuner.recheck_autotune_cache(kernel, None)
    assert [r.config.kwargs["R0_BLOCK"] for r in kernel.compile_results] == [2048]
    assert kernel.compile_results[0].config.found_by_coordesc and compiled == []


def test_tuned_config_not_compiled_yet_is_compiled(fixed):
    best = fixed(found_by_coordesc=True)
    kernel, compiled = _kernel(1024)  # one starting configuration, not the tuned one
    th.CachingAutotuner.recheck_autotune_cache(kernel, None)
    assert compiled == [best] and kernel.compile_results[0].config is best


def test_result_not_from_coordinate_descent_is_left_alone(fixed):
    fixed(found_by_coordesc=False)
    kernel, compiled = _kernel(1024, 2048)
    th.CachingAutotuner.recheck_autotune_cache(kernel, None)
    assert len(kernel.compile_results) == 2 and compiled == []
    assert not getattr(kernel.compile_results[1].config, "found_by_coordesc", False)


def test_new_torch_is_left_alone(monkeypatch):
    monkeypatch.setattr(inductor_fix.torch, "__version__", "2.13.0+cpu")
    monkeypatch.setattr(inductor_fix, "_installed", False)
    before = th.CachingAutotuner.recheck_autotune_cache
    inductor_fix.install()
    assert th.CachingAutotuner.recheck_autotune_cache is before
