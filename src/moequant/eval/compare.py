"""Comparison rows of ``moequant compare`` (pure functions on eval JSONs): same-window checks, PPL
and accuracy with 95% CIs, paired deltas against a baseline, the gate verdict, and the markdown report.

**The gate.** Every run is compared with the baseline over the *same* windows (perplexity) or the
*same* examples (tasks) by a paired percentile bootstrap (``moequant.eval.bootstrap``): each replicate
resamples window (example) indices once and applies them to both runs. The run is the candidate A, the
baseline the reference B of the package's convention (A − B, A / B). With ``[lo, hi]`` the CI (level
``level``, default 95%):

- perplexity, from the CI of the ratio ``PPL_run / PPL_base``: **"worse"** when ``lo > 1``, **"better"**
  when ``hi < 1``, otherwise (``lo <= 1 <= hi``) **"no worse than baseline within CI"**;
- accuracy, from the CI of ``acc_run - acc_base``: "worse" when ``hi < 0``, "better" when ``lo > 0``,
  otherwise "no worse than baseline within CI".

With a tolerance (``GateConfig``: ``ppl_margin`` m, ``acc_margin`` a) "worse" needs ``lo > 1 + m``
(resp. ``hi < -a``): the data must rule out every degradation up to the tolerance. The default is 0; a
paired CI over thousands of tokens resolves differences of 0.02% (llama.cpp's F16 copy of the model is
"worse" than fp32 at m = 0), so a gate in CI usually wants m > 0.

"No worse than baseline within CI" means the data cannot tell the run from the baseline at that level:
it is not a proof of equivalence (a wide CI passes easily; read its width), and with many rows some
"worse"/"better" verdicts are expected by chance (no multiple-comparison correction).
The ratio CI contains 1 exactly when the CI of ``PPL_run - PPL_base`` (the same replicates) contains 0,
so the verdict is ``verdict_from_ci`` of the ratio CI shifted by 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from moequant.errors import MoequantError
from moequant.eval.bootstrap import (
    BETTER,
    WORSE,
    bootstrap_ci,
    bootstrap_mean_ci,
    paired_mean,
    paired_ppl,
    verdict_from_ci,
)

GATE_BETTER = "better"
GATE_WORSE = "worse"
GATE_NO_WORSE = "no worse than baseline within CI"
GATE_BASELINE = "baseline"

# Fields of a perplexity JSON that define its windows; a field missing from either JSON is not compared
# (a peer's JSON may lack data/split), but tokens_per_window always is.
PROTOCOL_FIELDS = ("data", "split", "seqlen", "stride", "add_bos", "max_tokens", "n_windows")


@dataclass(frozen=True)
class StatsConfig:
    """Bootstrap replicates, seed and CI level used for every interval of a comparison."""

    n_boot: int = 2000
    seed: int = 0
    level: float = 0.95

    def __post_init__(self) -> None:
        if self.n_boot < 100:
            raise MoequantError(f"--n-boot must be >= 100, got {self.n_boot}")
        if not 0.5 <= self.level < 1.0:
            raise MoequantError(f"--level must be in [0.5, 1), got {self.level}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateConfig:
    """Tolerances of the gate: a run is "worse" only when its whole CI lies beyond them.
    ``ppl_margin``: relative PPL increase (0.01 = 1%); ``acc_margin``: accuracy drop (0.01 = 1 point)."""

    ppl_margin: float = 0.0
    acc_margin: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.ppl_margin < 1.0 or not 0.0 <= self.acc_margin < 1.0:
            raise MoequantError(f"--ppl-margin and --acc-margin must be in [0, 1), got {self.ppl_margin}, "
                                f"{self.acc_margin}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate(verdict: str) -> str:
    """Map ``verdict_from_ci``'s words to the gate's: better / worse / no worse than baseline within CI."""
    return {BETTER: GATE_BETTER, WORSE: GATE_WORSE}.get(verdict, GATE_NO_WORSE)


def ppl_gate(ratio_ci: tuple[float, float], margin: float = 0.0) -> str:
    """Gate verdict from the CI of PPL_run / PPL_base (lower is better): "worse" when the whole CI lies
    above ``1 + margin``, "better" when it lies below 1."""
    if ratio_ci[0] > 1.0 + margin:
        return GATE_WORSE
    v = gate(verdict_from_ci(ratio_ci[0] - 1.0, ratio_ci[1] - 1.0, lower_is_better=True))
    return GATE_NO_WORSE if v == GATE_WORSE else v  # worse, but within the tolerance


def acc_gate(delta_ci: tuple[float, float], margin: float = 0.0) -> str:
    """Gate verdict from the CI of acc_run - acc_base (higher is better): "worse" when the whole CI lies
    below ``-margin``, "better" when it lies above 0."""
    if delta_ci[1] < -margin:
        return GATE_WORSE
    v = gate(verdict_from_ci(delta_ci[0], delta_ci[1], lower_is_better=False))
    return GATE_NO_WORSE if v == GATE_WORSE else v  # worse, but within the tolerance


# ---------------------------------------------------------------- perplexity


def ppl_protocol(obj: dict[str, Any]) -> dict[str, Any]:
    """The window-defining fields a perplexity JSON records (see ``PROTOCOL_FIELDS``)."""
    return {k: obj[k] for k in PROTOCOL_FIELDS if k in obj}


def check_same_windows(base_where: str, base: dict[str, Any], where: str, obj: dict[str, Any]) -> None:
    """Refuse (``MoequantError``) unless ``obj`` was scored on the baseline's windows: every protocol field
    both record is equal, and ``tokens_per_window`` is equal window by window."""
    pa, pb = ppl_protocol(base), ppl_protocol(obj)
    for k in PROTOCOL_FIELDS:
        if k in pa and k in pb and pa[k] != pb[k]:
            raise MoequantError(f"{where} was scored on other windows than the baseline {base_where}: {k} = "
                                f"{pb[k]!r} vs {pa[k]!r} (re-score both with the same --data/--seqlen/--stride/"
                                "--max-tokens/BOS)")
    ta = np.asarray(base["tokens_per_window"], dtype=np.int64)
    tb = np.asarray(obj["tokens_per_window"], dtype=np.int64)
    if ta.shape != tb.shape:
        raise MoequantError(f"{where} has {tb.size} windows but the baseline {base_where} has {ta.size}: "
                            "not the same windows")
    if not np.array_equal(ta, tb):
        i = int(np.flatnonzero(ta != tb)[0])
        raise MoequantError(f"{where} scores {tb[i]} tokens in window {i} but the baseline {base_where} scores "
                            f"{ta[i]}: not the same windows (another tokenizer, text or protocol)")


def ppl_row(obj: dict[str, Any], base: dict[str, Any] | None, stats: StatsConfig,
            gate_cfg: GateConfig = GateConfig()) -> dict[str, Any]:
    """PPL with its CI and, unless ``base`` is None (the baseline's own row), the paired ratio / delta CI
    against ``base`` and the gate verdict. Both JSONs must hold the same windows (checked before)."""
    nll, counts = obj["nll_per_window"], obj["tokens_per_window"]  # [n_windows], [n_windows]
    ci = bootstrap_ci(nll, counts, n_boot=stats.n_boot, seed=stats.seed, level=stats.level)
    row: dict[str, Any] = {"ppl": float(np.exp(np.sum(nll) / np.sum(counts))), "ci": list(ci),
                           "n_windows": len(nll), "tokens": int(np.sum(counts))}
    if base is None:
        return {**row, "ratio": 1.0, "ratio_ci": None, "delta": 0.0, "delta_ci": None, "verdict": GATE_BASELINE}
    d = paired_ppl(nll, counts, base["nll_per_window"], base["tokens_per_window"], n_boot=stats.n_boot,
                   seed=stats.seed, level=stats.level)
    return {**row, "ratio": d.ratio, "ratio_ci": list(d.ratio_ci), "delta": d.delta, "delta_ci": list(d.delta_ci),
            "verdict": ppl_gate(d.ratio_ci, gate_cfg.ppl_margin)}


# ---------------------------------------------------------------- tasks


def align_examples(base_where: str, base: Any, where: str, run: Any) -> list[float]:
    """``run``'s scores in the baseline's example order (``base``/``run``: ``runs_io.TaskScores``).

    With ids on both sides, examples are matched by id (the sets must be equal) and their gold answers,
    when recorded, must agree; without ids they are matched by position (the counts must be equal)."""
    if base.ids is None or run.ids is None:
        if len(run.scores) != len(base.scores):
            raise MoequantError(f"{where} has {len(run.scores)} examples but the baseline {base_where} has "
                                f"{len(base.scores)}: a paired comparison needs the same examples (same --limit)")
        return list(run.scores)
    pos = {k: i for i, k in enumerate(run.ids)}
    if len(pos) != len(run.ids) or set(pos) != set(base.ids) or len(base.ids) != len(run.ids):
        n_shared = len(set(pos) & set(base.ids))
        raise MoequantError(f"{where} has {len(run.ids)} examples but the baseline {base_where} has {len(base.ids)} "
                            f"({n_shared} shared ids): a paired comparison needs the same examples (same --limit)")
    if base.answers is not None and run.answers is not None:
        bad = next((k for i, k in enumerate(base.ids) if run.answers[pos[k]] != base.answers[i]), None)
        if bad is not None:
            raise MoequantError(f"{where} and the baseline {base_where} disagree on the answer of example {bad!r}: "
                                "not the same task data")
    return [run.scores[pos[k]] for k in base.ids]


def acc_row(scores: list[float], base_scores: list[float] | None, stats: StatsConfig,
            gate_cfg: GateConfig = GateConfig()) -> dict[str, Any]:
    """Accuracy (mean of 0/1 scores) with its CI and, unless ``base_scores`` is None, the paired CI of
    acc - acc_base and the gate verdict."""
    ci = bootstrap_mean_ci(scores, n_boot=stats.n_boot, seed=stats.seed, level=stats.level)
    row: dict[str, Any] = {"acc": float(np.mean(scores)), "ci": list(ci), "n": len(scores)}
    if base_scores is None:
        return {**row, "delta": 0.0, "delta_ci": None, "verdict": GATE_BASELINE}
    d = paired_mean(scores, base_scores, n_boot=stats.n_boot, seed=stats.seed, level=stats.level)
    return {**row, "delta": d.delta, "delta_ci": list(d.delta_ci), "verdict": acc_gate(d.delta_ci, gate_cfg.acc_margin)}


# ---------------------------------------------------------------- markdown


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _bpw(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _num(x: float) -> str:
    """PPL with 4-5 significant digits and a fixed number of decimals per magnitude."""
    for limit, digits in ((10, 3), (100, 2), (1000, 1)):
        if abs(x) < limit:
            return f"{x:.{digits}f}"
    return f"{x:.0f}"


def _ratio(x: float) -> str:
    """4 decimals near 1 (where the gate is decided), the PPL format for blow-ups."""
    return f"{x:.4f}" if x < 10 else _num(x)


def _interval(ci: list[float] | None, fmt=_num) -> str:
    return "-" if ci is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def protocol_text(p: dict[str, Any]) -> str:
    bos = "with BOS" if p.get("add_bos", True) else "without BOS"
    stride = p.get("stride")
    overlap = "" if stride is None or stride == p.get("seqlen") else f", stride {stride}"
    cap = f"first {p['max_tokens']} tokens" if p.get("max_tokens") else "all tokens"
    return (f"{p.get('data', '?')}/{p.get('split', '?')}, {cap}, {p.get('n_windows', '?')} windows of "
            f"{p.get('seqlen', '?')} tokens {bos}{overlap}")


def _gate_text(g: dict[str, Any]) -> str:
    m, a = g.get("ppl_margin", 0.0), g.get("acc_margin", 0.0)
    if not m and not a:
        return (f"Gate: **worse** = the whole CI of PPL/PPL_base lies above 1 (of acc - acc_base: below 0); "
                f"**better** = the whole CI on the good side; **{GATE_NO_WORSE}** = the CI contains 1 (0): "
                "no difference detectable at this level, not a proof of equivalence.")
    return (f"Gate with tolerances: **worse** = the whole CI of PPL/PPL_base lies above {1 + m:g} (of "
            f"acc - acc_base: below {-100 * a:g} points); **better** = the whole CI below 1 (above 0); "
            f"**{GATE_NO_WORSE}** = otherwise: a loss within the tolerance cannot be ruled out.")


def markdown_report(result: dict[str, Any]) -> str:
    """The ``report.md`` of a comparison ``result`` (the ``compare.json`` content)."""
    st = result["stats"]
    base = result["baseline"]
    runs = {r["name"]: r for r in result["runs"]}
    lines = ["# moequant compare", "",
             f"Baseline: **{base}** (`{runs[base]['path']}`). Intervals: {st['level']:.0%} expanded percentile "
             "bootstrap "
             f"over windows (PPL) or examples (accuracy), {st['n_boot']} replicates, seed {st['seed']}; ratios and "
             "deltas are paired (the same resampled windows/examples for both runs).",
             "",
             _gate_text(result.get("gate_config") or {}), ""]
    for block in result["ppl"].values():
        lines += [f"## Perplexity: {protocol_text(block['protocol'])}", "",
                  "| run | method | bits/weight | checkpoint MiB | PPL [95% CI] | PPL / baseline [95% paired CI] "
                  "| verdict |", "|---|---|---|---|---|---|---|"]
        for row in block["rows"]:
            r = runs[row["run"]]
            ratio = "1 (baseline)" if row["ratio_ci"] is None else (
                f"{_ratio(row['ratio'])} {_interval(row['ratio_ci'], _ratio)}")
            lines.append(f"| {row['run']} | {r['method']} | {_bpw(r['bits_per_weight'])} | "
                         f"{_mib(r['checkpoint_bytes'])} | {_num(row['ppl'])} {_interval(row['ci'])} | {ratio} | "
                         f"{row['verdict']} |")
        lines.append("")
    for task, block in result["tasks"].items():
        metrics = list(block["metrics"])
        head = "| run | method | bits/weight |" + "".join(f" {m} [95% CI] | {m} - baseline [95% paired CI] | verdict |"
                                                      for m in metrics)
        lines += [f"## Task: {task} ({block['n_examples']} examples)", "", head,
                  "|" + "---|" * (3 + 3 * len(metrics))]
        for name in block["runs"]:
            r = runs[name]
            cells = ""
            for m in metrics:
                row = block["metrics"][m][name]
                pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
                delta = "0 (baseline)" if row["delta_ci"] is None else (
                    f"{100 * row['delta']:+.1f} {_interval(row['delta_ci'], lambda x: f'{100 * x:+.1f}')}")
                cells += f" {pct(row['acc'])} {_interval(row['ci'], pct)} | {delta} | {row['verdict']} |"
            lines.append(f"| {name} | {r['method']} | {_bpw(r['bits_per_weight'])} |{cells}")
        lines += ["", "(accuracies in %, deltas in percentage points)", ""]
        if block.get("missing"):
            lines += ["Not evaluated on this task: " + ", ".join(block["missing"]), ""]
    if result.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in result["plots"]] + [""]
    if result.get("evaluated"):
        lines += ["Perplexity JSONs written by this comparison: " + ", ".join(f"`{p}`" for p in result["evaluated"]),
                  ""]
    lines += [f"Command: `{result.get('command', '')}`; git {result.get('git')}; all numbers in `compare.json`.", ""]
    return "\n".join(lines)
