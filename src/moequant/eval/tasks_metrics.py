"""Multiple-choice scoring from per-choice log-likelihoods (pure), per-task summaries with bootstrap
CIs, and the paired accuracy delta between two ``eval tasks`` results on the same examples."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moequant.errors import MoequantError
from moequant.eval.bootstrap import bootstrap_mean_ci, paired_mean, verdict_from_ci

METRICS = ("acc", "acc_norm")


def predictions(loglik: list[float], choice_chars: list[int]) -> tuple[int, int]:
    """(argmax of log-likelihood, argmax of log-likelihood / characters of the choice); ties go to the
    first choice (numpy argmax), as in lm-eval."""
    ll = np.asarray(loglik, dtype=np.float64)  # [n_choices]
    chars = np.asarray(choice_chars, dtype=np.float64)  # [n_choices]
    if ll.shape != chars.shape or ll.size < 2:
        raise ValueError(f"need >= 2 choices with one length each, got {ll.size} log-likelihoods, {chars.size} lengths")
    return int(np.argmax(ll)), int(np.argmax(ll / chars))


def score_example(loglik: list[float], choices: list[str], answer: int) -> dict[str, Any]:
    """``pred``, ``pred_norm`` and 0/1 ``acc``, ``acc_norm`` of one example."""
    pred, pred_norm = predictions(loglik, [len(c) for c in choices])
    return {"pred": pred, "pred_norm": pred_norm, "acc": int(pred == answer), "acc_norm": int(pred_norm == answer)}


def summarize_task(examples: list[dict[str, Any]], n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> dict[str, Any]:
    """n, acc and acc_norm (means of the per-example 0/1 values) with percentile-bootstrap CIs, and the
    chance level (mean of 1 / number of choices)."""
    if not examples:
        raise ValueError("no examples to summarize")
    out: dict[str, Any] = {"n": len(examples)}
    for m in METRICS:
        v = np.array([e[m] for e in examples], dtype=np.float64)  # [n]
        lo, hi = bootstrap_mean_ci(v, n_boot=n_boot, seed=seed, level=level)
        out[m] = float(v.mean())
        out[f"{m}_ci95" if level == 0.95 else f"{m}_ci"] = [lo, hi]
    out["chance"] = float(np.mean([1.0 / len(e["loglik"]) for e in examples]))
    return out


@dataclass(frozen=True)
class TaskDelta:
    """Paired comparison of two runs on one task: ``delta = metric(A) - metric(B)`` over the same
    examples, with a paired percentile-bootstrap CI (A the candidate, B the reference:
    ``moequant.eval.bootstrap``'s convention)."""

    task: str
    metric: str
    value_a: float
    value_b: float
    delta: float
    delta_ci: tuple[float, float]
    n: int
    n_boot: int
    level: float
    seed: int

    @property
    def verdict(self) -> str:
        """"A better" / "A worse" / "no difference within CI" (higher accuracy is better)."""
        v = verdict_from_ci(*self.delta_ci, lower_is_better=False)
        return {"better": "A better", "worse": "A worse"}.get(v, v)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["delta_ci"] = list(self.delta_ci)
        out["verdict"] = self.verdict
        return out


def _examples(run: dict[str, Any], task: str, which: str) -> list[dict[str, Any]]:
    try:
        return run["results"][task]["examples"]
    except (KeyError, TypeError):
        have = ", ".join(run.get("results", {})) if isinstance(run, dict) else "?"
        raise MoequantError(f"run {which} has no per-example results for task {task!r} (it has: {have})") from None


def task_acc_delta(run_a: dict[str, Any], run_b: dict[str, Any], task: str, metric: str = "acc",
                   n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> TaskDelta:
    """Paired delta ``metric(A) - metric(B)`` on ``task`` from two ``moequant eval tasks`` JSON results
    (dicts as loaded with ``json.load``). Examples are matched by ``idx``; both runs must hold the same
    examples with the same answers, else ``MoequantError``."""
    if metric not in METRICS:
        raise MoequantError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    ea, eb = _examples(run_a, task, "A"), _examples(run_b, task, "B")
    a = {e["idx"]: e for e in ea}
    b = {e["idx"]: e for e in eb}
    if a.keys() != b.keys():
        raise MoequantError(f"task {task!r}: runs A and B scored different examples ({len(a)} vs {len(b)}, "
                            f"{len(a.keys() ^ b.keys())} not shared); rerun with the same --limit")
    ids = sorted(a)
    if any(a[i]["answer"] != b[i]["answer"] for i in ids):
        raise MoequantError(f"task {task!r}: runs A and B disagree on answers: not the same task data")
    va = np.array([a[i][metric] for i in ids], dtype=np.float64)  # [n]
    vb = np.array([b[i][metric] for i in ids], dtype=np.float64)  # [n]
    md = paired_mean(va, vb, n_boot=n_boot, seed=seed, level=level)  # delta = va - vb
    return TaskDelta(task=task, metric=metric, value_a=float(va.mean()), value_b=float(vb.mean()), delta=md.delta,
                     delta_ci=md.delta_ci, n=len(ids), n_boot=n_boot, level=level, seed=seed)
