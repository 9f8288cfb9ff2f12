"""Zero-shot multiple-choice accuracy of smollm2-135m: fp (dequantized Q4_1 GGUF) vs RTN int4 vs int2,
on local BIG-bench tasks through lm-eval-harness, with bootstrap CIs and paired deltas vs fp.

    OMP_NUM_THREADS=1 python benchmarks/zero_shot.py --jobs 4

Steps (each a ``moequant`` command, recorded in the output):
1. ``moequant quantize smollm2-135m --method int --bits 4 --group-size 64 --out runs/zs/int4`` and
   ``--bits 2 --asym --group-size 64 --out runs/zs/int2`` (RTN with MSE clip search), skipped when present;
2. ``moequant eval tasks MODEL --tasks TASK --limit N --seed 0 --json runs/zs/eval/<model>/tasks-<task>.json``
   per model and task (``--jobs`` of them at once, one thread each); an existing JSON with the same
   task/limit/seed/batch size is reused (``moequant compare runs/zs/eval/fp runs/zs/eval/int2-g64-asym``
   reads these directories);
3. ``--repeat MODEL:TASK`` evaluates that pair a second time into
   ``runs/zs/eval/<model>.repeat/tasks-<task>.json`` and checks
   that every number (per-example log-likelihoods included) is identical;
4. paired deltas (model - fp) per task and metric; everything into
   ``benchmarks/results/zero_shot_smollm2-135m.json``, every model's per-example results (all tasks,
   ``eval tasks`` JSON shape) into ``benchmarks/results/zero_shot_smollm2-135m_<model>.json``, and a
   markdown table on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from moequant.eval.tasks_metrics import METRICS, task_acc_delta
from moequant.runinfo import run_info

MODEL = "smollm2-135m"
QUANT = {
    "int4-g64": ["--method", "int", "--bits", "4", "--group-size", "64"],
    "int2-g64-asym": ["--method", "int", "--bits", "2", "--asym", "--group-size", "64"],
}
DIRS = {"int4-g64": "int4", "int2-g64-asym": "int2"}


def _sh(cmd: list[str], log: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = open(log, "w") if log else subprocess.DEVNULL
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait(procs: list[tuple[subprocess.Popen, str]]) -> None:
    for p, what in procs:
        if p.wait() != 0:
            raise SystemExit(f"{what} failed (exit {p.returncode}); see its log under runs/")


def _eval_cmd(spec: str, tasks: str, limit: int | None, seed: int, batch: int, out: Path) -> list[str]:
    cmd = ["moequant", "-q", "eval", "tasks", spec, "--tasks", tasks, "--seed", str(seed), "--batch-size", str(batch),
           "--json", str(out)]
    return cmd + (["--limit", str(limit)] if limit else [])


def _reusable(path: Path, tasks: list[str], limit: int | None, seed: int, batch: int) -> bool:
    if not path.is_file():
        return False
    r = json.loads(path.read_text())
    return r["tasks"] == tasks and r["limit"] == limit and r["seed"] == seed and r["batch_size"] == batch


def _numbers(run: dict) -> dict:
    """Everything in a result that must be identical run to run (not times, not the command)."""
    return {t: {k: v for k, v in r.items()} for t, r in run["results"].items()}


def _limits(text: str) -> dict[str, int | None]:
    """"social_iqa=500,logical_deduction=300" -> {task: limit}; 0 = every example."""
    out = {}
    for part in text.split(","):
        task, _, n = part.strip().partition("=")
        out[task] = int(n) or None if n else None
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limits", default="social_iqa=500,logical_deduction=200,abstract_narrative_understanding=60",
                   help="task=N (first N examples; 0 = all), comma-separated; one evaluation per model and task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--jobs", type=int, default=4, help="evaluations run at once (one thread each)")
    p.add_argument("--repeat", default="int2-g64-asym:social_iqa",
                   help="MODEL:TASK evaluated twice to check reproducibility ('' = none)")
    p.add_argument("--runs", default="runs/zs")
    p.add_argument("--out", default=f"benchmarks/results/zero_shot_{MODEL}.json")
    args = p.parse_args()
    runs, limits = Path(args.runs), _limits(args.limits)
    tasks = list(limits)
    runs.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    procs, commands = [], {}
    for name, flags in QUANT.items():
        d = runs / DIRS[name]
        commands[f"quantize {name}"] = ["moequant", "-q", "quantize", MODEL, *flags, "--out", str(d)]
        if not (d / "report.json").is_file():
            procs.append((_sh(commands[f"quantize {name}"], runs / f"quantize-{name}.log"), f"quantize {name}"))
    _wait(procs)

    specs = {"fp": MODEL, **{n: str(runs / DIRS[n]) for n in QUANT}}
    jobs = [(f"{n}/{t}", s, t, runs / "eval" / n / f"tasks-{t}.json") for n, s in specs.items() for t in tasks]
    if args.repeat:
        rn, rt = args.repeat.split(":")
        jobs.append((f"{rn}/{rt}.repeat", specs[rn], rt, runs / "eval" / f"{rn}.repeat" / f"tasks-{rt}.json"))
    for key, s, t, out in jobs:
        commands[f"eval {key}"] = _eval_cmd(s, t, limits[t], args.seed, args.batch_size, out)
    pending = [j for j in jobs if not _reusable(j[3], [j[2]], limits[j[2]], args.seed, args.batch_size)]
    # longest first, so the parallel slots finish together
    cost = {"abstract_narrative_understanding": 434, "logical_deduction": 150, "social_iqa": 98}
    pending.sort(key=lambda j: -(cost.get(j[2], 300) * (limits[j[2]] or 1000)))
    running: list[tuple[subprocess.Popen, str]] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            key, _, _, out = pending.pop(0)
            out.parent.mkdir(parents=True, exist_ok=True)
            running.append((_sh(commands[f"eval {key}"], out.with_suffix(".log")), f"eval {key}"))
        time.sleep(5)
        done = [r for r in running if r[0].poll() is not None]
        _wait(done)
        running = [r for r in running if r not in done]

    results = {n: {t: json.loads((runs / "eval" / n / f"tasks-{t}.json").read_text()) for t in tasks} for n in specs}
    table = {n: {t: {k: results[n][t]["results"][t][k] for k in ("n", "acc", "acc_ci95", "acc_norm", "acc_norm_ci95",
                                                                   "chance")} for t in tasks} for n in specs}
    deltas = {n: {t: {m: task_acc_delta(results[n][t], results["fp"][t], t, metric=m, seed=args.seed).to_dict()
                      for m in METRICS} for t in tasks} for n in QUANT}
    repro = None
    if args.repeat:
        files = [runs / "eval" / d / f"tasks-{rt}.json" for d in (rn, f"{rn}.repeat")]
        first, again = (json.loads(f.read_text()) for f in files)
        same = _numbers(again) == _numbers(first)
        repro = {"model": rn, "task": rt, "identical": same, "files": [str(f) for f in files]}
        if not same:
            print(f"WARNING: {args.repeat} did not reproduce", file=sys.stderr)
    fp0 = results["fp"][tasks[0]]
    out = {"model": MODEL, "tasks": tasks, "limits": limits, "seed": args.seed, "batch_size": args.batch_size,
           "prompt": fp0["prompt"], "lm_eval_version": fp0["lm_eval_version"],
           "table": table, "paired_delta_vs_fp": deltas, "reproducibility": repro,
           "runs": {n: {t: {"json": str(runs / "eval" / n / f"tasks-{t}.json"),
                            "sha256": hashlib.sha256((runs / "eval" / n / f"tasks-{t}.json").read_bytes()).hexdigest(),
                            "seconds": r["seconds"], "command": r["command"], "data": r["results"][t]["data"]}
                        for t, r in results[n].items()} for n in specs},
           "bits_per_weight": {n: json.loads((runs / DIRS[n] / "report.json").read_text())["bits_per_weight"]
                               for n in QUANT},
           "commands": {k: " ".join(v) for k, v in commands.items()}, "seconds": round(time.time() - t0, 1),
           **run_info(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out + ".partial")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, args.out)
    # per model, every task with its per-example log-likelihoods, in the `eval tasks` JSON shape
    # (``moequant compare`` and ``task_acc_delta`` read these files as they are)
    for n in specs:
        merged = {k: v for k, v in results[n][tasks[0]].items() if k not in ("results", "command", "seconds")}
        merged.update(tasks=tasks, limit=limits, results={t: results[n][t]["results"][t] for t in tasks},
                      commands={t: results[n][t]["command"] for t in tasks},
                      seconds={t: results[n][t]["seconds"] for t in tasks})
        path = Path(args.out.removesuffix(".json") + f"_{n}.json")
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(merged, separators=(",", ":")))
        os.replace(tmp, path)

    print("\n| model | task | n | acc [95% CI] | acc_norm [95% CI] | Δacc vs fp [95% CI] | Δacc_norm vs fp [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for n in specs:
        for t in tasks:
            r = table[n][t]
            cells = [f"{r['acc']:.3f} [{r['acc_ci95'][0]:.3f}, {r['acc_ci95'][1]:.3f}]",
                     f"{r['acc_norm']:.3f} [{r['acc_norm_ci95'][0]:.3f}, {r['acc_norm_ci95'][1]:.3f}]"]
            for m in METRICS:
                if n == "fp":
                    cells.append("—")
                else:
                    d = deltas[n][t][m]
                    cells.append(f"{d['delta']:+.3f} [{d['delta_ci'][0]:+.3f}, {d['delta_ci'][1]:+.3f}]")
            print(f"| {n} | {t} | {r['n']} | " + " | ".join(cells) + " |")
    if repro:
        print(f"\nreproducibility ({args.repeat} run twice): {'identical' if repro['identical'] else 'DIFFERENT'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
