"""``quantize --resume``: a run stopped after layer k (an injected failure, or a real SIGKILL of a
subprocess) and resumed ends with every checkpoint file byte-identical to an uninterrupted run's, in
memory and with --offload, RTN and calibrated LDLQ; mismatched options and foreign work directories are
one-line errors; nothing is left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import toy_lines, toy_words
from moequant import resume
from moequant.cli import main
from moequant.runinfo import code_sha256
from moequant.resume import RunProgress, fingerprint_diff, tokens_digest, work_dir_for

pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS = 3
RTN = ["--method", "int", "--bits", "4", "--group-size", "32", "--solver", "rtn"]
# report.json fields that measure this process (time, memory, machine, command line, --out), not the result
MEASURED = {"seconds", "peak_rss_bytes", "rss_before_load_bytes", "peak_rss_before_quantize_bytes",
            "rss_start_quantize_bytes", "peak_rss_quantize_bytes", "command", "versions", "machine", "git", "table",
            "completed_by_resume", "out", "layers", "layer_seconds", "job_runs"}  # job_runs: the processes


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way handles it as an error."""


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A 3-layer tiny OLMoE with a tiny BPE tokenizer, and a text file to calibrate on."""
    import transformers as tf

    from moequant.zoo.tiny_olmoe import train_tokenizer

    root = tmp_path_factory.mktemp("toy")
    text = toy_lines(toy_words(3000))
    (root / "text.txt").write_text(text)
    tok = train_tokenizer([text], 320)
    torch.manual_seed(0)
    model = tf.OlmoeForCausalLM(tf.OlmoeConfig(
        hidden_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
        max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=2, intermediate_size=64,
        num_experts=4, num_experts_per_tok=2))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model", root / "text.txt"


def ldlq(text: Path) -> list[str]:
    return ["--method", "int", "--bits", "2", "--group-size", "32", "--solver", "ldlq", "--incoherence", "rht",
            "--calib", str(text), "--calib-samples", "6", "--calib-seqlen", "24", "--calib-batch-size", "4"]


def quantize(model: Path, out: Path, *flags: str) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["-q", "quantize", str(model), "--out", str(out), *flags])
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def references(toy, tmp_path_factory):
    """Uninterrupted runs, one per (flags), made once: ``ref(flags) -> out dir``."""
    root = tmp_path_factory.mktemp("ref")
    made: dict[tuple[str, ...], Path] = {}

    def ref(flags: list[str]) -> Path:
        key = tuple(flags)
        if key not in made:
            out = root / f"ref{len(made)}"
            rc, err = quantize(toy[0], out, *flags)
            assert rc == 0, err
            made[key] = out
        return made[key]

    return ref


def _measured_free(report: dict) -> dict:
    out = {k: v for k, v in report.items() if k not in MEASURED}
    for group in ("quantized_tensors", "kept_tensors"):
        out[group] = [{k: v for k, v in t.items() if k != "seconds"} for t in report[group]]
    return out


def assert_identical_outputs(got: Path, want: Path) -> None:
    """Same file names; every file but report.json byte for byte; report.json equal but for what it
    measures of the process. Not vacuous: the checkpoint has packed tensors in several files."""
    names = sorted(p.name for p in want.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    assert {"config.json", "report.json", "model.safetensors.index.json"} <= set(names)
    assert any(n.endswith(".safetensors") for n in names)
    for n in names:
        if n != "report.json":
            assert (got / n).read_bytes() == (want / n).read_bytes(), n
    rg, rw = (json.loads((d / "report.json").read_text()) for d in (got, want))
    assert rg["quantized_tensors"] and rg["bits_per_weight"] > 0
    assert _measured_free(rg) == _measured_free(rw)


def assert_no_leftovers(parent: Path, expected: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == expected


def commits_spy(monkeypatch, kill_after: int | None = None) -> list[int]:
    """Record the layers committed; with ``kill_after``, stop the run right after that layer's commit."""
    seen: list[int] = []
    orig = RunProgress.commit

    def commit(self, layer, *a, **k):
        orig(self, layer, *a, **k)
        seen.append(layer)
        if layer == kill_after:
            raise Killed

    monkeypatch.setattr(RunProgress, "commit", commit)
    return seen


CASES = [pytest.param(False, "rtn", id="memory-rtn"), pytest.param(False, "ldlq", id="memory-ldlq"),
         pytest.param(True, "rtn", id="offload-rtn"), pytest.param(True, "ldlq", id="offload-ldlq")]


@pytest.mark.parametrize("offload,solver", CASES)
def test_resume_after_stop_is_byte_identical(offload, solver, toy, references, tmp_path, monkeypatch):
    model, text = toy
    flags = (RTN if solver == "rtn" else ldlq(text)) + (["--offload"] if offload else [])
    ref = references(flags)
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        seen = commits_spy(m, kill_after=1)
        with pytest.raises(Killed):
            quantize(model, out, *flags)
    assert seen == [0, 1]
    work = work_dir_for(out)
    assert not out.exists()
    assert sorted(p.name for p in work.iterdir()) == ["job.json", "layer-00000", "layer-00001"]
    # only the latest layer keeps the activations that feed the next one
    assert not (work / "layer-00000" / "act").exists()
    assert (work / "layer-00001" / "act").is_dir() == (solver == "ldlq")
    with monkeypatch.context() as m:
        seen = commits_spy(m)
        rc, err = quantize(model, out, *flags, "--resume")
    assert rc == 0, err
    assert seen == [2]  # layers 0 and 1 came from the work directory
    assert_identical_outputs(out, ref)
    assert_no_leftovers(tmp_path, {"q"})
    # the report names both processes and the code each ran; a straight run names none
    runs = json.loads((out / "report.json").read_text())["job_runs"]
    assert [r["code_sha256"] for r in runs] == [code_sha256()] * 2 and "job_runs" not in json.loads(
        (ref / "report.json").read_text())


def _stopped_after_layer_1(model: Path, out: Path, flags: list[str], monkeypatch) -> None:
    with monkeypatch.context() as m:
        commits_spy(m, kill_after=1)
        with pytest.raises(Killed):
            quantize(model, out, *flags)


@pytest.mark.parametrize("offload", [False, True], ids=["memory", "offload"])
def test_resumed_report_counts_every_runs_layer_time(offload, toy, tmp_path, monkeypatch, capsys):
    """report.json's per-layer seconds come from the run that quantized each layer: the two layers of the
    stopped run are marked restored with that run's stored times, the total covers all three, and the CLI
    says how much was resumed. An uninterrupted run has no restored layer and prints no such line."""
    model, text = toy
    flags = ldlq(text) + (["--offload"] if offload else [])
    out = tmp_path / "q"
    _stopped_after_layer_1(model, out, flags, monkeypatch)
    stored = [json.loads((work_dir_for(out) / f"layer-0000{i}" / "layer.json").read_text())["records"]["layers"]
              for i in (0, 1)]
    assert [[r["layer"] for r in s] for s in stored] == [[0], [1]]
    assert all(r["seconds"] > 0 and r["restored"] is False for s in stored for r in s)
    capsys.readouterr()
    rc, err = quantize(model, out, *flags, "--resume")
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    layers = report["layers"]
    assert [(r["layer"], r["restored"]) for r in layers] == [(0, True), (1, True), (2, False)]
    assert [r["seconds"] for r in layers[:2]] == [s[0]["seconds"] for s in stored]  # the stopped run's times
    assert layers[2]["seconds"] > 0
    ls = report["layer_seconds"]
    assert ls["restored"] == 2
    assert ls["this_run"] == pytest.approx(layers[2]["seconds"], abs=0.011)
    assert ls["total"] == pytest.approx(sum(r["seconds"] for r in layers), abs=0.011)
    printed = capsys.readouterr().out
    assert (f"resumed: 2 of 3 layers came from the interrupted run(s); this run's layers {ls['this_run']:.0f} s, "
            f"all layers over every run: {ls['total']:.0f} s") in printed

    fresh = tmp_path / "fresh"
    rc, err = quantize(model, fresh, *flags)
    assert rc == 0, err
    report = json.loads((fresh / "report.json").read_text())
    assert [(r["layer"], r["restored"]) for r in report["layers"]] == [(0, False), (1, False), (2, False)]
    assert report["layer_seconds"]["restored"] == 0
    assert report["layer_seconds"]["total"] == report["layer_seconds"]["this_run"] > 0
    assert "resumed:" not in capsys.readouterr().out


def test_layers_stored_without_times_make_the_total_unknown(toy, tmp_path, monkeypatch, capsys):
    """Progress written by a moequant that did not record layer times (no ``layers`` in layer.json): those
    layers' seconds are null and the total is unknown, said as such; the run still completes."""
    model, _ = toy
    out = tmp_path / "q"
    _stopped_after_layer_1(model, out, RTN, monkeypatch)
    for i in (0, 1):
        path = work_dir_for(out) / f"layer-0000{i}" / "layer.json"
        info = json.loads(path.read_text())
        del info["records"]["layers"]
        path.write_text(json.dumps(info))
    capsys.readouterr()
    rc, err = quantize(model, out, *RTN, "--resume")
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert [(r["layer"], r["seconds"], r["restored"]) for r in report["layers"][:2]] == [(0, None, True),
                                                                                        (1, None, True)]
    assert report["layer_seconds"]["total"] is None and report["layer_seconds"]["restored"] == 2
    assert "all layers over every run: unknown (stored by an older moequant)" in capsys.readouterr().out


DRIVER = """
import sys, time
from pathlib import Path
from moequant import resume
stop, where, flag = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
write_json, commit = resume.atomic_write_json, resume.RunProgress.commit

def pause():
    flag.write_text("stopped")
    time.sleep(600)

def atomic_write_json(path, obj, **kw):  # mid-commit: the layer's temp directory is full, not renamed
    write_json(path, obj, **kw)
    if where == "mid-commit" and Path(path).name == "layer.json" and obj["layer"] == stop:
        pause()

def after_commit(self, layer, *a, **k):
    commit(self, layer, *a, **k)
    if where == "after-commit" and layer == stop:
        pause()

resume.atomic_write_json = atomic_write_json
resume.RunProgress.commit = after_commit
from moequant.cli import main
sys.exit(main(sys.argv[4:]))
"""


@pytest.mark.parametrize("offload,where,sig", [
    pytest.param(False, "after-commit", signal.SIGKILL, id="memory-after-commit-SIGKILL"),
    pytest.param(True, "mid-commit", signal.SIGKILL, id="offload-mid-commit-SIGKILL"),
    pytest.param(True, "mid-commit", signal.SIGTERM, id="offload-mid-commit-SIGTERM")])
def test_killed_subprocess_then_resume(offload, where, sig, toy, references, tmp_path, monkeypatch):
    """A real process, killed while it sleeps right after committing layer 1 (or between writing layer 1's
    files and renaming them into place). SIGKILL: no handler runs, temp directories stay and --resume
    cleans them. SIGTERM: exit 143, nothing but the finished layers left, and a line saying so. Both end
    byte-identical after --resume."""
    model, text = toy
    flags = ldlq(text) + (["--offload"] if offload else [])
    ref = references(flags)
    out, flag = tmp_path / "q", tmp_path / "stopped"
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(resume.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), "1", where, str(flag),
                             "-q", "quantize", str(model), "--out", str(out), *flags],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not flag.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(sig)
    assert proc.wait(60) == (-signal.SIGKILL if sig == signal.SIGKILL else 143)
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    work = work_dir_for(out)
    layers = sorted(p.name for p in work.iterdir() if p.name.startswith("layer-"))
    assert layers == (["layer-00000", "layer-00001"] if where == "after-commit" else ["layer-00000"])
    leftovers = {p.name for p in tmp_path.iterdir()} | {p.name for p in work.iterdir()}
    if sig == signal.SIGKILL:
        assert any("moequant-tmp" in n for n in leftovers) == (offload or where == "mid-commit")
        assert any("moequant-act" in n for n in leftovers) == offload
    else:
        assert leftovers == {"driver.py", "stopped", work.name, "job.json", "layer-00000"}
        assert f"progress kept in {work} (layers 0-0 finished): rerun with --resume to continue" in stderr
    with monkeypatch.context() as m:
        seen = commits_spy(m)
        rc, err = quantize(model, out, *flags, "--resume")
    assert rc == 0, err
    assert seen == ([2] if where == "after-commit" else [1, 2])
    assert_identical_outputs(out, ref)
    assert_no_leftovers(tmp_path, {"q", "driver.py", "stopped"})


def test_mismatched_options_and_foreign_work_dirs(toy, tmp_path, monkeypatch):
    model, text = toy
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        commits_spy(m, kill_after=0)
        with pytest.raises(Killed):
            quantize(model, out, *RTN)
    work = work_dir_for(out)
    # without --resume: told what to do, with the path
    rc, err = quantize(model, out, *RTN)
    assert rc == 2 and err.count("\n") == 1
    assert f"{work} holds the progress of an interrupted run" in err and "pass --resume" in err
    # other options: exit 2, one line saying what differs; the progress stays
    for flags, differs in ((RTN[:3] + ["3"] + RTN[4:], "(recipe.rules: was"),
                           (RTN + ["--offload"], "(offload: was false, now true"), (ldlq(text), "solver.incoherence: was \"none\", now \"rht\"")):
        rc, err = quantize(model, out, *flags, "--resume")
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith(f"moequant: error: --resume: {work} was made by a different job (") and differs in err
    assert (work / "layer-00000").is_dir() and not out.exists()
    # a work directory whose owner still runs (here: our parent process)
    job = json.loads((work / "job.json").read_text())
    job["owner"] = {**job["owner"], "pid": os.getppid(), "start": resume._process_start(os.getppid())}
    (work / "job.json").write_text(json.dumps(job))
    rc, err = quantize(model, out, *RTN, "--resume")
    assert rc == 2 and f"another run (pid {os.getppid()}) is writing {work}" in err
    assert (work / "layer-00000").is_dir()


def test_resume_without_progress_starts_fresh(toy, references, tmp_path, caplog):
    model, _ = toy
    out = tmp_path / "q"
    with caplog.at_level("INFO", logger="moequant.resume"):
        rc, err = quantize(model, out, *RTN, "--resume")
    assert rc == 0, err
    assert f"--resume: no progress in {work_dir_for(out)}, starting from the first layer" in caplog.messages
    assert_identical_outputs(out, references(RTN))
    assert_no_leftovers(tmp_path, {"q"})


def test_killed_after_the_rename_resume_writes_report(toy, references, tmp_path, monkeypatch):
    """Stopped after the checkpoint's rename, before report.json: a plain rerun points to --resume, which
    writes report.json (checked against the stored layers) without quantizing again."""
    from moequant import runs

    model, _ = toy
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        def stop(*a, **k):
            raise Killed
        m.setattr(runs, "quantize_result", stop)
        with pytest.raises(Killed):
            quantize(model, out, *RTN)
    assert (out / "config.json").is_file() and not (out / "report.json").exists()
    rc, err = quantize(model, out, *RTN)
    assert rc == 2 and "pass --resume" in err
    with monkeypatch.context() as m:
        seen = commits_spy(m)
        rc, err = quantize(model, out, *RTN, "--resume")
    assert rc == 0, err
    assert seen == []
    assert json.loads((out / "report.json").read_text())["completed_by_resume"] is True
    assert_identical_outputs(out, references(RTN))
    assert_no_leftovers(tmp_path, {"q"})


def test_fingerprint_diff_names_what_changed():
    old = {"recipe": {"bits": 2}, "offload": False, "source": {"path": "/m", "files": {"a": [1, 2], "b": [3, 4]}}}
    assert fingerprint_diff(old, old) == []
    new = {"recipe": {"bits": 3}, "offload": False, "source": {"path": "/m", "files": {"a": [1, 5], "b": [3, 4]}}}
    assert fingerprint_diff(old, new) == ["recipe.bits: was 2, now 3", "model files changed: a"]
    nested = {"spec": {"calib": {"samples": 8, "seqlen": 64}, "arch": "mixtral"}}
    assert fingerprint_diff(nested, {"spec": {"calib": {"samples": 16, "seqlen": 64}, "arch": "mixtral"}}) == \
        ["spec.calib.samples: was 8, now 16"]
    moved = {**old, "source": {"path": "/n", "files": {}}}
    assert fingerprint_diff(old, moved) == ['source: was {"files":{"a":[1,2],"b":[3,4]},"path":"/m"}, now '
                                            '{"files":{},"path":"/n"}']
    long = {"x": list(range(100))}
    assert fingerprint_diff({}, long) == ["x: was null, now " + json.dumps(long["x"]).replace(" ", "")[:77] + "..."]


def test_tokens_digest_and_work_dir_name():
    t = torch.arange(12).view(3, 4)
    assert tokens_digest(t) == tokens_digest(t.clone()) != tokens_digest(t.view(4, 3))
    assert tokens_digest(t) != tokens_digest(t + (torch.arange(12).view(3, 4) == 5))
    assert work_dir_for(Path("/a/b/out")) == Path("/a/b/.out.moequant-run")


@pytest.mark.parametrize("spill", [False, True])
def test_runner_inputs_round_trip_bit_exact(spill, tmp_path):
    """The runner's activations saved and loaded back are the same bits, dtype and batch split."""
    from conftest import tiny_model
    from moequant.calib.runner import LayerwiseRunner
    from moequant.models.adapters import adapter_for

    model = tiny_model("llama").to(torch.bfloat16)
    tokens = torch.randint(3, 256, (5, 8), generator=torch.Generator().manual_seed(0))
    def make(name):
        if spill:
            (tmp_path / name).mkdir()
        return LayerwiseRunner(model, adapter_for(model), tokens, batch_size=2,
                               spill_dir=tmp_path / name if spill else None)

    a = make("a")
    a.run(0, keep_outputs=True)
    spec = a.save_inputs(tmp_path / "saved")
    assert [s["shape"] for s in spec] == [[2, 8, 64], [2, 8, 64], [1, 8, 64]]
    assert {s["dtype"] for s in spec} == {"bfloat16"}
    b = make("b")
    b.load_inputs(tmp_path / "saved", spec)
    for j in range(3):
        assert b.hidden(j).dtype == torch.bfloat16 and torch.equal(b.hidden(j), a.hidden(j))
    a.run(1, keep_outputs=True)
    b.run(1, keep_outputs=True)
    assert all(torch.equal(a.hidden(j), b.hidden(j)) for j in range(3))


def test_killed_before_the_work_dir_is_removed(toy, references, tmp_path, monkeypatch):
    """Stopped after report.json, before the work directory's removal: --resume only removes it."""
    model, _ = toy
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        def stop(self):
            raise Killed
        m.setattr(RunProgress, "remove", stop)
        with pytest.raises(Killed):
            quantize(model, out, *RTN)
    assert (out / "report.json").is_file() and work_dir_for(out).is_dir()
    report = (out / "report.json").read_bytes()
    rc, err = quantize(model, out, *RTN, "--resume")
    assert rc == 0, err
    assert (out / "report.json").read_bytes() == report
    assert_identical_outputs(out, references(RTN))
    assert_no_leftovers(tmp_path, {"q"})
