"""Shared by the benchmarks that run the real ``moequant`` command line in subprocesses (exactly the user
path), one heavy job at a time, reusing what an earlier, interrupted run of the same script finished:
a checkpoint whose ``report.json`` exists is not quantized again, an eval JSON that exists is not re-run."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from moequant.eval.bootstrap import PplDelta, paired_delta_ci
from moequant.finetune.loop import work_dir_for
from moequant.runinfo import run_info

log = logging.getLogger("benchmarks")

MOEQUANT = [sys.executable, "-m", "moequant.cli", "-q"]


def run(cmd: list[str]) -> float:
    """Run ``cmd`` (failing loudly); its wall time in seconds."""
    log.info("$ %s", " ".join(cmd))
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return round(time.time() - t0, 1)


def quantize(model: str, flags: list[str], out: Path) -> tuple[list[str], float]:
    """``moequant quantize MODEL FLAGS --out OUT`` unless ``OUT/report.json`` exists (then NaN seconds). An
    interrupted run is continued with ``--resume`` when it left its progress directory (``resume.py``: the
    finished layers; a run of another job there is refused by the CLI); a directory left without report or
    progress is replaced. The seconds are this call's only."""
    cmd = [*MOEQUANT, "quantize", model, *flags, "--out", str(out)]
    if (out / "report.json").is_file():
        return cmd, float("nan")
    if (out.parent / f".{out.name}.moequant-run").is_dir():
        return cmd, run(cmd + ["--resume"] + (["--overwrite"] if out.exists() else []))
    return cmd, run(cmd + (["--overwrite"] if out.exists() else []))


def quantize_seconds(run_dir: Path, call_seconds: float) -> float | None:
    """A quantize's time for a table: ``call_seconds`` when that call made the whole checkpoint; when it continued
    an interrupted run (or made nothing: NaN), the report's layer-loop time summed over every run that made the
    checkpoint (``layer_seconds.total``; None when an older report lacks a restored layer's time)."""
    ls = json.loads((run_dir / "report.json").read_text()).get("layer_seconds") or {}
    if call_seconds == call_seconds and not ls.get("restored"):
        return call_seconds
    return ls.get("total")


def finetune(run_dir: Path, flags: list[str], out: Path) -> tuple[list[str], float]:
    """``moequant finetune RUN FLAGS --out OUT`` unless ``OUT/report.json`` exists (then NaN seconds). An
    interrupted finetune is continued with ``--resume`` where it left its work directory (its last saved
    step); an output directory without a report is replaced. The seconds are this call's only."""
    cmd = [*MOEQUANT, "finetune", str(run_dir), *flags, "--out", str(out)]
    if (out / "report.json").is_file():
        return cmd, float("nan")
    extra = (["--resume"] if work_dir_for(out).exists() else []) + (["--overwrite"] if out.exists() else [])
    return cmd, run(cmd + extra)


def eval_ppl(model: str, out: Path, max_tokens: int | None, data: str = "ptb") -> tuple[dict[str, Any], list[str], float]:
    """``moequant eval ppl MODEL --data DATA --json OUT [--max-tokens N]`` unless ``OUT`` exists (then NaN
    seconds): (its JSON, the command, seconds). Run with ``--resume``: an eval killed earlier continues from
    its last scored batch (the seconds are this call's only)."""
    cmd = [*MOEQUANT, "eval", "ppl", model, "--data", data, "--json", str(out)]
    if max_tokens:
        cmd += ["--max-tokens", str(max_tokens)]
    secs = float("nan") if out.is_file() else run(cmd + ["--resume"])
    return json.loads(out.read_text()), cmd, secs


def paired(base: dict[str, Any], res: dict[str, Any]) -> PplDelta:
    """Paired bootstrap of ``res``'s PPL against ``base``'s over their (identical) windows."""
    return paired_delta_ci(base["nll_per_window"], base["tokens_per_window"], res["nll_per_window"],
                           res["tokens_per_window"])


def write_json(path: Path, payload: dict[str, Any], script: str) -> None:
    """``payload`` plus this run's command, versions, machine and git commit."""
    from moequant.fsutil import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**payload, **run_info([script, *sys.argv[1:]])})


def previous_rows(out_json: Path, settings: dict[str, Any], script: str) -> dict[str, dict[str, Any]]:
    """The finished rows of an earlier run of ``script`` into ``out_json`` (empty when there is none); exits with
    one line when that run used other ``settings`` (its rows would not be comparable)."""
    old = json.loads(out_json.read_text()) if out_json.is_file() else None
    if old is not None and old["settings"] != settings:
        sys.exit(f"{script}: {out_json} was made with {old['settings']}, not {settings}; give another --json")
    return old["rows"] if old else {}


def fp_reference(model: str, out: Path, max_tokens: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``eval ppl`` of the unquantized ``model`` (reused when ``out`` exists) -> (its result, the row kept in a
    benchmark JSON: PPL, windows, per-window NLLs, the command and its seconds)."""
    base, cmd, secs = eval_ppl(model, out, max_tokens)
    fp = {k: base[k] for k in ("ppl", "tokens", "n_windows", "seqlen", "nll_per_window", "tokens_per_window")}
    fp.update(eval_command=" ".join(cmd), seconds_eval=secs)
    return base, fp


def median_seconds(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """``fn`` once to warm (kernel builds, caches), then ``repeats`` timed calls: their median wall time in seconds
    and the last call's result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out
