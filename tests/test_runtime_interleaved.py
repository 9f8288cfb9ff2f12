"""The ratio arithmetic of benchmarks/runtime_interleaved.py: a round's ratio is taken against the mean of the
two fp32 runs that enclose it, never against a run from another round."""

from __future__ import annotations


import pytest

from conftest import BENCHMARKS, bench_module

def _module():
    return bench_module(BENCHMARKS / "runtime_interleaved.py", "runtime_interleaved")


def test_round_ratios_use_enclosing_fp32_runs():
    m = _module()
    # fp32 slows from 20 to 10 tok/s over the session; the variant is always exactly 2x its neighbours
    fp = [20.0, 16.0, 12.0, 10.0]
    variant = [36.0, 28.0, 22.0]
    assert m.round_ratios(fp, variant) == pytest.approx([2.0, 2.0, 2.0])
    s = m.summarize({"fp32": fp, "int4": variant})
    assert s["int4"]["ratio_median"] == pytest.approx(2.0)
    assert s["int4"]["median"] == 28.0 and s["fp32"]["median"] == 14.0
    # the ratio of medians would have read 28 / 14 = 2.0 here too, but a single drifting round shows apart:
    s = m.summarize({"fp32": [10.0, 10.0, 20.0], "int4": [20.0, 60.0]})
    assert s["int4"]["ratios"] == pytest.approx([2.0, 4.0]) and s["int4"]["ratio_min"] == pytest.approx(2.0)


def test_round_ratios_need_one_more_fp32_run():
    m = _module()
    with pytest.raises(ValueError, match="expected one more"):
        m.round_ratios([1.0, 2.0], [1.0, 2.0])
