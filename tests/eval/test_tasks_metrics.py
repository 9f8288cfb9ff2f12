"""Multiple-choice scoring and the paired accuracy delta between two runs."""

from __future__ import annotations

import numpy as np
import pytest

from moequant.errors import MoequantError
from moequant.eval.tasks_metrics import predictions, score_example, summarize_task, task_acc_delta


def test_predictions_raw_and_length_normalised():
    # raw: choice 0 (-4 > -6); per character: -4/2 = -2 vs -6/6 = -1 -> choice 1
    assert predictions([-4.0, -6.0], [2, 6]) == (0, 1)
    assert predictions([-1.0, -1.0, -3.0], [1, 1, 1]) == (0, 0)  # ties: first choice, like numpy/lm-eval
    assert score_example([-4.0, -6.0], ["ab", "abcdef"], 1) == {"pred": 0, "pred_norm": 1, "acc": 0, "acc_norm": 1}
    with pytest.raises(ValueError):
        predictions([-1.0], [1])


def _run(correct: list[int], correct_norm: list[int] | None = None, ids=None, answers=None) -> dict:
    ids = list(range(len(correct))) if ids is None else ids
    answers = [0] * len(correct) if answers is None else answers
    norm = correct if correct_norm is None else correct_norm
    ex = [{"idx": i, "answer": a, "acc": c, "acc_norm": cn, "loglik": [0.0, -1.0, -2.0, -3.0]}
          for i, a, c, cn in zip(ids, answers, correct, norm)]
    return {"results": {"t": {"examples": ex}}}


def test_summary_numbers():
    ex = _run([1, 0, 0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0])["results"]["t"]["examples"]
    s = summarize_task(ex, n_boot=4000, seed=0)
    assert s["n"] == 8 and s["acc"] == 3 / 8 and s["acc_norm"] == 4 / 8 and s["chance"] == 0.25
    lo, hi = s["acc_ci95"]
    assert 0.0 <= lo < 3 / 8 < hi <= 1.0 and hi - lo > 0.3  # 8 coin flips: a wide interval
    assert summarize_task(ex, n_boot=4000, seed=0) == s  # seeded


def test_paired_delta_is_a_minus_b():
    rng = np.random.default_rng(0)
    b = (rng.random(400) < 0.4).astype(int)
    a = b.copy()
    a[np.flatnonzero(a == 0)[:60]] = 1  # A answers 60 more of the same 400 examples correctly
    d = task_acc_delta(_run(list(a)), _run(list(b)), "t")
    assert d.delta == pytest.approx(60 / 400) and d.value_a - d.value_b == pytest.approx(d.delta)
    lo, hi = d.delta_ci
    assert 0 < lo < 0.15 < hi < 0.25 and d.verdict == "A better"  # paired: only the 60 flips vary
    r = task_acc_delta(_run(list(b)), _run(list(a)), "t")
    assert r.delta == pytest.approx(-60 / 400) and r.verdict == "A worse"
    assert task_acc_delta(_run(list(a)), _run(list(b)), "t", metric="acc_norm").delta == pytest.approx(0.15)


def test_paired_delta_matches_by_idx_and_refuses_mismatches():
    a = _run([1, 0, 1], ids=[5, 6, 7])
    b = _run([1, 1, 0], ids=[7, 6, 5])  # same examples, another order: 7->1, 6->1, 5->0
    d = task_acc_delta(a, b, "t")
    assert d.value_a == pytest.approx(2 / 3) and d.value_b == pytest.approx(2 / 3)
    assert d.delta == pytest.approx(0.0) and d.delta_ci[0] < 0 < d.delta_ci[1]
    with pytest.raises(MoequantError, match="different examples"):
        task_acc_delta(_run([1, 0]), _run([1, 0, 1]), "t")
    with pytest.raises(MoequantError, match="answers"):
        task_acc_delta(_run([1, 0], answers=[0, 1]), _run([1, 0], answers=[0, 2]), "t")
    with pytest.raises(MoequantError, match="no per-example results for task 'u'"):
        task_acc_delta(_run([1]), _run([1]), "u")
    with pytest.raises(MoequantError, match="metric"):
        task_acc_delta(_run([1]), _run([1]), "t", metric="f1")


def test_examples_from_lm_eval_samples_of_hub_shaped_tasks():
    from moequant.eval.tasks import task_examples

    def sample(doc_id, lls, target, doc):
        return {"doc_id": doc_id, "doc": doc, "target": target, "resps": [[(ll, False)] for ll in lls]}

    choices = {"endings": ["aa", "bbbb", "c"]}
    samples = [sample(0, [-2.0, -3.0, -2.5], 1, choices),         # index target
               sample(1, [-9.0, -4.0, -1.5], "c", choices),       # target given as the choice's text
               sample(2, [-1.0, -6.0, -5.0], [0, 2], choices)]    # several right choices
    ex = task_examples(samples, lambda doc: doc["endings"])
    assert [e["answer"] for e in ex] == [1, 2, [0, 2]] and [e["idx"] for e in ex] == [0, 1, 2]
    # per character: [-1, -0.75, -2.5], [-4.5, -1, -1.5], [-0.5, -1.5, -5]
    assert [(e["pred"], e["pred_norm"]) for e in ex] == [(0, 1), (2, 1), (0, 0)]
    assert [(e["acc"], e["acc_norm"]) for e in ex] == [(0, 1), (1, 0), (1, 1)]
    assert ex[0]["choice_chars"] == [2, 4, 1]
