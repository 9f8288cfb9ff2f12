"""moequant compare end to end on a tiny OLMoE with a real tokenizer: runs without a perplexity JSON are
scored (on the windows the others used) and their JSON saved; the LDLQ run's per-expert proxies become a
heat map."""

from __future__ import annotations

import json

import pytest
from conftest import save_toy_olmoe


@pytest.fixture()
def tiny_runs(tmp_path):
    return save_toy_olmoe(tmp_path, "model", 3000)


def test_compare_scores_missing_runs_and_plots_expert_proxies(tiny_runs, tmp_path, one_thread, capsys):
    from moequant.cli import main

    model, text = tiny_runs
    q4, q2 = tmp_path / "q4", tmp_path / "q2"
    assert main(["-q", "quantize", str(model), "--bits", "4", "--group-size", "32", "--solver", "rtn", "--out",
                 str(q4)]) == 0
    assert main(["-q", "quantize", str(model), "--bits", "2", "--asym", "--group-size", "32", "--solver", "ldlq",
                 "--calib", str(text), "--calib-samples", "8", "--calib-seqlen", "32", "--out", str(q2)]) == 0
    base = tmp_path / "fp"
    base.mkdir()
    (base / "run.json").write_text(json.dumps({"name": "fp", "model": str(model)}))  # not a checkpoint: scored by model
    # q4 was scored by hand; the others are scored by compare on q4's windows (seqlen 32, first 600 tokens)
    assert main(["-q", "eval", "ppl", str(q4), "--data", str(text), "--seqlen", "32", "--max-tokens", "600",
                 "--json", str(q4 / "ppl-text.json")]) == 0
    out = tmp_path / "cmp"
    assert main(["-q", "compare", str(base), str(q4), str(q2), "--ppl", str(text), "--out", str(out),
                 "--n-boot", "300"]) == 0
    capsys.readouterr()
    res = json.loads((out / "compare.json").read_text())
    jsons = {name: json.loads((tmp_path / name / "ppl-text.json").read_text()) for name in ("fp", "q4", "q2")}
    assert sorted(res["evaluated"]) == sorted(str(tmp_path / n / "ppl-text.json") for n in ("fp", "q2"))
    for j in jsons.values():
        assert (j["seqlen"], j["max_tokens"], j["tokens_per_window"]) == (32, 600, jsons["q4"]["tokens_per_window"])
    rows = {r["run"]: r for r in res["ppl"][str(text)]["rows"]}
    for name in ("q4", "q2"):
        assert rows[name]["ppl"] == pytest.approx(jsons[name]["ppl"], rel=1e-9)
        assert rows[name]["ratio"] == pytest.approx(jsons[name]["ppl"] / jsons["fp"]["ppl"], rel=1e-9)
        assert rows[name]["ratio_ci"][0] <= rows[name]["ratio"] <= rows[name]["ratio_ci"][1]
    # the 4-bit copy of a random model is far closer to it than the 2-bit one
    assert abs(rows["q4"]["ratio"] - 1) < abs(rows["q2"]["ratio"] - 1)
    assert "proxy_q2.png" in res["plots"] and "proxy_q4.png" not in res["plots"]  # RTN records no proxies
    assert {p.name for p in out.iterdir()} == {"compare.json", "report.md", "ppl_text.png", "frontier_text.png",
                                               "proxy_q2.png"}
    # a second comparison finds the saved JSONs and scores nothing
    assert main(["-q", "compare", str(base), str(q2), "--ppl", str(text), "--out", str(out), "--no-plots",
                 "--no-evaluate"]) == 0
    assert json.loads((out / "compare.json").read_text())["evaluated"] == []


def test_a_killed_comparison_continues_its_scoring(tiny_runs, tmp_path, one_thread, capsys, monkeypatch):
    """The windows a comparison scored before a kill are kept beside the run's JSON and a second comparison
    continues them: the same per-window losses as a run that was never stopped, nothing left behind."""
    import moequant.eval.ppl_progress as pp
    from moequant.cli import main

    model, text = tiny_runs
    base = tmp_path / "fp"
    base.mkdir()
    (base / "run.json").write_text(json.dumps({"name": "fp", "model": str(model)}))
    q4 = tmp_path / "q4"
    assert main(["-q", "quantize", str(model), "--bits", "4", "--group-size", "32", "--solver", "rtn", "--out",
                 str(q4)]) == 0
    assert main(["-q", "eval", "ppl", str(q4), "--data", str(text), "--seqlen", "32", "--max-tokens", "600",
                 "--batch-size", "4", "--json", str(q4 / "ppl-text.json")]) == 0  # the compare's batches
    straight = json.loads((q4 / "ppl-text.json").read_text())
    (q4 / "ppl-text.json").rename(tmp_path / "straight.json")
    (base / "ppl-text.json").write_text(json.dumps(straight | {"model": str(model)}))  # q4 is the one scored
    real = pp.PplProgress.save

    def save_then_die(self, done):
        real(self, done)
        raise KeyboardInterrupt

    cmd = ["-q", "compare", str(base), str(q4), "--ppl", str(text), "--out", str(tmp_path / "cmp"), "--no-plots",
           "--n-boot", "100"]
    monkeypatch.setattr(pp.PplProgress, "save", save_then_die)
    assert main(cmd) == 130
    monkeypatch.undo()
    kept = json.loads(pp.progress_path(q4 / "ppl-text.json").read_text())
    assert len(kept["nll"]) == 4 and not (q4 / "ppl-text.json").exists()  # one batch of the compare's 4 windows
    assert main(cmd) == 0
    capsys.readouterr()
    got = json.loads((q4 / "ppl-text.json").read_text())
    assert got["resumed_windows"] == 4 and got["nll_per_window"] == straight["nll_per_window"]
    assert len(got["job_runs"]) == 2 and not pp.progress_path(q4 / "ppl-text.json").exists()
