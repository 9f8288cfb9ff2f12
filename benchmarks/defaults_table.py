"""Issue #9's defaults table: what a new user gets from ``moequant quantize MODEL --bits B`` with no other
flag, on every zoo model, scored on PTB test next to the unquantized model (same windows, paired CI).

Runs the real command line in subprocesses (exactly the user path), one heavy job at a time:

    python benchmarks/defaults_table.py --models smollm2-135m tiny-olmoe qwen2.5-coder-0.5b --bits 4 3 \
        --json benchmarks/results/defaults_table.json

``--max-tokens`` limits the scored PTB test tokens for a model (``MODEL=N``; default the whole split).
The JSON keeps every command, its wall time, the quantize report's bits/weight and recipe, and both
runs' per-window NLLs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from _cli_runs import eval_ppl, paired, quantize, write_json

log = logging.getLogger("defaults_table")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "tiny-olmoe", "qwen2.5-coder-0.5b",
                                                     "qwen2.5-coder-1.5b"])
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    p.add_argument("--max-tokens", nargs="*", default=[], help="MODEL=N: score only the first N PTB test tokens")
    p.add_argument("--work", default="runs/defaults", help="checkpoints and per-run JSON go here")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    limits = {k: int(v) for k, v in (s.split("=", 1) for s in args.max_tokens)}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.json)
    rows = json.loads(out_json.read_text())["rows"] if out_json.is_file() else []
    done = {(r["model"], r["bits"]) for r in rows}
    for model in args.models:
        mt = limits.get(model)
        todo = [b for b in args.bits if (model, b) not in done]
        # Quantize first: a killed quantize resumes from its last layer (``_cli_runs.quantize``), an eval restarts.
        made = {b: quantize(model, ["--bits", str(b)], work / f"{model}-b{b}") for b in todo}
        if todo:
            base, base_cmd, base_secs = eval_ppl(model, work / f"{model}-fp-ppl.json", mt)
        for bits in todo:
            run_dir = work / f"{model}-b{bits}"
            qcmd, qsecs = made[bits]
            res, ecmd, esecs = eval_ppl(str(run_dir), work / f"{model}-b{bits}-ppl.json", mt)
            rep = json.loads((run_dir / "report.json").read_text())
            d = paired(base, res)
            rows.append({"model": model, "bits": bits, "quantize_command": " ".join(qcmd),
                         "eval_command": " ".join(ecmd), "fp_eval_command": " ".join(base_cmd),
                         "recipe": rep["config"]["rules"][-1]["config"], "solver": rep["solver"],
                         "calibration": rep["calibration"], "bits_per_weight": rep["bits_per_weight"],
                         "bits_per_weight_model": rep["bits_per_weight_model"], "tokens": res["tokens"],
                         "n_windows": res["n_windows"], "ppl_fp": base["ppl"], "ppl": res["ppl"],
                         "ratio": res["ppl"] / base["ppl"], "ratio_ci95": list(d.ratio_ci),
                         "seconds_quantize": qsecs, "seconds_eval": esecs, "seconds_eval_fp": base_secs,
                         # the layer loop over every run that made the checkpoint (--resume across sessions)
                         "quantize_layer_seconds": rep.get("layer_seconds"),
                         "seconds_eval_all_runs": res.get("seconds_all_runs"),  # only when resumed
                         "seconds_eval_fp_all_runs": base.get("seconds_all_runs"),
                         "nll_per_window": res["nll_per_window"], "fp_nll_per_window": base["nll_per_window"]})
            write_json(out_json, {"rows": rows}, "benchmarks/defaults_table.py")
            log.info("%s --bits %d: %.3f b/w, PPL %.2f vs %.2f (x%.3f)", model, bits, rows[-1]["bits_per_weight"],
                     res["ppl"], base["ppl"], rows[-1]["ratio"])
    print("| model | --bits | recipe (no other flag) | bits/weight | PTB tokens | PPL fp | PPL | ratio [95% CI] |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["ratio_ci95"]
        print(f"| {r['model']} | {r['bits']} | {r['recipe']['bits']}-bit {'sym' if r['recipe']['symmetric'] else 'asym'} "
              f"g{r['recipe']['group_size']}, {r['solver']['solver']}{'+rht' if r['solver']['incoherence'] == 'rht' else ''} "
              f"| {r['bits_per_weight']:.3f} | {r['tokens']} | {r['ppl_fp']:.2f} | {r['ppl']:.2f} | "
              f"{r['ratio']:.3f} [{lo:.3f}, {hi:.3f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
