"""Coverage of moequant's bootstrap CIs at 4,000 simulated data sets per case (the slow variant of
tests/eval/test_bootstrap_coverage.py, same simulations and seeds), written as JSON.

    OMP_NUM_THREADS=1 python benchmarks/bootstrap_coverage.py --json benchmarks/results/bootstrap_coverage.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "eval"))

import test_bootstrap_coverage as cov  # noqa: E402

from moequant.runinfo import run_info  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", type=int, default=4000)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    lo, hi = cov.binomial_acceptance(args.datasets)
    rows = {}
    t0 = time.time()
    for name, sim in cov.SIMULATIONS.items():
        hits = cov.coverage_hits(sim, r=args.datasets)
        rows[name] = {"doc": (sim.__doc__ or "").strip(), "hits": hits, "coverage": hits / args.datasets,
                      "accepted": lo <= hits <= hi}
        print(f"{name:16s} {hits / args.datasets:.4f} {'ok' if lo <= hits <= hi else 'OUTSIDE'}", flush=True)
    out = {"datasets": args.datasets, "n_boot": cov.N_BOOT, "level": cov.LEVEL,
           "acceptance": {"hits": [lo, hi], "coverage": [lo / args.datasets, hi / args.datasets],
                          "rule": "central 99.9% of Binomial(datasets, 0.95), exact"},
           "cases": rows, "seconds": round(time.time() - t0, 1),
           **run_info(["benchmarks/bootstrap_coverage.py", *sys.argv[1:]])}
    out["command"] = "python benchmarks/bootstrap_coverage.py " + " ".join(sys.argv[1:])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
