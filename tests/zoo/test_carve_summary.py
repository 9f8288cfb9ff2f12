"""benchmarks/carve_summary.py reads a carved build's training.json into the figures BENCHMARKS.md quotes."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
try:
    import carve_summary
finally:
    sys.path.pop(0)


def _prov():
    layer = lambda i, spread, tokens: {"layer": i, "hessian_spread": spread, "tokens": tokens,  # noqa: E731
                                       "errors": {"down_refit_0": 0.1 * (i + 1), "router_fit_0": 0.5,
                                                  "router_init": 0.6, "zero_router": 0.7}}
    routing = [{"balance_entropy": 0.9, "router_entropy_mean": 1.0, "share": [0.5, 0.45, 0.045, 0.005]},
               {"balance_entropy": 0.7, "router_entropy_mean": 1.2, "share": [0.25, 0.25, 0.25, 0.25]}]
    return {"source": "src", "alias": "a", "active_fraction": 0.5,
            "spec": {"arch": "qwen2_moe", "experts": 4, "top_k": 2, "shared_fraction": 0.25},
            "parameters": {"dense": 10, "moe": 11},
            "layers": [layer(0, [0.1, 0.2, 0.3, 0.4], [500, 127, 128, 300]), layer(1, [0.5, 0.6, 0.7, 8.0], [3, 9, 900, 900]),
                       layer(2, [float("nan")], [0])],
            "seconds": {"carve": 5.0}, "job_runs": [{"started": "x"}],
            "eval": {"data": "ptb", "split": "test", "tokens": 100, "n_windows": 2, "ppl_dense": 10.0,
                     "ppl_moe": 12.0, "ratio": 1.2, "ratio_ci95": [1.1, 1.3], "routing": routing,
                     "before_recover": {"ppl_moe": 20.0, "ratio": 2.0, "ratio_ci95": [1.9, 2.1]}},
            "recover": {"history": [1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], "seconds": 7.0}}


def test_summary_figures():
    s = carve_summary.summarize(_prov())
    assert s["final_mlp_error"] == {"mean": pytest.approx(0.2), "min": 0.1, "max": pytest.approx(0.3)}  # not zero_router
    assert s["hessian_spread"] == {"experts": 9, "without_tokens": 1, "median": pytest.approx(0.45), "p10": pytest.approx(0.17),
                                   "p90": pytest.approx(2.89), "max": 8.0}
    assert s["starved_experts"] == [{"layer": 0, "expert": 1, "tokens": 127}, {"layer": 1, "expert": 0, "tokens": 3},
                                    {"layer": 1, "expert": 1, "tokens": 9}, {"layer": 2, "expert": 0, "tokens": 0}]
    ev = s["eval"]
    assert ev["final"] == {"ppl": 12.0, "ratio": 1.2, "ratio_ci95": [1.1, 1.3]}
    assert ev["before_recover"] == {"ppl": 20.0, "ratio": 2.0, "ratio_ci95": [1.9, 2.1]}
    assert ev["balance_entropy"] == {"mean": pytest.approx(0.8), "min": 0.7}
    assert ev["router_entropy_mean"] == pytest.approx(1.1) and ev["router_entropy_uniform"] == math.log(4)
    assert ev["layers_with_an_expert_under_1pct"] == 1
    assert ev["collapsed_layers"] == [0] and ev["top_k_share_mean"] == pytest.approx((0.95 + 0.5) / 2)
    assert s["distill"] == {"steps": 11, "seconds": 7.0, "kl_means": [1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1,
                                                                        0.1]}


def test_cli_writes_the_json_and_refuses_other_files(tmp_path, capsys):
    (tmp_path / "training.json").write_text(json.dumps(_prov()))
    assert carve_summary.main([str(tmp_path), "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["eval"]["final"]["ratio"] == 1.2
    (tmp_path / "other.json").write_text("{}")
    capsys.readouterr()
    assert carve_summary.main([str(tmp_path / "other.json")]) == 2
    assert capsys.readouterr().err.startswith(f"carve_summary: {tmp_path / 'other.json'}: not a carved build's")
