"""`blitzgen bench` on the CPU with the built-in model: every phase runs and the figures are
consistent with each other (the GPU figures themselves live in benchmarks/BENCHMARKS.md)."""

import json

import pytest
import torch

from blitzgen.cli import main


def test_bench_reports_every_phase(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--device", "cpu", "--batch-size", "1", "--batch-size", "2", "--prompt-len", "8",
                 "--prompt-lengths", "8,600", "--new-tokens", "4", "--runs", "1", "--ceiling-gib", "0.01",
                 "--compare-eager", "--profile", "--json", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    assert res["read_tbps"] > 0 and res["copy_tbps"] > 0
    assert res["cold_start_s"] >= res["compile_s"] > 0
    assert res["compile_caches"]["fx_graph_misses"] == 0  # a CPU decode step is not compiled
    assert res["ttft_ms"]["8"] > 0 and res["ttft_ms"]["600"] is None  # 600 > the built-in model's 512 context
    assert [r["batch"] for r in res["decode"]] == [1, 2] and [r["batch"] for r in res["eager"]] == [1, 2]
    for r in res["decode"]:
        assert abs(r["total_tokens_per_s"] - r["batch"] * r["tokens_per_s"]) < 1e-6 * r["total_tokens_per_s"]
        assert abs(r["step_ms"] * r["tokens_per_s"] - 1000) < 1e-6
        assert r["pct_of_read"] > 0 and r["roof_tokens_per_s"] > 0
    assert 0 < len(res["profile"]) <= 15 and all(r["us_per_step"] > 0 for r in res["profile"])
    shares = [r["share"] for r in res["profile"]]
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 100 + 1e-6
    totals = res["profile_totals"]
    assert totals["us_per_step"] >= sum(r["us_per_step"] for r in res["profile"]) - 1e-6
    assert totals["launches_per_step"] >= sum(r["calls_per_step"] for r in res["profile"]) - 1e-6
    table = capsys.readouterr().out
    assert "| kernel (batch 1 decode step) |" in table and "all kernels: " in table
    assert "| 1 |" in table and "| 2 |" in table and "streaming read" in table


def test_cache_counts_see_a_warm_compile_hit_the_caches():
    """What bench reports about the compile caches: a second compile of the same graph (dynamo reset,
    the process's Inductor cache warm from the first) hits the FX graph and AOTAutograd caches."""
    from blitzgen.bench import cache_counts, compile_counters

    def fn(x):
        return (x * 3).cos().sum(-1)

    x = torch.randn(4, 8)
    compile_counters.clear()
    torch._dynamo.reset()
    torch.compile(fn)(x)
    first = cache_counts()
    assert first["fx_graph_hits"] + first["fx_graph_misses"] == 1
    compile_counters.clear()
    torch._dynamo.reset()
    torch.compile(fn)(x)
    second = cache_counts()
    assert second["fx_graph_hits"] == 1 and second["fx_graph_misses"] == 0
    assert second["aot_autograd_hits"] == 1 and second["configs_benchmarked"] == 0


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "--device", "cpu", "--arch", "gpt-5"]) == 2
    assert "--arch 'gpt-5': expected one of llama-2-7b" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--arch", "llama-2-7b", "--model", "x"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--quantize", "int3"]) == 2
    assert capsys.readouterr().err.strip() == "blitzgen: error: --quantize 'int3': expected int8 or int4"
    if not torch.cuda.is_available():
        assert main(["bench", "--attention"]) == 2
        assert "bench --attention needs a CUDA GPU" in capsys.readouterr().err


def test_bench_counts_the_bytes_of_a_quantized_checkpoint(tmp_path, capsys):
    """Quantized weights live in buffers: they must be counted, and the cuBLAS roof does not apply."""
    plain, quantized = tmp_path / "plain.json", tmp_path / "int8.json"
    args = ["--device", "cpu", "--prompt-len", "8", "--prompt-lengths", "8", "--new-tokens", "3", "--runs", "1",
            "--ceiling-gib", "0.01"]
    assert main(["quantize", "--mode", "int8", "--out", str(tmp_path / "int8")]) == 0
    assert main(["bench", *args, "--json", str(plain)]) == 0
    assert main(["bench", *args, "--model", str(tmp_path / "int8"), "--json", str(quantized)]) == 0
    plain, quantized = json.loads(plain.read_text()), json.loads(quantized.read_text())
    # int8 codes + per-channel scales vs fp32 weights: about a quarter (the embedding is not counted;
    # the tied output projection is, in fp32 for one and in int8 for the other).
    assert 0.2 < quantized["weights_gb"] / plain["weights_gb"] < 0.35
    assert quantized["decode"][0]["roof_tokens_per_s"] is None and plain["decode"][0]["roof_tokens_per_s"] > 0
    assert "n/a (quantized)" in capsys.readouterr().out
    # Quantizing at load (--quantize) counts the same bytes as loading the quantized checkpoint.
    on_the_fly = tmp_path / "fly.json"
    assert main(["bench", *args, "--quantize", "int8", "--json", str(on_the_fly)]) == 0
    assert json.loads(on_the_fly.read_text())["weights_gb"] == quantized["weights_gb"]


def test_inductor_options_parse_and_bad_ones_are_clear_errors(capsys):
    from blitzgen.cli import inductor_option

    assert inductor_option("combo_kernels=true") == ("combo_kernels", True)
    assert inductor_option("triton.enable_pdl=False") == ("triton.enable_pdl", False)
    assert inductor_option("realize_reads_threshold=1") == ("realize_reads_threshold", 1)
    assert inductor_option("x=0.5") == ("x", 0.5) and inductor_option("mode=fast") == ("mode", "fast")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--device", "cpu", "--inductor", "combo_kernels"])
    assert exit_info.value.code == 2
    assert "expected KEY=VALUE, got 'combo_kernels'" in capsys.readouterr().err


def test_generator_hands_inductor_options_to_torch_compile(monkeypatch):
    import blitzgen.generate

    seen = []
    monkeypatch.setattr(blitzgen.generate.torch, "compile", lambda fn, **kw: seen.append(kw["options"]) or fn)
    gen = blitzgen.generate.load(device="cpu", compile=True)
    gen.inductor_options = {"combo_kernels": True}
    gen._compiled_decode_step()
    # Every compiled graph of the step (the block, the embedding, the greedy and both sampled tails) gets them.
    assert seen == [{"coordinate_descent_tuning": False, "combo_kernels": True}] * 5
    # Coordinate-descent tuning (on by default on CUDA) is for the block only unless TUNE_ENDS asks for it everywhere.
    for tune_ends, expected in [(False, [False] * 4 + [True]), (True, [True] * 5)]:  # the block last
        monkeypatch.setattr(blitzgen.generate, "TUNE_ENDS", tune_ends)
        seen.clear()
        gen = blitzgen.generate.load(device="cpu", compile=True)
        gen.coordinate_descent_tuning = True
        gen._compiled_decode_step()
        assert [options["coordinate_descent_tuning"] for options in seen] == expected


def test_bench_variants_run_interleaved_in_one_process(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--device", "cpu", "--prompt-len", "8", "--prompt-lengths", "8", "--new-tokens", "4",
                 "--runs", "1", "--ceiling-gib", "0.01", "--variants",
                 "base,rope-kernel,rope-kernel+combo-kernels+inductor:max_autotune=false",
                 "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["variants"]
    assert [r["variant"] for r in rows] == ["base", "rope-kernel", "rope-kernel+combo-kernels+inductor:max_autotune=false"]
    for r in rows:
        assert len(r["runs_ms"]) == 3  # at least 3 interleaved runs whatever --runs says
        assert abs(r["step_ms"] * r["tokens_per_s"] - 1000) < 1e-6 and r["launches_per_step"] > 0
    assert rows[0]["vs_first"] == 1.0
    assert "| variant (one process, runs interleaved) | batch |" in capsys.readouterr().out


def test_bench_repeated_variant_keeps_its_own_runs(tmp_path):
    """"base,base" times two captures of the same code: each row has its own 3 runs, not both rows' 6."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--prompt-len", "8", "--prompt-lengths", "8", "--new-tokens", "4",
                 "--runs", "1", "--ceiling-gib", "0.01", "--variants", "base,base", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["variants"]
    assert [len(r["runs_ms"]) for r in rows] == [3, 3]


def test_bench_unknown_variant_is_a_clear_error(capsys):
    assert main(["bench", "--device", "cpu", "--variants", "base,fast"]) == 2
    assert "--variants: unknown variant 'fast'; expected base, rope-kernel" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--variants", "inductor:combo_kernels"]) == 2
    assert "expected KEY=VALUE, got 'combo_kernels'" in capsys.readouterr().err


def test_variants_at_each_batch_size_with_module_constants(tmp_path, capsys, monkeypatch):
    """set:MODULE.NAME=VALUE variants, a tuple value with commas included, timed at every --batch-size; the
    constants hold while each variant's step is built and are restored afterwards; kernel totals only at batch 1
    (the profile replays a batch-1 step)."""
    import blitzgen.bench
    from blitzgen.kernels import decode_attention, int4_gemv

    built_with, prepare = [], blitzgen.bench.prepare_decode
    monkeypatch.setattr(blitzgen.bench, "prepare_decode", lambda gen, batch, *a: built_with.append(
        (batch, decode_attention.NUM_WARPS, int4_gemv.PAIRS_ROWS)) or prepare(gen, batch, *a))

    out = tmp_path / "bench.json"
    variants = "base,set:kernels.decode_attention.NUM_WARPS=1+set:kernels.int4_gemv.PAIRS_ROWS=(16, 32, 128, 4)"
    assert main(["bench", "--device", "cpu", "--prompt-len", "8", "--prompt-lengths", "8", "--new-tokens", "4",
                 "--runs", "1", "--ceiling-gib", "0.01", "--batch-size", "1", "--batch-size", "2",
                 "--variants", variants, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["variants"]
    assert [(r["batch"], r["variant"]) for r in rows] == [(1, "base"), (1, variants[5:]), (2, "base"), (2, variants[5:])]
    assert [r["launches_per_step"] is None for r in rows] == [False, False, True, True]
    changed, defaults = (1, (16, 32, 128, 4)), (2, (16, 64, 256, 4))
    assert [b for b in built_with if b[1:] == changed] == [(1, *changed), (2, *changed)]  # the variant's builds
    assert all(b[1:] in (changed, defaults) for b in built_with)  # every other build had the defaults
    assert rows[2]["vs_first"] == 1.0
    assert decode_attention.NUM_WARPS == 2 and int4_gemv.PAIRS_ROWS == (16, 64, 256, 4)
    assert "| - | - |" in capsys.readouterr().out


def test_module_constants_are_set_inside_and_restored_after_an_error():
    from blitzgen.bench import module_constants
    from blitzgen.kernels import decode_attention

    with pytest.raises(RuntimeError):
        with module_constants({("kernels.decode_attention", "NUM_WARPS"): 8,
                               ("kernels.decode_attention", "SPLIT_MIN_TILES"): 4}):
            assert (decode_attention.NUM_WARPS, decode_attention.SPLIT_MIN_TILES) == (8, 4)
            raise RuntimeError("inside")
    assert (decode_attention.NUM_WARPS, decode_attention.SPLIT_MIN_TILES) == (2, 2)


@pytest.mark.parametrize("piece, message", [
    ("set:NUM_WARPS=4", "expected MODULE.NAME=VALUE"),
    ("set:kernels.nope.X=1", "no module blitzgen.kernels.nope"),
    ("set:kernels.decode_attention.NUM_WARP=4", "has no constant NUM_WARP"),
    ("set:kernels.decode_attention.plan_splits=4", "has no constant plan_splits"),
    ("set:kernels.decode_attention.NUM_WARPS=four", "'four' is not a Python literal"),
    ("set:kernels.decode_attention.NUM_WARPS=4.0", "NUM_WARPS holds int values, got 4.0"),
])
def test_bad_module_constant_is_a_clear_error(capsys, piece, message):
    assert main(["bench", "--device", "cpu", "--variants", f"base,{piece}"]) == 2
    err = capsys.readouterr().err
    assert f"--variants: {piece!r}: " in err and message in err and "Traceback" not in err


def test_variants_join_their_settings():
    from blitzgen.bench import parse_variants

    assert parse_variants("base, combo-kernels+inductor:triton.enable_pdl=true+rope-kernel") == [
        ("base", {}),
        ("combo-kernels+inductor:triton.enable_pdl=true+rope-kernel",
         {"inductor_options": {"combo_kernels": True, "triton.enable_pdl": True}, "rope_kernel": True}),
    ]
    assert parse_variants("set:quantize.INT4_ACTIVATIONS_INT8=False+set:kernels.int4_gemv.MANY_ROWS=(16, 64, 128, 4)") == [
        ("set:quantize.INT4_ACTIVATIONS_INT8=False+set:kernels.int4_gemv.MANY_ROWS=(16, 64, 128, 4)",
         {"constants": {("quantize", "INT4_ACTIVATIONS_INT8"): False, ("kernels.int4_gemv", "MANY_ROWS"): (16, 64, 128, 4)}}),
    ]




def test_bench_times_the_sampled_step_with_temperature(tmp_path, capsys):
    """--temperature times (and profiles) the sampled step, the one generate() runs for such requests: with top-p
    the sampler that sorts the vocabulary, without it the one that does not."""

    def profiled(extra):
        out = tmp_path / "bench.json"
        assert main(["bench", "--device", "cpu", "--prompt-len", "8", "--prompt-lengths", "8", "--new-tokens", "4",
                     "--runs", "1", "--ceiling-gib", "0.01", "--profile", "--json", str(out)] + extra) == 0
        res = json.loads(out.read_text())
        return res, {row["name"] for row in res["profile"]}

    (greedy, _), (sampled, sampled_ops) = profiled([]), profiled(["--temperature", "0.8"])
    assert greedy["temperature"] == 0 and sampled["temperature"] == 0.8
    assert "aten::sort" not in sampled_ops
    assert "sampled at temperature 0.8" in capsys.readouterr().out
    nucleus, nucleus_ops = profiled(["--temperature", "0.8", "--top-p", "0.9"])
    assert nucleus["top_p"] == 0.9
    assert {"aten::sort", "blitzgen::cumsum_rows"} <= nucleus_ops
    assert "sampled at temperature 0.8 with top-p 0.9" in capsys.readouterr().out
    assert main(["bench", "--device", "cpu", "--temperature", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "blitzgen: error: invalid temperature=-1.0: expected a number >= 0 (0 = greedy)"
    assert main(["bench", "--device", "cpu", "--temperature", "1", "--top-p", "0"]) == 2
    assert capsys.readouterr().err.strip() == "blitzgen: error: invalid top_p=0.0: expected a number in (0, 1]"
