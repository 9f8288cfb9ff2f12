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
