"""Paired bootstrap CI of PPL_A / PPL_B from two ``ppl.json`` files scored on the same windows
(e.g. a checkpoint of one sweep against a checkpoint of another).

    python benchmarks/paired.py runs/bench/ldlq-smollm2-135m/int3-g64-clip_ldlq/ppl.json \\
        runs/bench/rtn-smollm2-135m/int3-g64-clip/ppl.json
"""

from __future__ import annotations

import argparse
import json
import sys

from moequant.eval.bootstrap import paired_delta_ci


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    args = p.parse_args()
    ra, rb = (json.load(open(f)) for f in (args.a, args.b))
    d = paired_delta_ci(rb["nll_per_window"], rb["tokens_per_window"], ra["nll_per_window"], ra["tokens_per_window"])
    out = {"a": args.a, "b": args.b, "ppl_a": ra["ppl"], "ppl_b": rb["ppl"], "ratio_a_over_b_ci95": list(d.ratio_ci),
           "verdict_a_vs_b": d.verdict, "n_windows": d.n_windows}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
