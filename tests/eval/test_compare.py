"""moequant compare on synthetic eval JSONs: gate verdicts, same-window refusals, run layout, report files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from moequant.errors import MoequantError
from moequant.eval.compare import (
    GATE_BASELINE,
    GATE_BETTER,
    GATE_NO_WORSE,
    GATE_WORSE,
    GateConfig,
    StatsConfig,
    acc_gate,
    acc_row,
    check_same_windows,
    ppl_gate,
    ppl_row,
)
from moequant.compare_job import CompareJob, run_compare
from moequant.eval.runs_io import find_ppl, find_tasks, load_run

N_WIN, SEQ = 40, 512
STATS = StatsConfig(n_boot=1000, seed=0)


def ppl_json(per_token_nll: np.ndarray, **extra) -> dict:
    counts = [SEQ] * len(per_token_nll)
    nll = [float(x) * SEQ for x in per_token_nll]
    ppl = math.exp(sum(nll) / sum(counts))
    return {"model": "m", "data": "ptb", "split": "test", "ppl": ppl, "ci95": [ppl, ppl], "seqlen": SEQ,
            "stride": SEQ, "add_bos": True, "max_tokens": N_WIN * SEQ, "n_windows": len(nll), "tokens": sum(counts),
            "nll_per_window": nll, "tokens_per_window": counts, **extra}


@pytest.fixture(scope="module")
def base_nll() -> np.ndarray:
    return 3.0 + np.random.default_rng(0).normal(0.0, 0.3, size=N_WIN)  # [N_WIN] per-token NLL per window


def cases(base_nll: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    noise = rng.normal(0.0, 0.02, size=N_WIN)
    noise -= noise.mean()  # zero mean: the paired point estimate is the baseline's, the CI straddles 1
    return {"worse": base_nll + 0.2 + rng.normal(0.0, 0.01, size=N_WIN),
            "better": base_nll - 0.1 + rng.normal(0.0, 0.01, size=N_WIN),
            "same": base_nll + noise}


def test_ppl_verdicts_on_constructed_cases(base_nll):
    base = ppl_json(base_nll)
    c = cases(base_nll)
    worse, better, same = (ppl_row(ppl_json(c[k]), base, STATS) for k in ("worse", "better", "same"))
    assert worse["verdict"] == GATE_WORSE and worse["ratio_ci"][0] > 1.0
    # +0.2 nats per token in every window (+ tiny noise): ratio = exp(0.2) to within the noise
    assert worse["ratio"] == pytest.approx(math.exp(0.2), rel=0.005)
    assert better["verdict"] == GATE_BETTER and better["ratio_ci"][1] < 1.0
    assert better["ratio"] == pytest.approx(math.exp(-0.1), rel=0.005)
    assert same["verdict"] == GATE_NO_WORSE and same["ratio_ci"][0] < 1.0 < same["ratio_ci"][1]
    assert same["ratio"] == pytest.approx(1.0, abs=1e-12)
    # the paired CI is far narrower than either run's own CI (the window effect cancels)
    assert same["ratio_ci"][1] - same["ratio_ci"][0] < 0.1 * (same["ci"][1] - same["ci"][0]) / same["ppl"]
    own = ppl_row(base, None, STATS)
    assert own["verdict"] == GATE_BASELINE and own["ppl"] == pytest.approx(base["ppl"], rel=1e-12)
    assert own["ci"][0] < own["ppl"] < own["ci"][1]


def test_gate_wording_at_the_edges():
    assert ppl_gate((0.98, 1.0)) == GATE_NO_WORSE  # touching 1 is not "better"
    assert ppl_gate((1.0, 1.3)) == GATE_NO_WORSE
    assert ppl_gate((1.0001, 1.3)) == GATE_WORSE
    assert ppl_gate((0.5, 0.9999)) == GATE_BETTER
    assert acc_gate((-0.10, -0.01)) == GATE_WORSE  # higher accuracy is better
    assert acc_gate((0.01, 0.10)) == GATE_BETTER
    assert acc_gate((-0.02, 0.0)) == GATE_NO_WORSE


def test_gate_tolerances():
    # a real but tiny loss (llama.cpp F16 vs fp32 measured 1.0002 [1.0001, 1.0002]) is "worse" at margin 0
    assert ppl_gate((1.0001, 1.0002)) == GATE_WORSE
    assert ppl_gate((1.0001, 1.0002), margin=0.01) == GATE_NO_WORSE
    assert ppl_gate((1.0101, 1.02), margin=0.01) == GATE_WORSE  # the whole CI beyond the 1% tolerance
    assert ppl_gate((0.98, 0.99), margin=0.01) == GATE_BETTER  # "better" keeps its strict meaning
    assert acc_gate((-0.03, -0.005), margin=0.01) == GATE_NO_WORSE
    assert acc_gate((-0.03, -0.011), margin=0.01) == GATE_WORSE
    with pytest.raises(MoequantError, match="--ppl-margin"):
        GateConfig(ppl_margin=-0.1)


def test_acc_verdicts_on_constructed_cases():
    rng = np.random.default_rng(2)
    base = (rng.random(300) < 0.5).astype(float)  # [300] 0/1
    right = np.flatnonzero(base == 1)
    worse = base.copy()
    worse[right[:60]] = 0.0  # 60 fewer right answers out of 300: -20 points
    swapped = base.copy()  # 10 answers become right and 10 become wrong: same accuracy
    swapped[right[:10]] = 0.0
    swapped[np.flatnonzero(base == 0)[:10]] = 1.0
    w = acc_row(list(worse), list(base), STATS)
    assert w["verdict"] == GATE_WORSE and w["delta"] == pytest.approx(-0.2, abs=1e-12) and w["delta_ci"][1] < 0
    b = acc_row(list(base), list(worse), STATS)
    assert b["verdict"] == GATE_BETTER
    s = acc_row(list(swapped), list(base), STATS)
    assert s["verdict"] == GATE_NO_WORSE and s["delta"] == 0.0 and s["delta_ci"][0] < 0 < s["delta_ci"][1]


def test_refuses_other_windows(base_nll):
    base = ppl_json(base_nll)
    other = ppl_json(base_nll)
    other["tokens_per_window"] = list(other["tokens_per_window"])
    other["tokens_per_window"][7] = 511
    with pytest.raises(MoequantError, match="window 7"):
        check_same_windows("a.json", base, "b.json", other)
    with pytest.raises(MoequantError, match="seqlen"):
        check_same_windows("a.json", base, "b.json", {**ppl_json(base_nll), "seqlen": 1024})
    with pytest.raises(MoequantError, match="max_tokens"):
        check_same_windows("a.json", base, "b.json", {**ppl_json(base_nll), "max_tokens": None})
    with pytest.raises(MoequantError, match="n_windows = 39 vs 40"):
        check_same_windows("a.json", base, "b.json", ppl_json(base_nll[:-1]))
    no_count = {k: v for k, v in ppl_json(base_nll[:-1]).items() if k != "n_windows"}
    with pytest.raises(MoequantError, match="has 39 windows but the baseline a.json has 40"):
        check_same_windows("a.json", base, "b.json", no_count)
    # a peer JSON without data/split fields is accepted when its windows match
    peer = {k: v for k, v in ppl_json(base_nll).items() if k not in ("data", "split", "max_tokens")}
    check_same_windows("a.json", base, "peer.json", peer)


# ---------------------------------------------------------------- whole comparisons on disk


def _write(path: Path, obj: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _report(bits: float, experts: bool) -> dict:
    tensors = [{"name": f"model.layers.{i}.self_attn.q_proj.weight", "kind": "linear", "method": "int4-g64-clip",
                "solver": "ldlq", "proxy": 0.01} for i in range(3)]
    if experts:
        tensors += [{"name": f"model.layers.{i}.mlp.experts.{p}", "kind": "experts", "method": "int4-g64-clip",
                     "solver": "ldlq", "proxy": 0.02, "proxy_per_expert": [0.01 * (1 + e + i) for e in range(8)]}
                    for i in range(3) for p in ("gate_up_proj", "down_proj")]
    starved = [{"tensor": "model.layers.1.mlp.experts.down_proj", "expert": 6, "tokens": 3, "policy": "shrink"}]
    return {"bits_per_weight": bits, "checkpoint_bytes": 3 * 2**20, "quantized_tensors": tensors,
            "starved_experts": starved if experts else []}


def _tasks(correct: np.ndarray, norm: np.ndarray, shape: str = "eval tasks", order=None) -> dict:
    """A tasks JSON as ``moequant eval tasks --json`` writes it (``results`` / ``examples`` with idx, answer,
    acc, acc_norm), or in the minimal shape (``tasks`` / ``per_example`` with correct, correct_norm)."""
    order = range(len(correct)) if order is None else order
    if shape == "eval tasks":
        ex = [{"idx": int(i), "doc_id": int(i), "answer": int(i) % 3, "acc": int(correct[i]),
               "acc_norm": int(norm[i])} for i in order]
        return {"tasks": ["social_iqa"], "results": {"social_iqa": {"n": len(ex), "acc": float(correct.mean()),
                                                                    "acc_norm": float(norm.mean()), "examples": ex}}}
    ex = [{"correct": int(correct[i]), "correct_norm": int(norm[i])} for i in order]
    return {"tasks": {"social_iqa": {"acc": float(correct.mean()), "acc_norm": float(norm.mean()), "per_example": ex}}}


@pytest.fixture
def run_dirs(tmp_path, base_nll):
    c = cases(base_nll)
    rng = np.random.default_rng(3)
    acc_base = (rng.random(200) < 0.6).astype(int)
    fp = tmp_path / "fp"
    _write(fp / "ppl-ptb.json", ppl_json(base_nll))
    _write(fp / "tasks.json", _tasks(acc_base, acc_base))
    q4 = tmp_path / "q4"  # a moequant run: report.json + the sweep's legacy ppl.json
    _write(q4 / "report.json", _report(4.25, experts=True))
    _write(q4 / "ppl.json", ppl_json(c["same"]))
    worse_acc = acc_base.copy()
    worse_acc[np.flatnonzero(acc_base == 1)[:50]] = 0
    _write(q4 / "tasks.json", _tasks(acc_base, worse_acc, order=np.random.default_rng(4).permutation(200)))
    q2 = tmp_path / "q2"
    _write(q2 / "report.json", _report(2.29, experts=False))
    _write(q2 / "ppl-ptb.json", ppl_json(c["worse"]))
    _write(q2 / "tasks-zs.json", _tasks(worse_acc, acc_base, shape="minimal"))  # matched by position
    peer = _write(tmp_path / "peers" / "hqq-4bit" / "ppl.json",  # a bare peer ppl.json with its own fields
                  ppl_json(c["better"], peer="hqq", config="4bit-g64", bits_per_weight=4.5,
                           checkpoint_bytes=2 * 2**20))
    return fp, q4, q2, peer


def test_run_layout_and_metadata(run_dirs, tmp_path):
    fp, q4, q2, peer = run_dirs
    r = load_run(q4)
    assert (r.name, r.bits_per_weight, r.checkpoint_bytes, r.method) == ("q4", 4.25, 3 * 2**20, "int4-g64-clip ldlq")
    assert find_ppl(r, "ptb")[0] == q4 / "ppl.json"  # the sweep's ppl.json, data field "ptb"
    assert find_ppl(r, "shakespeare") is None
    p = load_run(peer)
    assert (p.name, p.bits_per_weight, p.checkpoint_bytes, p.method) == ("hqq-4bit", 4.5, 2 * 2**20, "hqq 4bit-g64")
    (peer.parent / "run.json").write_text(json.dumps({"name": "HQQ 4-bit", "bits_per_weight": 4.52}))
    p = load_run(peer)
    assert (p.name, p.bits_per_weight) == ("HQQ 4-bit", 4.52)  # run.json wins over the JSON's own fields
    assert load_run(fp).method == "unquantized (m)"
    # bare eval JSONs are named after their folder; two in one folder become folder/stem
    from moequant.eval.runs_io import check_unique_names

    files = [_write(tmp_path / "eval" / d / f"{t}.json", _tasks(np.ones(4, int), np.ones(4, int)))
             for d, t in (("fp", "social_iqa"), ("int4", "social_iqa"), ("int4", "again"))]
    runs = [load_run(f) for f in files]
    check_unique_names(runs)
    assert [r.name for r in runs] == ["fp", "int4/social_iqa", "int4/again"]
    # an eval JSON written elsewhere finds its checkpoint's report.json through its "model" field
    elsewhere = _write(tmp_path / "eval" / "q4" / "social_iqa.json", {**_tasks(np.ones(4, int), np.ones(4, int)),
                                                                       "model": str(q4)})
    r = load_run(elsewhere)
    assert (r.name, r.bits_per_weight, r.method) == ("q4", 4.25, "int4-g64-clip ldlq")
    # ... and so does a folder of tasks-*.json files written by `eval tasks runs/q4 --json DIR/tasks-x.json`
    folder = _write(tmp_path / "zs" / "q4" / "tasks-social_iqa.json",
                    {**_tasks(np.ones(4, int), np.ones(4, int)), "model": str(q4)}).parent
    r = load_run(folder)
    assert (r.name, r.bits_per_weight, r.method, list(find_tasks(r))) == ("q4", 4.25, "int4-g64-clip ldlq",
                                                                          ["social_iqa"])


def test_compare_writes_report_json_and_plots(run_dirs, tmp_path, one_thread):
    fp, q4, q2, peer = run_dirs
    out = tmp_path / "cmp"
    res = run_compare(CompareJob(runs=(str(fp), str(q4), str(q2), str(peer)), out=out, ppl=("ptb",),
                                 tasks=("social_iqa",), stats=STATS), argv=["compare"])
    verdicts = {row["run"]: row["verdict"] for row in res["ppl"]["ptb"]["rows"]}
    assert verdicts == {"fp": GATE_BASELINE, "q4": GATE_NO_WORSE, "q2": GATE_WORSE, "hqq-4bit": GATE_BETTER}
    acc = res["tasks"]["social_iqa"]["metrics"]
    assert acc["acc"]["q2"]["verdict"] == GATE_WORSE
    assert acc["acc"]["q4"]["verdict"] == GATE_NO_WORSE and acc["acc"]["q4"]["delta"] == 0.0
    assert acc["acc"]["q4"]["delta_ci"] == [0.0, 0.0]  # q4's shuffled examples were matched by idx
    assert acc["acc_norm"]["q4"]["verdict"] == GATE_WORSE and acc["acc_norm"]["q2"]["delta"] == 0.0
    assert acc["acc"]["q2"]["delta"] == pytest.approx(-50 / 200)
    assert res["tasks"]["social_iqa"]["missing"] == ["hqq-4bit"]  # the peer has PPL only
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["compare.json", "report.md", "ppl_ptb.png", "frontier_ptb.png", "proxy_q4.png"])
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    saved = json.loads((out / "compare.json").read_text())
    assert saved["baseline"] == "fp" and saved["command"] == "moequant compare" and "versions" in saved
    assert saved["stats"] == {"n_boot": 1000, "seed": 0, "level": 0.95}
    md = (out / "report.md").read_text()
    q2_row = next(line for line in md.splitlines() if line.startswith("| q2 |") and "PPL" not in line)
    assert "2.290" in q2_row and "| worse |" in q2_row
    assert f"| {GATE_NO_WORSE} |" in md
    # run again into the same --out: replaced (it holds an earlier comparison), same numbers
    again = run_compare(CompareJob(runs=(str(fp), str(q2)), out=out, ppl=("ptb",), stats=STATS, plots=False))
    assert again["ppl"]["ptb"]["rows"][1]["ratio_ci"] == res["ppl"]["ptb"]["rows"][2]["ratio_ci"]
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "report.md"]
    assert not list(tmp_path.glob(".cmp*"))  # no temporary directory left behind


def test_compare_refusals(run_dirs, tmp_path, base_nll):
    fp, q4, q2, peer = run_dirs
    job = dict(out=tmp_path / "cmp", ppl=("ptb",), stats=STATS, plots=False)
    other = _write(tmp_path / "other" / "ppl.json", {**ppl_json(base_nll), "seqlen": 256})
    with pytest.raises(MoequantError, match="seqlen"):
        run_compare(CompareJob(runs=(str(fp), str(other)), **job))
    fake = tmp_path / "fake_ckpt"  # looks like a checkpoint without a PPL JSON: scoring it would fail to load
    _write(fake / "config.json", {})
    (fake / "model.safetensors").write_bytes(b"")
    with pytest.raises(MoequantError, match="seqlen"):  # the mismatch is found before any scoring
        run_compare(CompareJob(runs=(str(fp), str(fake), str(other)), **job))
    with pytest.raises(MoequantError, match="no perplexity JSON for shakespeare.*not a checkpoint"):
        run_compare(CompareJob(runs=(str(fp), str(q4)), **{**job, "ppl": ("shakespeare",)}))
    with pytest.raises(MoequantError, match="one JSON file without perplexity on shakespeare/test; pass its folder"):
        run_compare(CompareJob(runs=(str(peer),), **{**job, "ppl": ("shakespeare",)}))
    with pytest.raises(MoequantError, match="the baseline .* has no result for task 'piqa'"):
        run_compare(CompareJob(runs=(str(fp), str(q4)), **{**job, "ppl": (), "tasks": ("piqa",)}))
    tasks_job = {**job, "ppl": (), "tasks": ("social_iqa",)}
    short = _write(tmp_path / "short" / "tasks.json", _tasks(np.ones(150, int), np.ones(150, int)))
    with pytest.raises(MoequantError, match="150 examples but the baseline .* 200 .*150 shared ids"):
        run_compare(CompareJob(runs=(str(fp), str(short)), **tasks_job))
    short = _write(tmp_path / "short2" / "tasks.json", _tasks(np.ones(150, int), np.ones(150, int), shape="minimal"))
    with pytest.raises(MoequantError, match="150 examples but the baseline"):
        run_compare(CompareJob(runs=(str(fp), str(short)), **tasks_job))
    other = _tasks(np.ones(200, int), np.ones(200, int))
    other["results"]["social_iqa"]["examples"][5]["answer"] = 2 if 5 % 3 != 2 else 0
    other_dir = _write(tmp_path / "answers" / "tasks.json", other).parent
    with pytest.raises(MoequantError, match="disagree on the answer of example 5"):
        run_compare(CompareJob(runs=(str(fp), str(other_dir)), **tasks_job))
    with pytest.raises(MoequantError, match="both named"):
        run_compare(CompareJob(runs=(str(fp), str(fp)), **job))
    with pytest.raises(MoequantError, match="--baseline nope"):
        run_compare(CompareJob(runs=(str(fp), str(q4)), baseline="nope", **job))
    keep = tmp_path / "precious"
    keep.mkdir()
    with pytest.raises(MoequantError, match="not an earlier comparison"):
        run_compare(CompareJob(runs=(str(fp), str(q4)), **{**job, "out": keep}))


def test_cli_baseline_flag_and_gate_exit_code(run_dirs, tmp_path, capsys):
    from moequant.cli import main

    fp, q4, q2, peer = run_dirs
    out = tmp_path / "cli"
    argv = ["-q", "compare", str(q4), str(q2), "--baseline", str(fp), "--out", str(out), "--no-plots",
            "--n-boot", "500"]
    assert main(argv) == 0
    assert main(argv + ["--fail-on-worse"]) == 1  # q2 is worse than fp
    assert main(argv + ["--fail-on-worse", "--ppl-margin", "0.5"]) == 0  # q2 is exp(0.2) = 1.22x: within 50%
    assert "Gate with tolerances" in (out / "report.md").read_text()
    assert main(["-q", "compare", str(q4), "--baseline", str(fp), "--out", str(out), "--no-plots",
                 "--fail-on-worse"]) == 0
    printed = capsys.readouterr().out
    assert "| q4 | int4-g64-clip ldlq | 4.250 | 3.0 |" in printed
    assert main(["-q", "compare", str(fp), str(q4), "--ppl", "", "--out", str(out)]) == 2
    # --tasks alone compares tasks only (no default PTB)
    assert main(["-q", "compare", str(fp), str(q2), "--tasks", "social_iqa", "--out", str(out), "--no-plots",
                 "--n-boot", "500"]) == 0
    saved = json.loads((out / "compare.json").read_text())
    assert saved["ppl"] == {} and saved["tasks"]["social_iqa"]["metrics"]["acc"]["q2"]["verdict"] == GATE_WORSE
