"""The GPU benchmark scripts run end to end on tiny shapes on the CPU (--dry-run), so a lent GPU's
scarce minutes are never lost to a script that cannot even start. Their figures are not checked here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script, expected", [
    ("blitzgen/attention_bench.py", "| batch | live | ours |"),
    ("benchmarks/quant_bench.py", "| int4 g128 |"),
    ("benchmarks/long_context_bench.py", "| 3 | 300 |"),
])
def test_dry_run(script, expected):
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, str(ROOT / script), "--dry-run"], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout
