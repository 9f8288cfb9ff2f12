"""``moequant compare RUN_A RUN_B ...``: locate (or make) every run's eval JSONs, check they share
windows/examples, compute the rows (``moequant.eval.compare``), and write ``report.md``,
``compare.json`` and the PNG plots into ``--out`` (built in a temporary directory, then renamed)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moequant.errors import MoequantError
from moequant.fsutil import AtomicDir, check_output, input_paths
from moequant.eval.compare import (
    GATE_WORSE,
    GateConfig,
    StatsConfig,
    acc_row,
    align_examples,
    check_same_windows,
    markdown_report,
    ppl_protocol,
    ppl_row,
    protocol_text,
)
from moequant.eval.result_schema import CompareJson
from moequant.eval.runs_io import (
    Run,
    check_unique_names,
    data_slug,
    file_slug,
    find_ppl,
    find_tasks,
    load_run,
    per_example_scores,
    ppl_filename,
    write_bytes_atomic,
    write_json_atomic,
)

log = logging.getLogger(__name__)

COMPARE_JSON = "compare.json"


@dataclass(frozen=True)
class EvalDefaults:
    """Protocol for scoring a run that lacks a perplexity JSON when no other run has one to copy."""

    seqlen: int = 512
    stride: int | None = None
    add_bos: bool = True
    max_tokens: int | None = 16384
    batch_size: int = 4


@dataclass(frozen=True)
class CompareJob:
    runs: tuple[str, ...]
    out: Path
    ppl: tuple[str, ...] = ("ptb",)
    tasks: tuple[str, ...] = ()
    baseline: str | None = None  # a path among ``runs`` or a run name; default the first run
    split: str = "test"
    stats: StatsConfig = StatsConfig()
    gate: GateConfig = GateConfig()
    evaluate_missing: bool = True
    eval_defaults: EvalDefaults = EvalDefaults()
    plots: bool = True
    progress: bool = True


def _pick_baseline(runs: list[Run], spec: str | None) -> Run:
    if spec is None:
        return runs[0]
    for r in runs:
        if r.name == spec or r.path == Path(spec) or r.path.resolve() == Path(spec).resolve():
            return r
    raise MoequantError(f"--baseline {spec}: not one of the runs compared ({', '.join(r.name for r in runs)})")


def _evaluate_ppl(run: Run, data: str, split: str, reference: dict[str, Any] | None, job: CompareJob,
                  argv: list[str] | None) -> tuple[Path, dict[str, Any]]:
    """Score ``run`` (its checkpoint directory, or run.json's "model") on the windows of ``reference`` (or
    the defaults) and save ``RUN/ppl-<data>.json``. The scored windows are kept beside that file as ``eval ppl
    --json`` keeps them, and a comparison run again after a kill continues them (``eval.ppl_progress``: refused,
    naming what differs, when they were scored for another job)."""
    from moequant.runs import PplJob, finish_ppl_progress, run_ppl

    d = job.eval_defaults
    if reference is not None:
        seqlen, add_bos = int(reference["seqlen"]), bool(reference.get("add_bos", True))
        stride = reference.get("stride")
        stride = None if stride in (None, seqlen) else int(stride)
        max_tokens = reference.get("max_tokens")
    else:
        seqlen, stride, add_bos, max_tokens = d.seqlen, d.stride, d.add_bos, d.max_tokens
    ppl_job = PplJob(str(run.model_spec), data=data, split=split, seqlen=seqlen, stride=stride, add_bos=add_bos,
                     batch_size=d.batch_size, max_tokens=max_tokens, progress=job.progress)
    log.info("%s has no %s perplexity JSON: scoring it (%d-token windows, max_tokens=%s)", run.name, data, seqlen,
             max_tokens)
    path = run.path / ppl_filename(data)
    result = run_ppl(ppl_job, argv, out_json=path, resume=True)
    write_json_atomic(path, result)
    finish_ppl_progress(path)
    return path, result


def _ppl_block(runs: list[Run], base: Run, data: str, job: CompareJob, argv: list[str] | None,
               evaluated: list[str]) -> dict[str, Any]:
    found = {r.name: find_ppl(r, data, job.split) for r in runs}
    missing = [r for r in runs if found[r.name] is None]
    for r in missing:  # every refusal before the first (slow) scoring
        if not r.is_dir:
            raise MoequantError(f"run {r.path} is one JSON file without perplexity on {data}/{job.split}; "
                                f"pass its folder holding {ppl_filename(data)} instead")
        if not (job.evaluate_missing and r.model_spec):
            why = ("it is not a checkpoint directory and has no run.json \"model\"" if not r.model_spec
                   else "--no-evaluate was given")
            raise MoequantError(f"run {r.path} has no perplexity JSON for {data}/{job.split} (looked for "
                                f"{ppl_filename(data)} and ppl.json) and cannot be scored here: {why}. Write one "
                                f"with `moequant eval ppl MODEL --data {data} --json {r.path / ppl_filename(data)}`")
    have = [r for r in runs if found[r.name] is not None]
    ref = base if found[base.name] is not None else (have[0] if have else None)
    for r in have:
        if r is not ref:
            check_same_windows(str(found[ref.name][0]), found[ref.name][1], str(found[r.name][0]), found[r.name][1])
    reference = found[ref.name][1] if ref is not None else None
    for r in missing:
        found[r.name] = _evaluate_ppl(r, data, job.split, reference, job, argv)
        evaluated.append(str(found[r.name][0]))
        reference = reference or found[r.name][1]
    base_path, base_obj = found[base.name]
    for r in runs:
        if r is not base:
            check_same_windows(str(base_path), base_obj, str(found[r.name][0]), found[r.name][1])
    rows = []
    for r in runs:
        path, obj = found[r.name]
        rows.append({"run": r.name, "file": str(path),
                     **ppl_row(obj, None if r is base else base_obj, job.stats, job.gate)})
    protocol = {"data": data, "split": job.split, **ppl_protocol(base_obj)}
    return {"protocol": protocol, "rows": rows}


def _task_block(runs: list[Run], base: Run, task: str, job: CompareJob) -> dict[str, Any]:
    """Accuracy rows of ``task``; a run without a result for it is left out (listed under ``missing``),
    the baseline must have one."""
    per_run, missing = {}, []
    for r in runs:
        tasks = find_tasks(r)
        if task in tasks:
            per_run[r.name] = tasks[task]
            continue
        where = r.path / "tasks.json" if r.is_dir else r.path
        if r is base:
            raise MoequantError(f"the baseline {r.path} has no result for task {task!r} (looked in {where}"
                                f"{' and tasks-*.json' if r.is_dir else ''}; write it with `moequant eval tasks MODEL "
                                f"--tasks {task} --json {where}`)")
        log.warning("run %s has no result for task %s: left out of that table", r.name, task)
        missing.append(r.name)
    runs = [r for r in runs if r.name in per_run]
    metrics = ["acc"]
    if all(any(k in ex for k in ("correct_norm", "acc_norm")) for _, res in per_run.values()
           for ex in (res.get("examples") or res.get("per_example") or [{}])[:1]):
        metrics.append("acc_norm")
    out: dict[str, Any] = {"metrics": {}, "runs": [r.name for r in runs], "missing": missing, "files": {}}
    for m in metrics:
        bpath, bres = per_run[base.name]
        bwhere = f"{bpath} task {task}"
        b_scores = per_example_scores(bres, m, bwhere)
        rows = {}
        for r in runs:
            path, res = per_run[r.name]
            where = f"{path} task {task}"
            scores = b_scores.scores if r is base else align_examples(
                bwhere, b_scores, where, per_example_scores(res, m, where))
            rows[r.name] = acc_row(scores, None if r is base else b_scores.scores, job.stats, job.gate)
        out["metrics"][m] = rows
        out["n_examples"] = len(b_scores.scores)
    out["files"] = {name: str(p) for name, (p, _) in per_run.items()}
    return out


def _plots(result: dict[str, Any], runs: list[Run], tmp: Path) -> list[str]:
    from moequant.eval.plots import plot_frontier, plot_ppl, plot_proxy_heatmap

    files = []
    bpw = {r.name: r.bits_per_weight for r in runs}
    for data, block in result["ppl"].items():
        title = f"Perplexity, {protocol_text(block['protocol'])}"
        name = f"ppl_{data_slug(data)}.png"
        plot_ppl(block["rows"], result["baseline"], title, tmp / name)
        files.append(name)
        base_row = next(r for r in block["rows"] if r["run"] == result["baseline"])
        points = [{**row, "bits_per_weight": bpw[row["run"]]} for row in block["rows"]
                  if row["run"] != result["baseline"] and bpw[row["run"]] is not None]
        name = f"frontier_{data_slug(data)}.png"
        plot_frontier(points, base_row, f"bits/weight vs perplexity, {data}/{block['protocol'].get('split')}",
                      tmp / name)
        files.append(name)
    for r in runs:
        if r.report is None:
            continue
        name = f"proxy_{file_slug(r.name)}.png"
        if plot_proxy_heatmap(r.report.to_dict(), f"{r.name}: per-expert proxy loss", tmp / name):
            files.append(name)
    return files


def _is_comparison(path: Path) -> bool:
    return (Path(path) / COMPARE_JSON).is_file()


_NOT_COMPARISON = f"an earlier comparison (no {COMPARE_JSON})"


def run_compare(job: CompareJob, argv: list[str] | None = None) -> dict[str, Any]:
    from moequant.runinfo import run_info

    if len(job.runs) < 1:
        raise MoequantError("compare needs at least one run")
    if not job.ppl and not job.tasks:
        raise MoequantError("nothing to compare: give --ppl and/or --tasks")
    # before any work: writable, apart from the runs, and replacing only an earlier comparison
    check_output(job.out, True, "--out", sources=input_paths(*job.runs), is_ours=_is_comparison,
                 kind=_NOT_COMPARISON, sources_what="run")
    runs = [load_run(s) for s in job.runs]
    if job.baseline is not None and not any(
            r.name == job.baseline or r.path.resolve() == Path(job.baseline).resolve() for r in runs):
        if not Path(job.baseline).exists():
            raise MoequantError(f"--baseline {job.baseline}: neither the name of a run compared "
                                f"({', '.join(r.name for r in runs)}) nor an existing path")
        runs.insert(0, load_run(job.baseline))
    check_unique_names(runs)
    base = _pick_baseline(runs, job.baseline)
    runs = [base] + [r for r in runs if r is not base]
    evaluated: list[str] = []
    result: dict[str, Any] = {"baseline": base.name, "runs": [r.to_dict() for r in runs], "stats": job.stats.to_dict(),
                              "gate_config": job.gate.to_dict(),
                              "gate": {"better": "whole CI of PPL/PPL_base below 1 (of acc - acc_base above 0)",
                                       "worse": "whole CI of PPL/PPL_base above 1 + ppl_margin (of acc - acc_base "
                                                "below -acc_margin)",
                                       "no worse than baseline within CI": "neither"},
                              "ppl": {}, "tasks": {}}
    for data in job.ppl:
        result["ppl"][data] = _ppl_block(runs, base, data, job, argv, evaluated)
    for task in job.tasks:
        result["tasks"][task] = _task_block(runs, base, task, job)
    result["evaluated"] = evaluated
    result.update(run_info(argv))
    with AtomicDir(job.out, overwrite=True, what="--out", is_ours=_is_comparison, kind=_NOT_COMPARISON) as tmp:
        result["plots"] = _plots(result, runs, tmp) if job.plots else []
        result["report_md"] = markdown_report(result)
        record = CompareJson.from_dict(result, str(job.out / COMPARE_JSON))  # the result, checked against its schema
        write_json_atomic(tmp / COMPARE_JSON, record.to_dict())
        write_bytes_atomic(tmp / "report.md", result["report_md"].encode())
    result["out"] = str(job.out)
    return result


def any_worse(result: dict[str, Any]) -> bool:
    rows = [row for b in result["ppl"].values() for row in b["rows"]]
    rows += [row for b in result["tasks"].values() for m in b["metrics"].values() for row in m.values()]
    return any(row["verdict"] == GATE_WORSE for row in rows)


# ---------------------------------------------------------------- command line


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def cmd_compare(args: argparse.Namespace) -> int:
    ppl = _csv(args.ppl) if args.ppl is not None else (() if args.tasks else ("ptb",))
    job = CompareJob(runs=tuple(args.runs), out=Path(args.out), ppl=ppl, tasks=_csv(args.tasks),
                     baseline=args.baseline, split=args.split,
                     stats=StatsConfig(n_boot=args.n_boot, seed=args.seed, level=args.level),
                     gate=GateConfig(ppl_margin=args.ppl_margin, acc_margin=args.acc_margin),
                     evaluate_missing=not args.no_evaluate,
                     eval_defaults=EvalDefaults(seqlen=args.seqlen, max_tokens=args.max_tokens or None,
                                                batch_size=args.batch_size),
                     plots=not args.no_plots, progress=not args.quiet)
    result = run_compare(job, sys.argv[1:])
    print(result["report_md"])
    print(f"-> {job.out}/report.md, {job.out}/{COMPARE_JSON}" +
          "".join(f", {job.out}/{p}" for p in result["plots"]))
    return 1 if args.fail_on_worse and any_worse(result) else 0


def add_compare_parser(sub: Any) -> None:
    """Register ``moequant compare`` on the CLI's subparsers."""
    c = sub.add_parser("compare", help="compare runs against a baseline: PPL / accuracy with paired bootstrap CIs, "
                       "a gate verdict per run, report.md, compare.json and plots")
    c.add_argument("runs", nargs="+", help="run directories (checkpoints with report.json, or folders holding "
                   "ppl-<data>.json / ppl.json / tasks.json) or bare ppl.json / tasks JSON files")
    c.add_argument("--ppl", default=None, help="comma-separated corpora to compare on (default: ptb, or none when "
                   "--tasks is given); a checkpoint without RUN/ppl-<data>.json is scored and the JSON saved")
    c.add_argument("--tasks", default="", help="comma-separated zero-shot tasks read from RUN/tasks.json or RUN/tasks-*.json")
    c.add_argument("--baseline", help="the run every other is compared with (default: the first)")
    c.add_argument("--out", default="runs/compare", help="output directory (default runs/compare; replaced if it "
                   "holds an earlier comparison)")
    c.add_argument("--split", default="test", choices=["train", "valid", "test"])
    c.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates (default 2000)")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    c.add_argument("--level", type=float, default=0.95, help="CI level (default 0.95)")
    c.add_argument("--ppl-margin", type=float, default=0.0, help="gate tolerance: 'worse' only when the whole CI "
                   "of PPL/PPL_base lies above 1 + this (e.g. 0.01 = 1%%; default 0)")
    c.add_argument("--acc-margin", type=float, default=0.0, help="gate tolerance: 'worse' only when the whole CI "
                   "of acc - acc_base lies below minus this (e.g. 0.01 = 1 point; default 0)")
    c.add_argument("--no-evaluate", action="store_true", help="fail instead of scoring runs that lack a PPL JSON")
    c.add_argument("--seqlen", type=int, default=512, help="window length when no run has a PPL JSON to copy")
    c.add_argument("--max-tokens", type=int, default=16384,
                   help="tokens scored when no run has a PPL JSON to copy (default 16384; 0 = whole split)")
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    c.add_argument("--fail-on-worse", action="store_true", help="exit 1 when any verdict is 'worse' (a CI gate)")
    c.set_defaults(func=cmd_compare)
