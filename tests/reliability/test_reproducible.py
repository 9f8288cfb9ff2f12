"""Same inputs, flags and seed -> identical checkpoint bytes, across separate processes (each with its own
hash seeds: safetensors' own writer put its metadata keys in a per-process random order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import save_toy_olmoe


def _quantize(model, text, out, *flags) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "moequant.cli", "-q", "quantize", str(model), "--bits", "3", "--group-size", "32",
           "--calib", str(text), "--calib-samples", "4", "--calib-seqlen", "32", "--out", str(out), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("offload", [False, True], ids=["memory", "offload"])
def test_two_runs_write_identical_bytes(tmp_path, offload):
    model, text = save_toy_olmoe(tmp_path, "m", 3000)
    flags = ["--offload"] if offload else []
    _quantize(model, text, tmp_path / "a", *flags)  # the defaults at 3 bits: LDLQ + RHT, calibrated
    _quantize(model, text, tmp_path / "b", *flags)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert {"model.safetensors.index.json", "config.json", "report.json"} <= set(files)
    assert any(f.endswith(".safetensors") for f in files)
    for name in files:
        if name == "report.json":  # timings and RSS differ; everything the checkpoint is made of may not
            continue
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in "ab")
    untimed = lambda r: [{k: v for k, v in t.items() if k != "seconds"} for t in r["quantized_tensors"]]  # noqa: E731
    assert untimed(ra) == untimed(rb) and ra["solver"]["incoherence"] == "rht"
