"""benchmarks/additive_table.py: the quantize flags of every row — the additive rows store int8 codebooks unless
told otherwise (2x8 g8 with float16 ones counts 2.153 b/w on SmolLM2-135M, past the issue's 2.1), and the
MoE models get the layer-shared row."""

from __future__ import annotations

from conftest import BENCHMARKS, bench_module


def test_rows_and_their_flags():
    m = bench_module(BENCHMARKS / "additive_table.py", "additive_table_bench")
    dense = m.variants("smollm2-135m", "2x8", 8)
    assert [(name, pv) for name, _, pv in dense] == [("int2", False), ("trellis2", False), ("additive-kmeans", True),
                                                     ("additive-oaem", True)]
    add = ["--method", "additive", "--codebooks", "2x8", "--group", "8", "--codebook-bits", "8"]
    assert dense[2][1] == [*add, "--init", "kmeans"] and dense[3][1] == [*add, "--init", "oa-em"]
    moe = m.variants("smollm2-moe", "2x8", 8, codebook_bits=16)
    assert moe[-1] == ("additive-oaem-shared", [*add[:-1], "16", "--init", "oa-em", "--share", "layer"], True)


def test_pairs_compare_rows_of_one_model_on_its_windows():
    """Each pair is the candidate's PPL over the reference's on the same windows (exp of the NLL difference per
    token), only where a model has both rows; a model's own windows are used."""
    import math

    m = bench_module(BENCHMARKS / "additive_table.py", "additive_table_bench")
    tokens = {"a": [512, 512, 100], "b": [512, 200]}

    def row(model, name, nll):
        return {"model": model, "row": name, "nll_per_window": nll}

    rows = [row("a", "additive-kmeans", [1000.0, 1100.0, 210.0]), row("a", "additive-oaem", [990.0, 1080.0, 205.0]),
            row("a", "additive-oaem+pv", [900.0, 1000.0, 190.0]), row("b", "additive-kmeans", [1000.0, 400.0]),
            row("b", "additive-oaem+pv", [950.0, 380.0])]
    got = m.pairs(rows, tokens)
    assert [(p["model"], p["candidate"], p["reference"]) for p in got] == [
        ("a", "additive-oaem", "additive-kmeans"), ("a", "additive-oaem+pv", "additive-oaem")]
    assert math.isclose(got[0]["ratio"], math.exp(-35.0 / 1124), rel_tol=1e-12)
    assert math.isclose(got[1]["ratio"], math.exp(-185.0 / 1124), rel_tol=1e-12)
    lo, hi = got[1]["ratio_ci95"]
    assert lo <= got[1]["ratio"] <= hi < 1
