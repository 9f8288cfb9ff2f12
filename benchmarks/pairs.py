"""Paired bootstrap CIs for several pairs of ``ppl.json`` files at once (rows of different sweeps on the
same windows), written to one JSON together with each file's PPL, CI, bits/weight and per-window NLLs.

    python benchmarks/pairs.py --json benchmarks/results/trellis_tiny-olmoe_pairs.json \\
        runs/bench3/trellis-tiny-olmoe/trellis2-hyb-L12_ldlq+rht runs/bench/trellis-tiny-olmoe/int2a-g64-clip_ldlq+rht \\
        ...

Arguments are run directories (holding ``ppl.json`` and, for checkpoints, ``report.json``) taken two by
two: A1 B1 A2 B2 ...; each pair gives the CI of PPL_A / PPL_B.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moequant.eval.bootstrap import paired_delta_ci
from moequant.runinfo import run_info


def _run(d: Path) -> dict:
    ppl = json.loads((d / "ppl.json").read_text())
    rep = d / "report.json"
    bits = json.loads(rep.read_text()).get("bits_per_weight") if rep.is_file() else None
    return {"dir": str(d), "ppl": ppl["ppl"], "ci95": ppl["ci95"], "tokens": ppl["tokens"], "n_windows": ppl["n_windows"],
            "bits_per_weight": bits, "nll_per_window": ppl["nll_per_window"], "tokens_per_window": ppl["tokens_per_window"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    if len(args.runs) % 2:
        p.error("give run directories in pairs: A1 B1 A2 B2 ...")
    runs = {r: _run(Path(r)) for r in args.runs}
    pairs = []
    for a, b in zip(args.runs[::2], args.runs[1::2]):
        ra, rb = runs[a], runs[b]
        if ra["tokens_per_window"] != rb["tokens_per_window"]:
            p.error(f"{a} and {b} were not scored on the same windows")
        d = paired_delta_ci(rb["nll_per_window"], rb["tokens_per_window"], ra["nll_per_window"], ra["tokens_per_window"])
        pairs.append({"a": a, "b": b, "ppl_a": ra["ppl"], "ppl_b": rb["ppl"], "ratio_a_over_b_ci95": list(d.ratio_ci),
                      "verdict_a_vs_b": d.verdict})
        print(f"{Path(a).name} vs {Path(b).name}: {ra['ppl']:.3f} / {rb['ppl']:.3f}  "
              f"[{d.ratio_ci[0]:.4f}, {d.ratio_ci[1]:.4f}]  {d.verdict}")
    out = {"runs": list(runs.values()), "pairs": pairs, **run_info(["benchmarks/pairs.py", *sys.argv[1:]])}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
