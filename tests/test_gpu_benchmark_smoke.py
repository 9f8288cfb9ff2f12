"""benchmarks/gpu_kernels.py stays runnable between lent GPUs (device time is rare: a script broken since the last
one would waste it): its ``--smoke`` mode runs every code path — linears, the tile sweep with split-K, decode then
matmul, the expert stack — on tiny shapes under Triton's interpreter, and every kernel's float32 output must
match the reference decode; ``--table`` renders the JSON it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_and_table(tmp_path):
    out = tmp_path / "gk.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), MOEQUANT_NO_EXT="1")
    script = str(ROOT / "benchmarks" / "gpu_kernels.py")
    run = subprocess.run([sys.executable, script, "--smoke", "--sweep", "--json", str(out)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    d = json.loads(out.read_text())
    methods = {r["method"] for r in d["linears"]}
    assert methods == {"bf16", "int4-g128", "int4-g128-sym", "int3-g128", "int2-g128", "trellis-2b-hyb"}
    packed = [r for r in d["linears"] if r["method"] != "bf16"]
    assert len(packed) == 10  # 5 methods x rows (1, 3)
    assert all(r["rel_err_fp32_vs_reference"] < 1e-5 for r in packed)
    assert all(r["rel_err_vs_reference"] < 1e-2 for r in packed)  # float16 activations under the interpreter
    assert all("decode_then_cublas_ms" in r for r in packed)
    swept = [r for r in packed if "sweep_ms" in r]
    assert {r["method"] for r in swept} == {"int4-g128", "trellis-2b-hyb"}
    assert set(swept[0]["sweep_ms"]) == {"gemv-bn16-bk64", "gemv-bn32-bk128-split8"}
    experts = [r for r in d["experts"] if r["method"] in ("int4-g128", "trellis-2b-hyb")]
    assert len(experts) == 4 and all(r["rel_err_vs_reference"] < 1e-2 for r in experts)
    table = subprocess.run([sys.executable, script, "--table", str(out)], env=env, capture_output=True, text=True,
                           timeout=120)
    assert table.returncode == 0, table.stderr[-2000:]  # int4: two linear rows, two expert batches
    assert table.stdout.count("| int4-g128 |") == 4 and "gemv-bn32-bk128-split8" in table.stdout
