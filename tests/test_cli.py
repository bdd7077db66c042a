"""The `blitzgen` command: the default model runs with no arguments but a prompt, output equals
the Python API's, and user mistakes give one line and exit status 2, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

import blitzgen
from blitzgen.cli import main

PROMPT = "To be, or not to be"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_default_model_streams_and_prints_stats(capsys):
    code, out, err = run(capsys, "generate", "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "24")
    assert code == 0
    expected = blitzgen.load().generate([PROMPT], blitzgen.SamplingParams(temperature=0, max_new_tokens=24))[0]
    assert out == PROMPT + expected.text + "\n"
    assert len(expected.text) > 0
    stats = err.strip().splitlines()[-1]
    assert stats.startswith("[prompt tokens ") and "new tokens" in stats and "time to first token" in stats
    assert "tokens/s]" in stats


def test_generate_batch_and_prompt_file(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\n\nJULIET:\n")
    code, out, _ = run(capsys, "generate", "--prompt-file", str(prompts), "--prompt", "HAMLET:",
                       "--temperature", "0", "--max-new-tokens", "8")
    assert code == 0
    gen = blitzgen.load()
    done = gen.generate(["HAMLET:", "ROMEO:", "JULIET:"], blitzgen.SamplingParams(temperature=0, max_new_tokens=8))
    for i, (prompt, c) in enumerate(zip(["HAMLET:", "ROMEO:", "JULIET:"], done)):
        assert f"--- [{i}] finish: {c.finish_reason}\n{prompt}{c.text}\n" in out


def test_same_seed_same_text(capsys):
    args = ("generate", "--prompt", PROMPT, "--max-new-tokens", "20", "--temperature", "1")
    first = run(capsys, *args, "--seed", "123")[1]
    assert run(capsys, *args, "--seed", "123")[1] == first
    assert run(capsys, *args, "--seed", "124")[1] != first


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", "x", "--model", "/nonexistent/model"], "/nonexistent/model: not a directory"),
        (["generate", "--prompt", "x", "--temperature", "-1"], "invalid temperature=-1.0"),
        (["generate", "--prompt", "x", "--top-p", "1.5"], "invalid top_p=1.5"),
        (["generate", "--prompt", "x", "--min-p", "2"], "invalid min_p=2.0"),
        (["generate", "--prompt", "x", "--top-k", "-3"], "invalid top_k=-3"),
        (["generate", "--prompt", "x", "--max-new-tokens", "0"], "invalid max_new_tokens=0"),
        (["generate", "--prompt-file", "/nonexistent/prompts.txt"], "no such file"),
        (["generate"], "no prompt"),
        (["generate", "--prompt", "x " * 600, "--max-new-tokens", "10"], "exceeds the context"),
        (["generate", "--prompt", "x", "--device", "cuda:0"] if not __import__("torch").cuda.is_available() else
         ["generate", "--prompt", "x", "--device", "tpu"], "--device"),
    ],
)
def test_user_errors_are_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    error_lines = [line for line in err.splitlines() if line.startswith("blitzgen: error:")]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert "Traceback" not in err


def test_bad_checkpoint_dir_names_the_file(capsys, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    code, _, err = run(capsys, "generate", "--prompt", "x", "--model", str(tmp_path))
    assert code == 2
    assert "config.json" in err and "'gpt2' is not supported" in err and "Traceback" not in err


def test_truncate_keeps_the_end_of_a_long_prompt(capsys):
    code, out, _ = run(capsys, "generate", "--prompt", "x " * 600, "--max-new-tokens", "4", "--truncate")
    assert code == 0


def test_chat_reset_and_exit(capsys, monkeypatch):
    lines = iter(["To be", "/reset", "Or not", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = run(capsys, "chat", "--temperature", "0", "--max-new-tokens", "6")
    assert code == 0
    assert "(conversation cleared)" in err
    gen = blitzgen.load()
    params = blitzgen.SamplingParams(temperature=0, max_new_tokens=6)
    # The default model has no chat template: each turn continues the raw text; after /reset, from scratch.
    expected = [gen.generate(["To be"], params)[0].text, gen.generate(["Or not"], params)[0].text]
    assert out == expected[0] + "\n" + expected[1] + "\n"


def test_chat_ends_on_ctrl_d(capsys, monkeypatch):
    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    assert run(capsys, "chat")[0] == 0


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "blitzgen"  # pip puts console scripts beside the interpreter
    result = subprocess.run([str(script), "generate", "--prompt", "x", "--top-p", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "blitzgen: error: invalid top_p=0.0: expected a number in (0, 1]"
