"""Issue #2 table: int4 / int3 / int2 round-to-nearest, with and without MSE clip search, on one model:
counted bits/weight, checkpoint bytes, resident bytes vs ideal, PPL on PTB test with a 95% bootstrap CI
and the paired CI of the ratio to the unquantized model (same windows).

    python benchmarks/foundation_rtn.py --model smollm2-135m --json benchmarks/results/foundation_smollm2-135m.json

Group size 64 by default: SmolLM2's widths (576, 1536) are not multiples of 128.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from moequant.codecs.config import UniformConfig
from moequant.sweep import SweepEntry, SweepJob
from sweep_json import run_to_json


def entries(group_size: int) -> tuple[SweepEntry, ...]:
    out = []
    for bits, sym in ((4, True), (3, True), (2, False)):
        for clip in (False, True):
            out.append(SweepEntry(UniformConfig(bits=bits, group_size=group_size, symmetric=sym, clip_search=clip)))
    return tuple(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=0, help="0 = the whole PTB test split")
    p.add_argument("--work", default="runs/bench", help="where the checkpoints go")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    job = SweepJob(model=args.model, entries=entries(args.group_size), out=Path(args.work) / f"rtn-{args.model}",
                   max_tokens=args.max_tokens or None, overwrite=True, progress=False)
    return run_to_json(job, "benchmarks/foundation_rtn.py", args.json)


if __name__ == "__main__":
    sys.exit(main())
