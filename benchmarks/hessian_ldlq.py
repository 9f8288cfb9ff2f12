"""Issue #3 tables: RTN vs LDLQ vs LDLQ+RHT, and the per-expert Hessian ablation.

    # dense: int3 and int2 (group 64), RTN (clip search) / LDLQ / LDLQ+RHT, PTB test
    python benchmarks/hessian_ldlq.py solvers --model smollm2-135m --json benchmarks/results/solvers_smollm2-135m.json
    # the same without the RTN rows (take those from foundation_rtn.py; pair them with pairs.py)
    python benchmarks/hessian_ldlq.py ldlq --model smollm2-135m --json benchmarks/results/ldlq_smollm2-135m.json
    # MoE: LDLQ+RHT at int3 / int2 with per-expert, layer-mean and layer-token-weighted expert Hessians
    python benchmarks/hessian_ldlq.py ablation --model tiny-olmoe --json benchmarks/results/ablation_tiny-olmoe.json
    # issue #4: 2-bit trellis (LDLQ+RHT) vs int2 LDLQ+RHT vs int2 RTN; on MoE also trellis with layer-mean H
    python benchmarks/hessian_ldlq.py trellis --model tiny-olmoe --trellis-l 16 --layer-mean --json benchmarks/results/trellis_tiny-olmoe.json
    # dense: the trellis row alone, paired with the `solvers` sweep's int2 rows by benchmarks/pairs.py
    python benchmarks/hessian_ldlq.py trellis --model smollm2-135m --trellis-l 12 --trellis-only --max-tokens 32768 --json ...

Calibration: PTB train, 128 windows of 512 tokens, seed 0 (never the evaluation text). Every method is
scored on the same PTB test windows; the pair table gives paired bootstrap CIs of PPL ratios.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from moequant.calib.data import CalibData
from moequant.codecs.config import TrellisConfig, UniformConfig
from moequant.layerwise import HessianConfig
from moequant.solvers.config import SolverConfig
from moequant.sweep import SweepEntry, SweepJob
from sweep_json import run_to_json

RTN = SolverConfig()
LDLQ = SolverConfig(solver="ldlq")
LDLQ_RHT = SolverConfig(solver="ldlq", incoherence="rht")


def _int(bits: int, group: int) -> UniformConfig:
    return UniformConfig(bits=bits, group_size=group, symmetric=bits > 2, clip_search=True)


def solvers_plan(group: int, calib: CalibData, bits_list: tuple[int, ...] = (3, 2)
                 ) -> tuple[tuple[SweepEntry, ...], tuple[tuple[str, str], ...]]:
    entries, pairs = [], []
    for bits in bits_list:
        cfg = _int(bits, group)
        rtn = SweepEntry(cfg, RTN, label=f"{cfg.short_name} rtn")
        ldlq = SweepEntry(cfg, LDLQ, calib, label=f"{cfg.short_name} ldlq")
        rht = SweepEntry(cfg, LDLQ_RHT, calib, label=f"{cfg.short_name} ldlq+rht")
        entries += [rtn, ldlq, rht]
        pairs += [(ldlq.name, rtn.name), (rht.name, rtn.name), (rht.name, ldlq.name)]
    return tuple(entries), tuple(pairs)


def ldlq_plan(group: int, calib: CalibData) -> tuple[tuple[SweepEntry, ...], tuple[tuple[str, str], ...]]:
    """LDLQ and LDLQ+RHT only (RTN rows come from foundation_rtn.py on the same windows; compare them
    with benchmarks/pairs.py)."""
    entries = []
    for solver, tag in ((LDLQ, "ldlq"), (LDLQ_RHT, "ldlq+rht")):
        for bits in (3, 2):
            cfg = _int(bits, group)
            entries.append(SweepEntry(cfg, solver, calib, label=f"{cfg.short_name} {tag}"))
    pairs = tuple((f"{_int(b, group).short_name} ldlq+rht", f"{_int(b, group).short_name} ldlq") for b in (3, 2))
    return tuple(entries), pairs


def ablation_plan(group: int, calib: CalibData) -> tuple[tuple[SweepEntry, ...], tuple[tuple[str, str], ...]]:
    entries, pairs = [], []
    for bits in (3, 2):
        cfg = _int(bits, group)
        rows = {mode: SweepEntry(cfg, LDLQ_RHT, calib, HessianConfig(mode=mode), label=f"{cfg.short_name} H={mode}")
                for mode in ("per-expert", "layer-mean", "layer-token-weighted")}
        entries += [SweepEntry(cfg, RTN, label=f"{cfg.short_name} rtn"), *rows.values()]
        pairs += [(rows["per-expert"].name, rows["layer-mean"].name),
                  (rows["per-expert"].name, rows["layer-token-weighted"].name),
                  (rows["per-expert"].name, f"{cfg.short_name} rtn")]
    return tuple(entries), tuple(pairs)


def trellis_plan(group: int, calib: CalibData, L: int = 16, moe: bool = False,
                 baselines: bool = True) -> tuple[tuple[SweepEntry, ...], tuple[tuple[str, str], ...]]:
    """2-bit trellis (HYB, V=2, tail-biting) vs int2 (asym, group ``group``), both LDLQ+RHT, and int2
    RTN; with ``moe`` also the trellis with layer-mean expert Hessians (the ablation repeated)."""
    cfg2 = _int(2, group)
    tr = TrellisConfig(bits=2, L=L)
    rtn = SweepEntry(cfg2, RTN, label=f"{cfg2.short_name} rtn")
    i2 = SweepEntry(cfg2, LDLQ_RHT, calib, label=f"{cfg2.short_name} ldlq+rht")
    t2 = SweepEntry(tr, LDLQ_RHT, calib, label=f"{tr.short_name} ldlq+rht")
    entries, pairs = [rtn, i2, t2], [(t2.name, i2.name), (t2.name, rtn.name), (i2.name, rtn.name)]
    if not baselines:  # the int2 rows come from another sweep on the same windows (pair with pairs.py)
        entries, pairs = [t2], []
    if moe:
        lm = SweepEntry(tr, LDLQ_RHT, calib, HessianConfig(mode="layer-mean"), label=f"{tr.short_name} H=layer-mean")
        entries.append(lm)
        pairs.append((t2.name, lm.name))
    return tuple(entries), tuple(pairs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", choices=["solvers", "ldlq", "ablation", "trellis"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=0, help="0 = the whole PTB test split")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 2], help="solvers plan: bit widths (default 3 2)")
    p.add_argument("--trellis-l", type=int, default=16, help="trellis plan: state bits L")
    p.add_argument("--trellis-only", action="store_true",
                   help="trellis plan: only the trellis rows (int2 rows from another sweep on the same windows)")
    p.add_argument("--layer-mean", action="store_true",
                   help="trellis plan, MoE models: add the trellis with layer-mean expert Hessians")
    p.add_argument("--work", default="runs/bench")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    calib = CalibData("ptb", "train", args.calib_samples, args.calib_seqlen, seed=0)
    if args.plan == "trellis":
        entries, pairs = trellis_plan(args.group_size, calib, args.trellis_l, moe=args.layer_mean,
                                      baselines=not args.trellis_only)
    elif args.plan == "solvers":
        entries, pairs = solvers_plan(args.group_size, calib, tuple(args.bits))
    else:
        plan = {"ldlq": ldlq_plan, "ablation": ablation_plan}[args.plan]
        entries, pairs = plan(args.group_size, calib)
    job = SweepJob(model=args.model, entries=entries, out=Path(args.work) / f"{args.plan}-{args.model}",
                   max_tokens=args.max_tokens or None, overwrite=True, progress=False, pairs=pairs)
    return run_to_json(job, "benchmarks/hessian_ldlq.py", args.json)


if __name__ == "__main__":
    sys.exit(main())
