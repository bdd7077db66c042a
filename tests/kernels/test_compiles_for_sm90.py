"""Every kernel launch compiles for sm_90 (H100 / H200), checked on a CPU: what the interpreter cannot see."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


def test_every_kernel_launch_compiles_for_sm90(tmp_path):
    # A process of its own: this one has TRITON_INTERPRET=1 set (conftest), which turns every kernel
    # into interpreted Python at import time. A fresh Triton cache, so that nothing compiled is reused.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = Path(__file__).resolve().parents[2]  # blitzgen importable where it is not installed (the GPU machine)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    script = Path(__file__).with_name("sm90_compile.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = {line.split()[0] for line in done.stdout.splitlines()}
    assert compiled == {"_int8_gemv_kernel", "_int4_gemv_kernel", "_gemv_a8_kernel", "_int8_dequantize_kernel",
                        "_int4_dequantize_kernel", "_decode_attention_kernel", "_decode_attention_merge_kernel",
                        "_rope_cache_kernel", "_gemv_kernel", "_gemv_rope_kernel"}
