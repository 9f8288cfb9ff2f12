"""The demo's table shows each packed row's PPL ratio to the unquantized row, then the paired CI."""

from types import SimpleNamespace

from moequant.sweep import format_table


def test_table_has_point_ratio_and_ci():
    job = SimpleNamespace(model="m", data="ptb", split="test", max_tokens=16384, seqlen=512)
    rows = [{"method": "fp32", "bits_per_weight": 32.0, "checkpoint_bytes": None, "resident_bytes": 2**20,
             "ppl": 50.0, "ci95": [49.0, 51.0], "ratio_ci95": None},
            {"method": "int4", "bits_per_weight": 4.1, "checkpoint_bytes": 2**21, "resident_bytes": 2**20,
             "ppl": 52.5, "ci95": [51.0, 53.0], "ratio_ci95": [1.04, 1.06]}]
    lines = format_table(job, rows).splitlines()
    assert lines[0] == "m, ptb/test (first 16384 tokens, windows of 512 with BOS)"
    assert lines[-2].endswith("| 50.00 [49.00, 51.00] | - |")
    assert lines[-1] == "| int4 | 4.100 | 2.0 | 1.0 | 52.50 [51.00, 53.00] | x1.050 [1.040, 1.060] |"
