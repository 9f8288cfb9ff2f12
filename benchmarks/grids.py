"""Symmetric midtread vs asymmetric int grids at the default group size (128, partial last group), the
measurement behind the default grid (``alloc/defaults.py``): int4 RTN and int3 LDLQ + RHT on one model,
same PTB test windows, paired CIs sym / asym.

    python benchmarks/grids.py --model smollm2-135m --json benchmarks/results/grids_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from moequant.calib.data import CalibData
from moequant.codecs.config import UniformConfig
from moequant.solvers.config import SolverConfig
from moequant.sweep import SweepEntry, SweepJob
from sweep_json import run_to_json


def entries(group_size: int, calib_samples: int) -> tuple[SweepEntry, ...]:
    ldlq = SolverConfig(solver="ldlq", incoherence="rht")
    calib = CalibData(samples=calib_samples)
    out = []
    for sym in (True, False):
        out.append(SweepEntry(UniformConfig(bits=4, group_size=group_size, symmetric=sym), label=f"int4 {'sym' if sym else 'asym'} rtn"))
    for sym in (True, False):
        out.append(SweepEntry(UniformConfig(bits=3, group_size=group_size, symmetric=sym), ldlq, calib,
                              label=f"int3 {'sym' if sym else 'asym'} ldlq+rht"))
    return tuple(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=0, help="0 = the whole PTB test split")
    p.add_argument("--work", default="runs/bench", help="where the checkpoints go")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    job = SweepJob(model=args.model, entries=entries(args.group_size, args.calib_samples),
                   out=Path(args.work) / f"grids-{args.model}", max_tokens=args.max_tokens or None, overwrite=True,
                   progress=False, pairs=(("int4 sym rtn", "int4 asym rtn"), ("int3 sym ldlq+rht", "int3 asym ldlq+rht")))
    return run_to_json(job, "benchmarks/grids.py", args.json)


if __name__ == "__main__":
    sys.exit(main())
