"""``moequant eval tasks`` end to end on a tiny model and a tiny local JSONL task: JSON written,
per-example log-likelihoods right, identical numbers run to run; hub tasks fail in one line offline."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import toy_tok_model, toy_words

pytest.importorskip("lm_eval")

from moequant.cli import main  # noqa: E402
from moequant.eval.result_schema import TasksJson  # noqa: E402
from moequant.eval.tasks_metrics import task_acc_delta  # noqa: E402


def _run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def tiny_dir_and_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    tok, model = toy_tok_model("llama", toy_words(3000))
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    with open(d / "toy.jsonl", "w") as f:
        for i in range(12):
            ch = [f"w{(i * 5) % 97}", f"w{(i * 5 + 1) % 97} w{(i * 5 + 2) % 97}", f"w{(i * 3 + 50) % 97}"]
            f.write(json.dumps({"input": f"w{i} w{i + 1} w{i + 2}", "choices": ch, "answer": i % 3}) + "\n")
    return d


def test_end_to_end_reproducible(capsys, one_thread, tiny_dir_and_task, tmp_path):
    d = tiny_dir_and_task
    args = ["-q", "eval", "tasks", str(d / "model"), "--tasks", str(d / "toy.jsonl"), "--limit", "10",
            "--batch-size", "4", "--seed", "3"]
    rc, out, err = _run(capsys, *args, "--json", str(tmp_path / "a.json"))
    assert rc == 0, err
    assert "toy: acc" in out
    rc, _, err = _run(capsys, *args, "--json", str(tmp_path / "b.json"))
    assert rc == 0, err
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["results"] == b["results"]  # every number, per-example log-likelihoods included
    r = a["results"]["toy"]
    ex = r["examples"]
    assert [e["idx"] for e in ex] == list(range(10))  # --limit keeps the first N in file order
    assert r["n"] == 10 and a["limit"] == 10 and a["seed"] == 3 and a["tasks"] == ["toy"]
    assert a["command"].startswith("moequant ") and "torch" in a["versions"] and a["bos_added"] is False
    assert r["data"]["jsonl_sha256"] and r["chance"] == pytest.approx(1 / 3)
    # correctness and the summaries follow from the stored log-likelihoods
    for e in ex:
        assert len(e["loglik"]) == 3 and e["pred"] == max(range(3), key=lambda k: e["loglik"][k])
        norm = [ll / c for ll, c in zip(e["loglik"], e["choice_chars"])]
        assert e["pred_norm"] == max(range(3), key=lambda k: norm[k])
        assert e["acc"] == int(e["pred"] == e["answer"]) and e["acc_norm"] == int(e["pred_norm"] == e["answer"])
    assert r["acc"] == pytest.approx(sum(e["acc"] for e in ex) / 10)
    assert r["acc_norm"] == pytest.approx(sum(e["acc_norm"] for e in ex) / 10)
    assert r["lm_eval"]["acc"] == pytest.approx(r["acc"]) and r["lm_eval"]["acc_norm"] == pytest.approx(r["acc_norm"])
    lo, hi = r["acc_ci95"]
    assert lo <= r["acc"] <= hi
    # the first example's first choice, by hand: "Q: w0 w1 w2\nA:" + " w0"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d / "model")
    model = AutoModelForCausalLM.from_pretrained(d / "model").eval()
    ctx, cont = "Q: w0 w1 w2\nA:", " w0"
    whole, n_ctx = tok(ctx + cont)["input_ids"], len(tok(ctx)["input_ids"])
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits.double().log_softmax(-1)[0]
    want = float(sum(logp[p - 1, whole[p]] for p in range(n_ctx, len(whole))))
    assert ex[0]["loglik"][0] == pytest.approx(want, abs=1e-4)
    # pairing: a run against itself differs by exactly 0
    dlt = task_acc_delta(a, b, "toy")
    assert dlt.delta == 0.0 and dlt.delta_ci == (0.0, 0.0) and dlt.n == 10
    # the typed schema names every key the command writes and gives the same JSON back
    rec = TasksJson.from_dict(a, "a.json")
    assert rec.extra == {} and rec.results["toy"].extra == {} and rec.to_dict() == a
    assert rec.task_results()["toy"].acc == r["acc"] and rec.tasks == ["toy"]


def test_resume_after_a_kill_gives_the_same_numbers(capsys, one_thread, tiny_dir_and_task, tmp_path, monkeypatch):
    """A run killed after three batches keeps their answers beside --json; --resume scores the rest in the same
    batches and ends with every log-likelihood of an uninterrupted run; without --resume, or with other
    settings, the kept answers are a one-line error."""
    import moequant.eval.tasks_progress as tp

    d = tiny_dir_and_task
    args = ["-q", "eval", "tasks", str(d / "model"), "--tasks", str(d / "toy.jsonl"), "--limit", "10",
            "--batch-size", "4"]
    real, straight = tp.TasksProgress.save, []
    monkeypatch.setattr(tp.TasksProgress, "save", lambda self, answers: (straight.append(len(answers)),
                                                                         real(self, answers)))
    rc, _, err = _run(capsys, *args, "--json", str(tmp_path / "a.json"))
    monkeypatch.undo()
    assert rc == 0, err
    # 30 requests (10 examples x 3 choices) in 6 batches of 4 rows: a row answers every choice of one token
    assert straight == [4, 8, 12, 20, 27, 30]
    a = json.loads((tmp_path / "a.json").read_text())
    assert "resumed_requests" not in a and "job_runs" not in a
    assert not tp.TasksProgress.path_for(tmp_path / "a.json").exists()  # removed once the result is written
    calls = []

    def save_then_die(self, answers):
        real(self, answers)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    out = tmp_path / "b.json"
    monkeypatch.setattr(tp.TasksProgress, "save", save_then_die)
    rc, _, err = _run(capsys, *args, "--json", str(out))
    monkeypatch.undo()
    assert rc == 130 and not out.exists()
    kept = json.loads(tp.TasksProgress.path_for(out).read_text())
    assert len(kept["answers"]) == 12  # the first 3 batches
    rc, _, err = _run(capsys, *args, "--json", str(out))
    assert rc == 2 and "pass --resume" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _run(capsys, *args[:-1], "8", "--json", str(out), "--resume")
    assert rc == 2 and "different job (settings differ)" in err
    rc, _, err = _run(capsys, *args, "--resume")
    assert rc == 2 and err.strip() == "moequant: error: eval tasks --resume needs --json (the progress is kept beside that file)"
    scored = []
    real_batch = tp.TasksProgress.save
    monkeypatch.setattr(tp.TasksProgress, "save", lambda self, answers: (scored.append(1), real_batch(self, answers)))
    rc, _, err = _run(capsys, *args, "--json", str(out), "--resume")
    monkeypatch.undo()
    assert rc == 0, err
    b = json.loads(out.read_text())
    assert b["results"] == a["results"]  # every per-example log-likelihood, to the bit
    assert b["resumed_requests"] == 12 and len(scored) == 3 and len(b["job_runs"]) == 2  # 3 of 6 batches reused
    assert b["seconds_all_runs"] >= kept["seconds"] and not tp.TasksProgress.path_for(out).exists()
    rec = TasksJson.from_dict(b, "b.json")
    assert rec.extra == {} and rec.to_dict() == b


def test_tasks_json_schema_errors_name_file_and_key(tmp_path):
    from moequant.errors import MoequantError
    from moequant.eval.runs_io import task_results

    good = {"tasks": ["toy"], "results": {"toy": {"n": 2, "acc": 0.5, "examples": [{"idx": 0, "acc": 1}]}}}
    assert task_results(good, "t.json")["toy"]["acc"] == 0.5
    peer = {"tasks": {"toy": {"acc": 0.5, "per_example": [{"correct": 1}, {"correct": 0}]}}}  # a peer's shape
    assert task_results(peer, "p.json")["toy"]["per_example"][1] == {"correct": 0}
    with pytest.raises(MoequantError, match=r"t.json: not a tasks JSON: 'results\.toy\.acc' should be float"):
        task_results({**good, "results": {"toy": {"acc": "0.5"}}}, "t.json")
    with pytest.raises(MoequantError, match=r"t.json: not a tasks JSON \(missing key 'results'"):
        task_results({"tasks": ["toy"]}, "t.json")
    with pytest.raises(MoequantError, match="t.json: not a tasks JSON: expected a JSON object, got list"):
        task_results([], "t.json")


def test_hub_task_offline_is_one_line(capsys, monkeypatch, tiny_dir_and_task):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, out, err = _run(capsys, "-q", "eval", "tasks", str(tiny_dir_and_task / "model"), "--tasks",
                        "social_iqa,hellaswag")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("moequant: error: task(s) hellaswag need the Hugging Face hub")
    assert "HF_HUB_OFFLINE=1" in err and "social_iqa" in err  # names the local alternatives
    rc, _, err = _run(capsys, "-q", "eval", "tasks", str(tiny_dir_and_task / "model"), "--tasks", "no_such_task")
    assert rc == 2 and err.count("\n") == 1
    assert "task(s) no_such_task are not local tasks; lm-eval's own tasks need the Hugging Face hub" in err


def test_missing_task_file(capsys, tiny_dir_and_task, tmp_path):
    rc, _, err = _run(capsys, "-q", "eval", "tasks", str(tiny_dir_and_task / "model"), "--tasks",
                      str(tmp_path / "nope.jsonl"))
    assert rc == 2 and "nope.jsonl" in err and err.count("\n") == 1
