"""``eval ppl --json OUT`` keeps its scored windows beside OUT; ``--resume`` continues a killed run and ends with the
uninterrupted run's numbers; a stale or foreign progress file is a one-line error, never silently reused."""

import json

import pytest
import torch
from conftest import save_toy_olmoe, tiny_model

from moequant.cli import main
from moequant.eval.perplexity import PplConfig, evaluate_perplexity
from moequant.eval.ppl_progress import progress_path


class Killed(Exception):
    pass


def test_skipping_scored_batches_gives_the_same_numbers():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (700,), generator=torch.Generator().manual_seed(0))
    cfg = PplConfig(seqlen=32, batch_size=2)
    every: list = []
    full = evaluate_perplexity(model, ids, cfg, bos_id=1, progress=False, on_batch=every.append)
    seen: dict[int, float] = {}

    def stop_after_three(scored):
        seen.clear()
        seen.update(scored)
        if len(scored) >= 6:
            raise Killed

    with pytest.raises(Killed):
        evaluate_perplexity(model, ids, cfg, bos_id=1, progress=False, on_batch=stop_after_three)
    assert len(seen) == 6 and full.n_windows > 6
    calls = []
    rest = evaluate_perplexity(model, ids, cfg, bos_id=1, progress=False, done=seen, on_batch=calls.append)
    assert rest.nll_per_window == full.nll_per_window and rest.ppl == full.ppl and rest.ci95 == full.ci95
    assert len(calls) == len(every) - 3  # only the missing batches ran
    with pytest.raises(ValueError, match="whole batches"):
        evaluate_perplexity(model, ids, cfg, bos_id=1, progress=False, done={0: seen[0]})


def _ppl(capsys, *argv):
    rc = main(["-q", "eval", "ppl", *argv])
    return rc, capsys.readouterr().err


def test_cli_resume_after_a_kill(capsys, caplog, tmp_path, monkeypatch):
    d, text = save_toy_olmoe(tmp_path, "m", 3000)
    common = [str(d), "--data", str(text), "--seqlen", "32", "--batch-size", "2"]
    rc, err = _ppl(capsys, *common, "--json", str(tmp_path / "full.json"))
    assert rc == 0, err
    full = json.loads((tmp_path / "full.json").read_text())
    assert not progress_path(tmp_path / "full.json").exists()  # removed once the result is written

    import moequant.eval.ppl_progress as pp

    real_save = pp.PplProgress.save

    def save_then_die(self, done):
        real_save(self, done)
        if len(done) >= 4:
            raise KeyboardInterrupt  # as a Ctrl-C (or SIGTERM) after two batches

    out = tmp_path / "r.json"
    monkeypatch.setattr(pp.PplProgress, "save", save_then_die)
    rc, err = _ppl(capsys, *common, "--json", str(out))
    assert rc != 0 and not out.exists()
    monkeypatch.setattr(pp.PplProgress, "save", real_save)
    kept = json.loads(progress_path(out).read_text())
    assert len(kept["nll"]) == 4
    assert isinstance(kept["seconds"], float) and kept["seconds"] >= 0  # the killed run's scoring time

    rc, err = _ppl(capsys, *common, "--json", str(out))  # no --resume: the progress is not thrown away
    assert rc == 2 and "pass --resume" in err and str(progress_path(out)) in err and len(err.strip().splitlines()) == 1
    rc, err = _ppl(capsys, *common[:-2], "--batch-size", "4", "--json", str(out), "--resume")
    assert rc == 2 and "different job" in err and "settings" in err
    rc, err = _ppl(capsys, *common, "--resume")
    assert rc == 2 and "--resume needs --json" in err

    import moequant.runinfo as ri

    first = ri.code_sha256()
    assert [r["code_sha256"] for r in kept["runs"]] == [first] and full["code_sha256"] == first
    monkeypatch.setattr(ri, "code_sha256", lambda root=None: "b" * 64)  # the code changed between the two runs
    with caplog.at_level("WARNING", logger="moequant.runinfo"):
        rc, err = _ppl(capsys, *common, "--json", str(out), "--resume")
    monkeypatch.undo()
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert [r["code_sha256"] for r in res["job_runs"]] == [first, "b" * 64] and res["code_sha256"] == "b" * 64
    assert "job_runs" not in full
    assert f"left by other moequant code (code_sha256 {first[:12]}, now bbbbbbbbbbbb)" in caplog.text
    assert res["resumed_windows"] == 4 and res["nll_per_window"] == full["nll_per_window"]
    assert res["ppl"] == full["ppl"] and res["ci95"] == full["ci95"]
    assert not progress_path(out).exists()
    # the time of both runs: the killed run's (from the progress file) plus this one's
    assert res["seconds_all_runs"] == pytest.approx(kept["seconds"] + res["seconds"], abs=0.5)
    assert res["seconds_all_runs"] >= kept["seconds"] and "seconds_all_runs" not in full

    # progress written before the file kept times: the total is unknown (null), the numbers the same
    out2 = tmp_path / "r2.json"
    monkeypatch.setattr(pp.PplProgress, "save", save_then_die)
    rc, err = _ppl(capsys, *common, "--json", str(out2))
    monkeypatch.setattr(pp.PplProgress, "save", real_save)
    old = json.loads(progress_path(out2).read_text())
    del old["seconds"], old["runs"]
    progress_path(out2).write_text(json.dumps(old))
    rc, err = _ppl(capsys, *common, "--json", str(out2), "--resume")
    assert rc == 0, err
    res2 = json.loads(out2.read_text())
    assert res2["seconds_all_runs"] is None and res2["nll_per_window"] == full["nll_per_window"]
    # ... and did not name its code: an unknown first run, then this one
    assert [r["code_sha256"] for r in res2["job_runs"]] == [None, first]
