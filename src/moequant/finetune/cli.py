"""``moequant finetune RUN --method pv --steps N``: arguments into a ``PVJob``, a one-screen summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from moequant.errors import MoequantError


def add_finetune_parser(subparsers: Any) -> argparse.ArgumentParser:
    f = subparsers.add_parser("finetune", help="PV-tuning of an additive run towards the model it was quantized "
                              "from: a packed checkpoint out")
    f.add_argument("run", help="a moequant run directory quantized with --method additive")
    f.add_argument("--method", default="pv", choices=["pv"], help="pv: PV-tuning (P-steps on codebooks, scales "
                   "and norms; V-steps on the codes)")
    f.add_argument("--steps", type=int, required=True, help="optimisation steps")
    f.add_argument("--lr", type=float, default=1e-3,
                   help="P-step size, relative to each parameter's RMS (default 1e-3)")
    f.add_argument("--code-lr", type=float, default=1e-3,
                   help="straight-through step of the V-step, relative to each weight's RMS (default 1e-3)")
    f.add_argument("--max-change", type=float, default=0.01,
                   help="largest fraction of a tensor's codes one V-step may change (default 0.01)")
    f.add_argument("--v-every", type=int, default=1, help="a V-step after every N-th P-step (default 1)")
    f.add_argument("--batch", type=int, default=4, help="calibration windows per step (default 4)")
    f.add_argument("--no-norms", action="store_true", help="keep the norm weights fixed")
    f.add_argument("--seed", type=int, default=0, help="seed of the window order (default 0)")
    f.add_argument("--eval-windows", type=int, default=8,
                   help="calibration windows the KL before/after is measured on (default 8)")
    f.add_argument("--calib", default=None, help="training text: corpus alias or text file (default: the run's)")
    f.add_argument("--calib-samples", type=int, default=None, help="windows (default: the run's)")
    f.add_argument("--calib-seqlen", type=int, default=None, help="tokens per window (default: the run's)")
    f.add_argument("--calib-seed", type=int, default=0, help="seed of the window positions with --calib (default 0)")
    f.add_argument("--out", default=None, help="output checkpoint (default: RUN-pv)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing moequant output at --out")
    f.add_argument("--save-every", type=int, default=50, help="save the training state every N steps (default 50)")
    f.add_argument("--resume", action="store_true", help="continue an interrupted finetune to --out")
    f.set_defaults(func=cmd_finetune)
    return f


def cmd_finetune(args: argparse.Namespace) -> int:
    from moequant.calib.data import CalibData
    from moequant.finetune.loop import PVJob, PVSettings, run_pv

    try:
        settings = PVSettings(steps=args.steps, lr=args.lr, code_lr=args.code_lr, max_change=args.max_change,
                              v_every=args.v_every, batch=args.batch, train_norms=not args.no_norms, seed=args.seed,
                              save_every=args.save_every, eval_windows=args.eval_windows)
        calib = None
        if args.calib is not None:
            calib = CalibData(data=args.calib, split="train", samples=args.calib_samples or 128,
                              seqlen=args.calib_seqlen or 512, seed=args.calib_seed)
        elif args.calib_samples is not None or args.calib_seqlen is not None:
            raise ValueError("--calib-samples/--calib-seqlen need --calib (without it the run's windows are used)")
    except ValueError as e:
        raise MoequantError(str(e)) from None
    run = Path(args.run)
    if not run.is_dir():
        raise MoequantError(f"{run}: no such run directory")
    out = Path(args.out) if args.out else run.parent / f"{run.name}-pv"
    job = PVJob(run=run, out=out, settings=settings, calib=calib, overwrite=args.overwrite, resume=args.resume,
                progress=not args.quiet)
    res = run_pv(job, sys.argv[1:])
    ft = res["finetune"]
    changed = ft["changed_fraction"]
    print(f"{out}: {ft['steps']} steps, KL {ft['loss_before']:.5f} -> {ft['loss_after']:.5f}, codes changed per "
          f"V-step {min(changed, default=0):.4f}-{max(changed, default=0):.4f}, {ft['seconds']:.1f} s")
    return 0
