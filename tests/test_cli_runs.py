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
