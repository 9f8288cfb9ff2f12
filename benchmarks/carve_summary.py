"""The figures BENCHMARKS.md quotes for a carved MoE build, read from its ``training.json`` (issue #11): PPL of dense,
carved-before-distillation and final with the paired ratios, routing on the test split (and the layers where it
collapsed onto the same top-k experts), the per-expert Hessian spread, calibration starvation, and the build's work seconds over every process that took part.

    python benchmarks/carve_summary.py ~/.cache/moequant/models/qwen2.5-coder-0.5b-moe/training.json
    python benchmarks/carve_summary.py benchmarks/results/carve_smollm2-moe_v2.json --json out.json

Reads only: nothing is recomputed, so the printed figures are the build's own.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from moequant.zoo.carve.build import collapsed_layers, top_k_share
from moequant.zoo.carve.fit import final_error

STARVED_BELOW = 128  # routed calibration slots under which an expert counts as starved (the report's threshold)
RARE_SHARE = 0.01  # an expert with under 1% of a layer's routed test tokens


def _ppl_row(ev: dict[str, Any]) -> dict[str, Any]:
    return {"ppl": ev["ppl_moe"], "ratio": ev["ratio"], "ratio_ci95": ev["ratio_ci95"]}


def summarize(prov: dict[str, Any]) -> dict[str, Any]:
    """The summary of one build's provenance (``training.json``'s dict)."""
    layers = prov["layers"]
    spread = [float(v) for r in layers for v in r.get("hessian_spread", [])]
    finite = [v for v in spread if math.isfinite(v)]  # an expert without calibration tokens has no Hessian: NaN
    starved = [{"layer": r["layer"], "expert": e, "tokens": n}
               for r in layers for e, n in enumerate(r.get("tokens", [])) if n < STARVED_BELOW]
    errors = [final_error(r["errors"])[1] for r in layers if r.get("errors")]
    out: dict[str, Any] = {
        "source": prov.get("source"), "alias": prov.get("alias"), "arch": prov["spec"]["arch"],
        "experts": prov["spec"]["experts"], "top_k": prov["spec"]["top_k"],
        "shared_fraction": prov["spec"]["shared_fraction"], "active_fraction": prov["active_fraction"],
        "parameters": prov["parameters"], "layers": len(layers),
        "final_mlp_error": {"mean": statistics.fmean(errors), "min": min(errors), "max": max(errors)} if errors else None,
        "hessian_spread": ({"experts": len(spread), "without_tokens": len(spread) - len(finite),
                            "median": statistics.median(finite), "p10": float(np.percentile(finite, 10)),
                            "p90": float(np.percentile(finite, 90)), "max": max(finite)} if finite else None),
        "starved_experts": starved,
        "seconds": prov.get("seconds"), "job_runs": prov.get("job_runs"),
    }
    ev = prov.get("eval")
    if ev:
        routing = ev["routing"]
        out["eval"] = {
            "data": ev.get("data"), "split": ev.get("split"), "tokens": ev["tokens"], "windows": ev["n_windows"],
            "ppl_dense": ev["ppl_dense"],
            "before_recover": _ppl_row(ev["before_recover"]) if ev.get("before_recover") else None,
            "final": _ppl_row(ev),
            "balance_entropy": {"mean": statistics.fmean(r["balance_entropy"] for r in routing),
                                "min": min(r["balance_entropy"] for r in routing)},
            "router_entropy_mean": statistics.fmean(r["router_entropy_mean"] for r in routing),
            "router_entropy_uniform": math.log(prov["spec"]["experts"]),
            "layers_with_an_expert_under_1pct": sum(1 for r in routing if min(r["share"]) < RARE_SHARE),
            "collapsed_layers": collapsed_layers(routing, prov["spec"]["top_k"]),
            "top_k_share_mean": statistics.fmean(top_k_share(r["share"], prov["spec"]["top_k"]) for r in routing),
        }
    rec = prov.get("recover") or {}
    if rec.get("history"):
        h = rec["history"]
        step = max(1, len(h) // 10)
        out["distill"] = {"steps": len(h), "seconds": rec.get("seconds"),
                          "kl_means": [round(statistics.fmean(h[i:i + step]), 3) for i in range(0, len(h), step)]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("training_json", type=Path, help="a carved build's training.json (or its directory)")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    args = ap.parse_args(argv)
    path = args.training_json / "training.json" if args.training_json.is_dir() else args.training_json
    try:
        prov = json.loads(path.read_text())
        summary = summarize(prov)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"carve_summary: {path}: not a carved build's training.json ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
