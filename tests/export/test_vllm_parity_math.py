"""The compare math of benchmarks/export/vllm_parity.py on hand-made logprobs (the benchmark itself is slow)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import BENCHMARKS, bench_module

def _mod():
    return bench_module(BENCHMARKS / "export" / "vllm_parity.py", "vllm_parity_bench")


def test_compare_step_exact_numbers():
    m = _mod()
    ours = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64))  # [V=4]
    same = m.compare_step({0: math.log(0.5), 1: math.log(0.25)}, ours)
    assert same["top1_agree"] and same["max_abs_dlogprob"] == 0.0 and same["kl_topk"] == pytest.approx(0, abs=1e-15)
    assert same["ours_top2_gap"] == pytest.approx(math.log(2), abs=1e-15)
    # vLLM puts 0.4 / 0.4 on tokens 0 and 1 (renormalised: 1/2, 1/2); ours renormalised there: 2/3, 1/3
    c = m.compare_step({1: math.log(0.4), 0: math.log(0.4)}, ours)
    assert c["top1_vllm"] == 1 and c["top1_ours"] == 0 and not c["top1_agree"]  # a tie resolves to the first key
    assert c["max_abs_dlogprob"] == pytest.approx(math.log(0.4 / 0.25), abs=1e-12)
    kl = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))
    assert c["kl_topk"] == pytest.approx(kl, abs=1e-12) and kl > 0.05  # not vacuous


def test_tolerance_and_summary():
    m = _mod()
    tol = m.Tolerance(max_abs=0.1, kl=1e-3, why="test")
    ok = {"top1_agree": True, "max_abs_dlogprob": 0.05, "kl_topk": 1e-4, "ours_top2_gap": 3.0}
    tie = {**ok, "top1_agree": False, "ours_top2_gap": 0.15}  # a flip inside 2·max_abs: a near-tie
    flip = {**ok, "top1_agree": False, "ours_top2_gap": 0.25}
    far = {**ok, "max_abs_dlogprob": 0.11}
    assert [m.step_passes(c, tol) for c in (ok, tie, flip, far)] == [True, True, False, False]
    s = m.summarize([ok, tie, flip, far], tol)
    assert s["steps"] == 4 and s["top1_agree"] == 2 and s["failing_steps"] == 2 and not s["pass"]
    assert s["max_abs_dlogprob"] == 0.11 and s["mean_max_abs_dlogprob"] == pytest.approx(0.065, abs=1e-15)
    assert m.summarize([ok, tie], tol)["pass"]


def test_kernel_vs_exact_stops_where_contexts_part_and_uses_shared_tokens():
    m = _mod()
    tol = m.Tolerance(max_abs=0.1, kl=1e-3, why="test")
    lp = math.log
    # prompt 0: same greedy tokens [5, 6]; step 1 differs by 0.05 on token 5 and native lacks token 9 (dropped)
    exact0 = {"greedy": [5, 6], "topk": [{"5": lp(0.6), "7": lp(0.4)}, {"6": lp(0.5), "5": lp(0.3), "9": lp(0.2)}]}
    native0 = {"greedy": [5, 6], "topk": [{"5": lp(0.6), "7": lp(0.4)}, {"6": lp(0.5), "5": lp(0.3) + 0.05}]}
    # prompt 1: the first greedy tokens differ, so only step 0 shares its context
    exact1 = {"greedy": [1, 2], "topk": [{"1": lp(0.9), "2": lp(0.1)}, {"2": 0.0}]}
    native1 = {"greedy": [2, 2], "topk": [{"2": lp(0.6), "1": lp(0.4)}, {"2": 0.0}]}
    r = m.kernel_vs_exact({"dtype": "bfloat16", "rows": [native0, native1]},
                          {"dtype": "bfloat16", "rows": [exact0, exact1]}, tol)
    assert r["shared_context_steps"] == 3  # 2 + 1: prompt 1's second step is not compared
    assert r["top1_agree"] == 2  # prompt 1 step 0: exact says 1, native says 2
    assert r["max_abs_dlogprob"] == pytest.approx(lp(0.6 / 0.1), abs=1e-12)  # token 2 there
    assert r["failing_steps"] == 1 and not r["pass"]
