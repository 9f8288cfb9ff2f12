"""``moequant eval tasks``: zero-shot multiple-choice accuracy through lm-eval-harness on a model we
load ourselves (zoo alias, packed checkpoint, HF directory, .gguf, hub id).

Local tasks (BIG-bench tasks converted to JSONL, or any JSONL file of ``input`` / ``choices`` /
``answer`` records) run with the hub switched off; other names go to lm-eval as they are (they need
the hub). The result keeps every example's per-choice log-likelihoods so two runs can be compared
pairwise (``moequant.eval.tasks_metrics.task_acc_delta``)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from moequant.errors import MoequantError
from moequant.eval.tasks_local import PROMPT, is_local_task, prepare_local_tasks, task_label
from moequant.eval.tasks_metrics import summarize_task
from moequant.fsutil import temp_dir
from moequant.runinfo import run_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TasksJob:
    model: str
    tasks: tuple[str, ...]
    limit: int | None = None  # first N examples of each task, in file order
    batch_size: int = 8
    max_length: int | None = None  # None: the model's own limit
    seed: int = 0  # lm-eval's seeds and the bootstrap's
    n_boot: int = 2000
    verify: bool = True  # SHA-256 of a moequant checkpoint's tensors checked as they are read

    def __post_init__(self) -> None:
        if not self.tasks:
            raise MoequantError("--tasks: give at least one task")
        if self.limit is not None and self.limit < 1:
            raise MoequantError(f"--limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise MoequantError(f"--batch-size must be >= 1, got {self.batch_size}")


def parse_task_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


@contextlib.contextmanager
def hub_offline(on: bool) -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` to 1 while local-only tasks run; restored after."""
    if not on:
        yield
        return
    from moequant.eval.lm_eval_adapter import OFFLINE_VARS

    old = {v: os.environ.get(v) for v in OFFLINE_VARS}
    os.environ.update({v: "1" for v in OFFLINE_VARS})
    try:
        yield
    finally:
        for v, val in old.items():
            if val is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = val


def _gold_indices(target: Any, choices: list[str]) -> list[int]:
    """lm-eval's target of a multiple-choice doc: an index, a choice's text, or a list of indices."""
    if isinstance(target, (list, tuple)):
        return [int(t) for t in target]
    if isinstance(target, str):
        if target in choices:
            return [choices.index(target)]
        if target.strip().isdigit():
            return [int(target)]
        raise MoequantError(f"lm-eval target {target!r} is neither a choice nor an index")
    return [int(target)]


def task_examples(samples: list[dict[str, Any]], doc_to_choice: Any) -> list[dict[str, Any]]:
    """Per-example records from lm-eval multiple-choice samples: idx, answer (an index, or a list when
    several choices are right), per-choice log-likelihoods and character lengths, predictions and 0/1
    ``acc`` / ``acc_norm`` (ours, from the log-likelihoods)."""
    from moequant.eval.lm_eval_adapter import sample_logliks
    from moequant.eval.tasks_metrics import predictions

    out = []
    for s in samples:
        doc = s["doc"]
        ll = sample_logliks(s)
        choices = [str(c) for c in doc_to_choice(doc)]
        if len(ll) != len(choices):
            raise MoequantError(f"lm-eval returned {len(ll)} log-likelihoods for {len(choices)} choices")
        gold = _gold_indices(s["target"], choices)
        pred, pred_norm = predictions(ll, [len(c) for c in choices])
        idx = doc.get("idx", s["doc_id"]) if isinstance(doc, dict) else s["doc_id"]
        out.append({"idx": idx, "doc_id": int(s["doc_id"]), "answer": gold[0] if len(gold) == 1 else gold,
                    "loglik": ll, "choice_chars": [len(c) for c in choices], "pred": pred, "pred_norm": pred_norm,
                    "acc": int(pred in gold), "acc_norm": int(pred_norm in gold)})
    return out


def _other_task_result(samples: list[dict[str, Any]], lm_metrics: dict[str, Any], n_boot: int,
                       seed: int) -> dict[str, Any]:
    """A task that is not multiple choice (lambada, ...): lm-eval's numeric per-sample metrics, and a
    bootstrap CI for ``acc`` when it has one."""
    from moequant.eval.bootstrap import bootstrap_mean_ci

    ex = [{"idx": s["doc_id"], "doc_id": int(s["doc_id"]),
           **{m: float(s[m]) for m in s.get("metrics", []) if isinstance(s.get(m), (int, float))}} for s in samples]
    out: dict[str, Any] = {"n": len(ex)}
    if ex and all("acc" in e for e in ex):
        out["acc"] = sum(e["acc"] for e in ex) / len(ex)
        out["acc_ci95"] = list(bootstrap_mean_ci([e["acc"] for e in ex], n_boot=n_boot, seed=seed))
    out["lm_eval"] = {k.split(",")[0]: v for k, v in lm_metrics.items() if isinstance(v, (int, float))}
    out["examples"] = ex
    return out


def evaluate_loaded(model: Any, tokenizer: Any, job: TasksJob, *, model_info: dict[str, Any] | None = None,
                    argv: list[str] | None = None, keeper: Any = None) -> dict[str, Any]:
    """Run ``job.tasks`` on an already loaded model; returns the JSON-able result. ``keeper``: a loaded
    ``tasks_progress.TasksProgress`` (its answers are reused and it is saved after every scored batch)."""
    from moequant.eval.lm_eval_adapter import load_tasks, lm_eval_version, make_lm, run_tasks

    local = [t for t in job.tasks if is_local_task(t)]
    hub = [t for t in job.tasks if not is_local_task(t)]
    t0 = time.time()
    with temp_dir() as tmp, hub_offline(not hub):  # moequant-tmp-<pid>-...: cleaned by a later run if killed
        lt = prepare_local_tasks(local, tmp)
        requested = [lt.lm_eval_names[task_label(t)] if t in local else t for t in job.tasks]
        labels = dict(zip(requested, [task_label(t) for t in job.tasks]))
        tasks = load_tasks(requested, lt.include_dir if local else None, include_defaults=bool(hub))
        names = list(tasks)  # a group's subtasks appear under their own names
        labels.update({n: n for n in names if n not in labels})
        lm = make_lm(model, tokenizer, batch_size=job.batch_size, max_length=job.max_length)
        kept = dict(keeper.answers) if keeper is not None else None
        if keeper is not None:
            lm.kept, lm.on_batch = kept, keeper.save
        raw = run_tasks(lm, tasks, job.limit, job.seed)
    results: dict[str, Any] = {}
    for name in names:
        label = labels[name]
        lm_metrics = raw["results"].get(name, {})
        data = lt.provenance.get(label, {"source": "lm-eval (hub)"})
        if getattr(tasks[name], "OUTPUT_TYPE", None) != "multiple_choice":
            results[label] = {**_other_task_result(raw["samples"][name], lm_metrics, job.n_boot, job.seed),
                              "lm_eval_task": name, "output_type": getattr(tasks[name], "OUTPUT_TYPE", None),
                              "data": data}
            continue
        ex = task_examples(raw["samples"][name], tasks[name].doc_to_choice)
        summary = summarize_task(ex, n_boot=job.n_boot, seed=job.seed)
        results[label] = {**summary, "lm_eval_task": name,
                          "lm_eval": {m: lm_metrics.get(f"{m},none") for m in ("acc", "acc_norm")},
                          "data": data, "examples": ex}
    probe = tokenizer("Q:")["input_ids"]
    bos_added = bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    return {"model": job.model, **(model_info or {}), "tasks": [labels[n] for n in names],
            "bos_added": bos_added,
            "limit": job.limit, "seed": job.seed, "batch_size": job.batch_size, "max_length": job.max_length,
            "n_boot": job.n_boot, "num_fewshot": 0, "prompt": {"context": PROMPT, "continuation": " {choice}",
            "acc_norm": "log-likelihood / characters of the choice"},
            "lm_eval_version": lm_eval_version(), "results": results, "seconds": round(time.time() - t0, 2),
            **_resumed(keeper), **run_info(argv)}


def _resumed(keeper: Any) -> dict[str, Any]:
    """What a resumed run adds to the result: the requests answered before (``resumed_requests``), the working
    time of every run and the processes (``job_runs``)."""
    from moequant.runinfo import job_runs

    if keeper is None or not keeper.answers:
        return {}
    return {"resumed_requests": len(keeper.answers), "seconds_all_runs": keeper.seconds_all_runs(),
            **job_runs({"runs": keeper.runs})}


def run_tasks_job(job: TasksJob, argv: list[str] | None = None, out_json: Path | None = None,
                  resume: bool = False) -> dict[str, Any]:
    """Check the task names, load the model, evaluate. Hub tasks fail in one line when offline. With ``out_json``
    (where the caller writes the result) the answered requests are kept beside it after every batch
    (``eval.tasks_progress``) and ``resume`` continues an interrupted run from them; the caller removes them with
    ``finish_tasks_progress`` once the result is written."""
    from moequant.eval.lm_eval_adapter import _import_lm_eval, check_hub_tasks
    from moequant.eval.tasks_progress import TasksProgress, fingerprint
    from moequant.zoo.bigbench import BIGBENCH_TASKS

    if resume and out_json is None:
        raise MoequantError("eval tasks --resume needs --json (the progress is kept beside that file)")
    if out_json is not None and not resume:
        TasksProgress(Path(out_json), {}).refuse_stale()  # before the model is loaded: fail fast
    _import_lm_eval()
    hub = [t for t in job.tasks if not is_local_task(t)]
    check_hub_tasks(hub, ", ".join(BIGBENCH_TASKS) + ", or a .jsonl file")
    missing = [t for t in job.tasks if t.endswith(".jsonl") and not Path(t).is_file()]
    if missing:
        raise MoequantError(f"--tasks: no such file {missing[0]}")
    from moequant.models.loader import load_model, resolve_model_spec

    # a hub model id still loads from the hub; everything else loads (and imports) with the hub off
    with hub_offline(not hub and resolve_model_spec(job.model).kind != "hub"):
        model, tokenizer, resolved = load_model(job.model, verify=job.verify)
    if tokenizer is None:
        raise MoequantError(f"model {job.model!r} has no tokenizer: eval tasks needs one")
    keeper = None
    if out_json is not None:
        keeper = TasksProgress(Path(out_json), fingerprint(job.model, resolved, {
            "tasks": list(job.tasks), "limit": job.limit, "batch_size": job.batch_size, "max_length": job.max_length,
            "seed": job.seed, "task_files": _task_files(job.tasks)}))
        keeper.answers = keeper.load(resume)
    return evaluate_loaded(model, tokenizer, job, model_info={"source": resolved.kind}, argv=argv, keeper=keeper)


def _task_files(tasks: tuple[str, ...]) -> dict[str, list[int]]:
    """Size and mtime of each ``.jsonl`` task file (another file forms other batches)."""
    out = {}
    for t in tasks:
        if t.endswith(".jsonl"):
            st = Path(t).stat()
            out[str(Path(t).resolve())] = [st.st_size, st.st_mtime_ns]
    return out


def finish_tasks_progress(out_json: Path) -> None:
    """Remove the progress of a run whose result ``out_json`` is written."""
    from moequant.eval.tasks_progress import TasksProgress

    TasksProgress.path_for(Path(out_json)).unlink(missing_ok=True)
