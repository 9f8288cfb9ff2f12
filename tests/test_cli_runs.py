"""benchmarks/_cli_runs.py's ``finetune``: what a rerun of a benchmark passes to ``moequant finetune`` for each
state an earlier, interrupted run may have left (a finished output, a work directory, a stray output)."""

from __future__ import annotations

import math
from pathlib import Path

from conftest import BENCHMARKS, bench_module

def _module():
    return bench_module(BENCHMARKS / "_cli_runs.py", "_cli_runs")


def test_finetune_resumes_replaces_or_skips(tmp_path, monkeypatch):
    m = _module()
    calls = []
    monkeypatch.setattr(m, "run", lambda cmd: calls.append(cmd[len(m.MOEQUANT):]) or 7.5)
    out = tmp_path / "run-pv"
    base = ["finetune", "RUN", "--method", "pv", "--steps", "3", "--out", str(out)]

    assert m.finetune(Path("RUN"), ["--method", "pv", "--steps", "3"], out) == ([*m.MOEQUANT, *base], 7.5)
    (tmp_path / ".run-pv.moequant-finetune").mkdir()  # an interrupted run's saved steps
    m.finetune(Path("RUN"), ["--method", "pv", "--steps", "3"], out)
    out.mkdir()  # and an output without a report
    m.finetune(Path("RUN"), ["--method", "pv", "--steps", "3"], out)
    assert calls == [base, base + ["--resume"], base + ["--resume", "--overwrite"]]

    (out / "report.json").write_text("{}")  # finished: not run again
    cmd, secs = m.finetune(Path("RUN"), ["--method", "pv", "--steps", "3"], out)
    assert cmd == [*m.MOEQUANT, *base] and math.isnan(secs) and len(calls) == 3


def test_quantize_seconds_counts_every_run_of_a_resumed_checkpoint(tmp_path):
    m = _module()
    rep = tmp_path / "report.json"
    rep.write_text('{"layer_seconds": {"total": 812.5, "this_run": 300.0, "restored": 0}}')
    assert m.quantize_seconds(tmp_path, 840.2) == 840.2  # one call made it all: its wall time
    assert m.quantize_seconds(tmp_path, float("nan")) == 812.5  # reused: the report's layer time
    rep.write_text('{"layer_seconds": {"total": 812.5, "this_run": 300.0, "restored": 4}}')
    assert m.quantize_seconds(tmp_path, 310.0) == 812.5  # continued: every run's layers, not this call's
    rep.write_text('{"layer_seconds": {"total": null, "this_run": 300.0, "restored": 4}}')
    assert m.quantize_seconds(tmp_path, 310.0) is None  # an older report: unknown, not this call's 310
    rep.write_text("{}")
    assert m.quantize_seconds(tmp_path, 5.0) == 5.0
