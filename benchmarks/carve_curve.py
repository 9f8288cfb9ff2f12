"""Issue #11's trade-off curve: perplexity of a carved MoE against the fraction of the dense MLP a token
uses, for one source model, by running the real ``moequant zoo build moe`` once per setting.

    python benchmarks/carve_curve.py --from smollm2-135m --settings 8:1:0.25 8:2:0.25 8:4:0.25 \
        --eval-tokens 16384 --json benchmarks/results/carve_curve_smollm2-135m.json

A setting is ``EXPERTS:TOP_K:SHARED_FRACTION`` (Qwen2-MoE, no recovery distillation unless
``--recover-steps``). Each build's ``training.json`` is kept under ``--work``; reruns reuse finished builds and
continue an interrupted one (``zoo build --resume``: from its last carved layer or scored batch), and every build
after the first reuses the first one's dense per-window losses (``--dense-eval-from``: the dense model is scored once).
The JSON keeps, per setting, the command, active fraction, dense / MoE perplexity with the paired CI,
per-layer MLP errors and build time.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from moequant.runinfo import run_info
from moequant.zoo.carve.fit import final_error

log = logging.getLogger("carve_curve")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True)
    p.add_argument("--arch", default="qwen2_moe")
    p.add_argument("--settings", nargs="+", required=True, help="EXPERTS:TOP_K:SHARED_FRACTION")
    p.add_argument("--recover-steps", type=int, default=0)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--eval-tokens", type=int, default=None)
    p.add_argument("--work", default="runs/carve")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    dense_from = None  # the first finished build: later builds reuse its dense per-window losses (same windows)
    for setting in args.settings:
        e, k, f = setting.split(":")
        out = Path(args.work) / f"{Path(args.source).name}-{args.arch}-e{e}k{k}s{f}-r{args.recover_steps}"
        cmd = [sys.executable, "-m", "moequant.cli", "zoo", "build", "moe", "--from", args.source, "--arch", args.arch,
               "--experts", e, "--top-k", k, "--shared-fraction", f, "--calib-samples", str(args.calib_samples),
               "--recover-steps", str(args.recover_steps), "--out", str(out)]
        if args.eval_tokens:
            cmd += ["--eval-tokens", str(args.eval_tokens)]
        if dense_from is not None:
            cmd += ["--dense-eval-from", str(dense_from)]
        if not (out / "training.json").is_file():
            log.info("$ %s", " ".join(cmd))
            t0 = time.time()
            subprocess.run(cmd + ["--resume"], check=True)  # --resume: an interrupted build's progress, if any
            log.info("%.0f s", time.time() - t0)
        prov = json.loads((out / "training.json").read_text())
        ev = prov["eval"]
        dense_from = dense_from or out
        rows.append({"setting": setting, "command": " ".join(cmd), "active_fraction": prov["active_fraction"],
                     "ppl_dense": ev["ppl_dense"], "ppl_moe": ev["ppl_moe"], "ratio": ev["ratio"],
                     "ratio_ci95": ev["ratio_ci95"], "tokens": ev["tokens"],
                     "mlp_error_final": [final_error(r["errors"])[1] for r in prov["layers"]],
                     "seconds": prov["seconds"]})
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, **run_info(["benchmarks/carve_curve.py", *sys.argv[1:]])},
                                              indent=1))
    print("| experts | top-k | shared | MLP active | PPL dense | PPL MoE | ratio [95% CI] | mean final MLP error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        e, k, f = r["setting"].split(":")
        lo, hi = r["ratio_ci95"]
        err = sum(r["mlp_error_final"]) / len(r["mlp_error_final"])
        print(f"| {e} | {k} | {f} | {r['active_fraction']:.0%} | {r['ppl_dense']:.2f} | {r['ppl_moe']:.2f} | "
              f"{r['ratio']:.3f} [{lo:.3f}, {hi:.3f}] | {err:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
