"""``moequant finetune RUN --method pv|kd|bcjr|ste --steps N``: arguments into a ``FinetuneJob``, a one-screen
summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from moequant.errors import MoequantError

def parse_layers(spec: str) -> tuple[int, ...]:
    """``"0"``, ``"0,1"``, ``"0-3"``, ``"0,2-3"`` -> sorted distinct decoder layer indices; ``ValueError`` naming
    ``--layers`` otherwise (the range is checked against the model later)."""
    out: set[int] = set()
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ValueError(f"--layers {spec!r} is not a list of layer indices and ranges (e.g. 0 or 0,2-3)") from None
        if a < 0 or b < a:
            raise ValueError(f"--layers {spec!r}: {part.strip()!r} is not an index >= 0 or a range lo-hi with lo <= hi")
        out.update(range(a, b + 1))
    return tuple(sorted(out))


def add_finetune_parser(subparsers: Any) -> argparse.ArgumentParser:
    from moequant.finetune.trainable import FINETUNE_METHODS

    f = subparsers.add_parser("finetune", help="fine-tune a quantized run towards the model it was quantized from "
                              "(PV-tuning, distillation, BCJR-QAT, STE): a packed checkpoint out")
    f.add_argument("run", help="a moequant run directory (moequant quantize --out)")
    f.add_argument("--method", required=True, choices=list(FINETUNE_METHODS),
                   help=" ".join(f"{m}: {about}." for m, about in FINETUNE_METHODS.items()))
    f.add_argument("--steps", type=int, required=True, help="optimisation steps")
    f.add_argument("--layers", default=None, help="train only the packed tensors and norms of these decoder layers "
                   "(e.g. 0, 0,1 or 0-3; default: all, the final norm included)")
    f.add_argument("--loss", dest="objective", choices=["kl", "layer"], default="kl",
                   help="what each step minimises: kl, the token-mean KL to the unquantized model's next-token "
                   "distribution (end to end; default), or layer, each trained decoder layer's squared error "
                   "(relative to the output's) against its unquantized self on the unquantized model's input")
    f.add_argument("--lr", type=float, default=1e-3, help="Adam step size, relative to each parameter's RMS "
                   "(default 1e-3)")
    f.add_argument("--tau", default=None, help="bcjr: temperature START:END, annealed by a cosine over the steps "
                   "(default 0.3:0.05)")
    f.add_argument("--soft-bits", type=int, default=None, help="bcjr: state bits of the soft pass (default 8; "
                   "4 is ~10x faster and fits less well; >= the run's L: the full trellis)")
    f.add_argument("--ste-every", type=int, default=None,
                   help="ste: recompute the latent weight's Viterbi codes every N-th step (default 8)")
    f.add_argument("--code-lr", type=float, default=None,
                   help="pv: RMS of the V-step's straight-through step, relative to each weight's RMS (default 3e-3, "
                   "AQLM's)")
    f.add_argument("--max-change", type=float, default=None,
                   help="pv: largest fraction of a tensor's codes one V-step may change (default 0.01)")
    f.add_argument("--v-every", type=int, default=None, help="pv: a V-step after every N-th step (default 1)")
    f.add_argument("--batch", type=int, default=4, help="training windows per step (default 4)")
    f.add_argument("--no-norms", action="store_true", help="keep the norm weights fixed")
    f.add_argument("--seed", type=int, default=0, help="seed of the window order (default 0)")
    f.add_argument("--eval-windows", type=int, default=8,
                   help="training windows the KL before/after is measured on (default 8)")
    f.add_argument("--data", "--calib", dest="data", default=None,
                   help="training text: corpus alias (ptb, ...) or text file (default: the run's calibration text, "
                   "PTB train unless the run was calibrated on another)")
    f.add_argument("--data-samples", "--calib-samples", dest="data_samples", type=int, default=None,
                   help="windows of --data (default 128)")
    f.add_argument("--data-seqlen", "--calib-seqlen", dest="data_seqlen", type=int, default=None,
                   help="tokens per window of --data (default 512)")
    f.add_argument("--data-seed", "--calib-seed", dest="data_seed", type=int, default=0,
                   help="seed of the window positions in --data (default 0)")
    f.add_argument("--out", default=None, help="output checkpoint (default: RUN-<method>)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing moequant output at --out")
    f.add_argument("--save-every", type=int, default=50, help="save the training state every N steps (default 50)")
    f.add_argument("--save-minutes", type=float, default=10.0,
                   help="also save it after a step that ends M minutes or more after the last save (default 10; "
                   "0: after every step)")
    f.add_argument("--resume", action="store_true", help="continue an interrupted finetune to --out")
    f.set_defaults(func=cmd_finetune)
    return f


def cmd_finetune(args: argparse.Namespace) -> int:
    from moequant.calib.data import CalibData
    from moequant.finetune.loop import FinetuneJob, FinetuneSettings, run_finetune
    from moequant.finetune.schedule import parse_tau

    try:
        settings = FinetuneSettings(
            steps=args.steps, method=args.method, lr=args.lr, code_lr=args.code_lr, max_change=args.max_change,
            v_every=args.v_every, tau=None if args.tau is None else parse_tau(args.tau), soft_bits=args.soft_bits,
            ste_every=args.ste_every,
            layers=None if args.layers is None else parse_layers(args.layers), objective=args.objective,
            batch=args.batch,
            train_norms=not args.no_norms, seed=args.seed, save_every=args.save_every, eval_windows=args.eval_windows)
        calib = None
        if args.data is not None:
            calib = CalibData(data=args.data, split="train", samples=args.data_samples or 128,
                              seqlen=args.data_seqlen or 512, seed=args.data_seed)
        elif args.data_samples is not None or args.data_seqlen is not None:
            raise ValueError("--data-samples/--data-seqlen need --data (without it the run's windows are used)")
    except ValueError as e:
        raise MoequantError(str(e)) from None
    run = Path(args.run)
    if not run.is_dir():
        raise MoequantError(f"{run}: no such run directory")
    out = Path(args.out) if args.out else run.parent / f"{run.name}-{args.method}"
    try:
        job = FinetuneJob(run=run, out=out, settings=settings, calib=calib, overwrite=args.overwrite,
                          resume=args.resume, progress=not args.quiet, save_minutes=args.save_minutes)
    except ValueError as e:
        raise MoequantError(str(e)) from None
    ft = run_finetune(job, sys.argv[1:])["finetune"]
    extra = ""
    if "changed_fraction" in ft:
        changed = ft["changed_fraction"]
        extra = f", codes changed per V-step {min(changed, default=0):.1e}-{max(changed, default=0):.1e}"
    if "tau_schedule" in ft:
        extra = f", tau {ft['tau_schedule']['start']:g} -> {ft['tau_schedule']['end']:g} (cosine)"
    layers = "all layers" if ft["layers"] is None else "layers " + ",".join(map(str, ft["layers"]))
    layers += ", layer-wise loss" if ft["objective"] == "layer" else ""
    print(f"{out}: {ft['method']} on {layers}, {ft['steps']} steps, {ft['tokens_seen']:,} tokens, KL "
          f"{ft['loss_before']:.5f} -> {ft['loss_after']:.5f}{extra}, {ft['seconds']:.1f} s")
    return 0
