"""Argument parsing and printing for ``moequant eval tasks`` (the work is in ``moequant.eval.tasks``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_tasks_parser(esub) -> None:
    """Register ``eval tasks`` on the ``eval`` subparsers."""
    t = esub.add_parser("tasks", help="zero-shot multiple-choice accuracy through lm-eval-harness")
    t.add_argument("model", help="checkpoint directory, zoo alias, HF directory, .gguf or hub id")
    t.add_argument("--tasks", required=True,
                   help="comma-separated: local BIG-bench tasks (social_iqa, logical_deduction, "
                   "abstract_narrative_understanding, timedial, ...), a .jsonl file of input/choices/answer "
                   "records, or lm-eval task names (hellaswag, arc_easy, ...: need the Hugging Face hub)")
    t.add_argument("--limit", type=int, default=None, help="first N examples of each task (file order)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--max-length", type=int, default=None, help="longest input in tokens (default: the model's)")
    t.add_argument("--seed", type=int, default=0, help="lm-eval seeds and bootstrap seed (default 0)")
    t.add_argument("--json", help="write the full result (per-example log-likelihoods included) to this file")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted run to the same --json from its answered requests (same numbers)")
    t.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of a moequant checkpoint's tensors (faster load; see README)")
    t.set_defaults(func=cmd_eval_tasks)


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    from moequant.eval.tasks import TasksJob, finish_tasks_progress, parse_task_list, run_tasks_job
    from moequant.fsutil import atomic_write_json, check_json_output

    if args.json:
        check_json_output(args.json)  # before any work
    job = TasksJob(args.model, parse_task_list(args.tasks), limit=args.limit, batch_size=args.batch_size,
                   max_length=args.max_length, seed=args.seed, verify=not args.no_verify)
    r = run_tasks_job(job, sys.argv[1:], out_json=Path(args.json) if args.json else None, resume=args.resume)
    if args.json:
        atomic_write_json(Path(args.json), r)
        finish_tasks_progress(Path(args.json))
    for name, t in r["results"].items():
        parts = [f"{m} {t[m]:.4f} [95% CI {t[m + '_ci95'][0]:.4f}, {t[m + '_ci95'][1]:.4f}]"
                 for m in ("acc", "acc_norm") if m in t and m + "_ci95" in t]
        if not parts:
            parts = [f"{k} {v:.4f}" for k, v in t.get("lm_eval", {}).items() if isinstance(v, (int, float))]
        chance = f" (chance {t['chance']:.3f})" if "chance" in t else ""
        print(f"{args.model} {name}: " + "  ".join(parts) + f"  n={t['n']}{chance}")
    return 0
