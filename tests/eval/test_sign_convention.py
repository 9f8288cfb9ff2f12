"""One sign convention for paired numbers: A − B and A / B with A the candidate, B the reference. The
candidate-first helpers give exactly the numbers of the older reference-first ones, and every caller's
delta has the candidate's sign."""

from __future__ import annotations

import numpy as np
import pytest

from moequant.eval.bootstrap import (
    BETTER,
    WORSE,
    paired_delta_ci,
    paired_mean,
    paired_mean_delta_ci,
    paired_ppl,
    ppl_from_sums,
)
from moequant.eval.compare import GATE_WORSE, StatsConfig, acc_row, ppl_row
from moequant.eval.tasks_metrics import task_acc_delta

STATS = StatsConfig(n_boot=200, seed=3)


def _runs(n: int = 30):
    """A reference and a candidate 0.1 nats per token worse in every window: [n] NLL sums, [n] counts."""
    rng = np.random.default_rng(0)
    counts = rng.integers(100, 257, size=n)
    ref = counts * (3.0 + rng.normal(0.0, 0.2, size=n))
    return ref + 0.1 * counts + counts * rng.normal(0.0, 0.01, size=n), ref, counts


def test_paired_ppl_is_candidate_minus_reference():
    cand, ref, counts = _runs()
    d = paired_ppl(cand, counts, ref, counts, n_boot=300, seed=1)
    assert d.to_dict() == paired_delta_ci(ref, counts, cand, counts, n_boot=300, seed=1).to_dict()
    p_cand, p_ref = ppl_from_sums(cand, counts), ppl_from_sums(ref, counts)
    assert (d.ppl_candidate, d.ppl_reference) == (p_cand, p_ref)
    assert d.delta == pytest.approx(p_cand - p_ref, rel=1e-12) and d.delta > 0
    assert d.ratio == pytest.approx(p_cand / p_ref, rel=1e-12) and d.ratio_ci[0] > 1.0
    assert d.verdict == WORSE  # the candidate is worse than the reference
    assert paired_ppl(ref, counts, cand, counts).verdict == BETTER


def test_paired_mean_is_candidate_minus_reference():
    rng = np.random.default_rng(1)
    ref = (rng.random(200) < 0.5).astype(float)  # [200] 0/1
    cand = ref.copy()
    cand[np.flatnonzero(ref == 1)[:30]] = 0.0  # 30 answers lost
    d = paired_mean(cand, ref, n_boot=300, seed=2)
    assert d.to_dict() == paired_mean_delta_ci(ref, cand, n_boot=300, seed=2).to_dict()
    assert (d.mean_candidate, d.mean_reference) == (cand.mean(), ref.mean())
    assert d.delta == pytest.approx(-30 / 200) and d.verdict == WORSE


def test_callers_share_the_convention():
    cand, ref, counts = _runs()
    as_json = lambda nll: {"ppl": ppl_from_sums(nll, counts), "nll_per_window": list(nll),  # noqa: E731
                           "tokens_per_window": [int(c) for c in counts]}
    row = ppl_row(as_json(cand), as_json(ref), STATS)  # the run is the candidate, the baseline the reference
    assert row["delta"] > 0 and row["ratio"] > 1 and row["verdict"] == GATE_WORSE
    d = paired_ppl(cand, counts, ref, counts, n_boot=STATS.n_boot, seed=STATS.seed, level=STATS.level)
    assert (row["ratio"], row["ratio_ci"], row["delta_ci"]) == (d.ratio, list(d.ratio_ci), list(d.delta_ci))
    a = [1.0] * 10 + [0.0] * 10
    b = [1.0] * 15 + [0.0] * 5
    assert acc_row(a, b, STATS)["delta"] == pytest.approx(-0.25)  # run (A) - baseline (B)
    runs = [{"results": {"t": {"examples": [{"idx": i, "answer": 0, "acc": v, "acc_norm": v}
                                            for i, v in enumerate(x)]}}} for x in (a, b)]
    assert task_acc_delta(*runs, "t").delta == pytest.approx(-0.25)  # A - B
