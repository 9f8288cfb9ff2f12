"""Issue #11's MoE ablation on a carved real-weight MoE: which expert Hessian LDLQ should use, and what LDLQ+RHT
buys over round-to-nearest, each scored on PTB test next to the unquantized model (same windows, paired CIs).

    python benchmarks/moe_ablation.py --model smollm2-moe --json benchmarks/results/moe_ablation_smollm2-moe.json

1. Hessian mode at int2 (the CLI's int2 defaults) and at 2-bit trellis, both LDLQ+RHT:
   ``--hessian per-expert | layer-mean | layer-token-weighted``; each row against fp and against per-expert.
2. RTN (``--solver rtn``) vs LDLQ+RHT (per-expert Hessians) at ``--bits 2 3 4`` (int, CLI defaults otherwise).

Runs the real command line in subprocesses (``_cli_runs``). Each row keeps its commands, bits/weight from the
quantize report, the starved experts (fewer routed calibration tokens than the threshold; distinct experts, and
the policy applied), and the routed-expert counts ``eval ppl`` reports (experts ``QuantExperts`` decoded vs a
dense pass's). Rows with the same quantize flags (int2 LDLQ+RHT per-expert is in both parts) share one
checkpoint. Resumable: finished rows in ``--json`` are kept, finished checkpoints and eval JSONs in ``--work``
reused; a ``--json`` made with other settings is refused. ``--max-tokens`` scores only the first N PTB test
tokens (default the whole split); ``--calib-samples`` / ``--calib-seqlen`` / ``--trellis-l`` are passed to
every calibrated quantize (defaults: the CLI's).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _cli_runs import eval_ppl, fp_reference, paired, previous_rows, quantize, write_json

log = logging.getLogger("moe_ablation")

HESSIAN_MODES = ("per-expert", "layer-mean", "layer-token-weighted")
SCRIPT = "benchmarks/moe_ablation.py"


@dataclass(frozen=True)
class Row:
    """One quantized model: codec (``int`` / ``trellis``) at ``bits``, RTN or LDLQ+RHT, an expert Hessian mode."""

    method: str
    bits: int
    solver: str  # "rtn" | "ldlq+rht"
    hessian: str | None  # None for RTN

    @property
    def slug(self) -> str:
        return "-".join(p for p in (f"{self.method}{self.bits}", self.solver.replace("+", "-"), self.hessian) if p)

    def flags(self, extra: list[str]) -> list[str]:
        """quantize flags; ``extra`` (calibration / trellis options) only where they apply."""
        out = ["--method", self.method, "--bits", str(self.bits)]
        if self.method != "trellis":
            extra = [f for f in extra if not f.startswith("--trellis")]
        if self.solver == "rtn":
            return out + ["--solver", "rtn", *[f for f in extra if f.startswith("--trellis")]]
        return out + ["--solver", "ldlq", "--incoherence", "rht", "--hessian", self.hessian, *extra]


def plan(bits: list[int], parts: list[str]) -> dict[str, list[Row]]:
    """The rows of each part, in running order."""
    out: dict[str, list[Row]] = {}
    if "hessian" in parts:
        out["hessian"] = [Row(m, 2, "ldlq+rht", h) for m in ("int", "trellis") for h in HESSIAN_MODES]
    if "solvers" in parts:
        out["solvers"] = [Row("int", b, s, None if s == "rtn" else "per-expert") for b in bits for s in ("rtn", "ldlq+rht")]
    return out


def starved(report: dict[str, Any]) -> dict[str, Any]:
    """Starved experts of a quantize report: distinct (experts module, expert) pairs, out of all experts."""
    experts = sum(t["shape"][0] for t in report["quantized_tensors"] if t["name"].endswith("experts.gate_up_proj"))
    distinct = {(s["tensor"].rsplit(".", 1)[0], s["expert"]) for s in report["starved_experts"]}
    hess = (report.get("calibration") or {}).get("hessian") or {}
    return {"starved_experts": len(distinct), "experts": experts, "min_expert_tokens": hess.get("min_expert_tokens"),
            "starved_policy": hess.get("starved_policy"),
            "starved_min_tokens": min((s["tokens"] for s in report["starved_experts"]), default=None)}


def measure(row: Row, args: argparse.Namespace, base: dict[str, Any], work: Path) -> dict[str, Any]:
    """Quantize, score and compare one row (reusing its checkpoint / eval JSON when they exist)."""
    extra = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("calib_samples", "calib_seqlen", "trellis_l")
             if getattr(args, k) is not None]
    run_dir = work / row.slug
    qcmd, qsecs = quantize(args.model, row.flags(extra), run_dir)
    res, ecmd, esecs = eval_ppl(str(run_dir), work / f"{row.slug}-ppl.json", args.max_tokens)
    rep = json.loads((run_dir / "report.json").read_text())
    d = paired(base, res)
    return {"slug": row.slug, "method": row.method, "bits": row.bits, "solver": row.solver, "hessian": row.hessian,
            "quantize_command": " ".join(qcmd), "eval_command": " ".join(ecmd),
            "bits_per_weight": rep["bits_per_weight"], "bits_per_weight_model": rep["bits_per_weight_model"],
            "calibration": rep["calibration"], **starved(rep),
            "experts_computed": res.get("experts_computed"), "experts_total": res.get("experts_total"),
            "experts_per_layer": res.get("experts_per_layer"), "ppl": res["ppl"], "ratio": d.ratio,
            "ratio_ci95": list(d.ratio_ci), "seconds_quantize": qsecs, "seconds_eval": esecs,
            "nll_per_window": res["nll_per_window"]}


def vs_per_expert(rows: dict[str, dict[str, Any]], base: dict[str, Any]) -> None:
    """Add each Hessian-mode row's paired ratio against the per-expert row of the same codec."""
    for r in rows.values():
        ref = rows.get(Row(r["method"], r["bits"], r["solver"], "per-expert").slug)
        if r["hessian"] in (None, "per-expert") or ref is None:
            continue
        tokens = base["tokens_per_window"]
        d = paired({"nll_per_window": ref["nll_per_window"], "tokens_per_window": tokens},
                   {"nll_per_window": r["nll_per_window"], "tokens_per_window": tokens})
        r["ratio_vs_per_expert"], r["ratio_vs_per_expert_ci95"] = d.ratio, list(d.ratio_ci)


def _ci(ratio: float, ci: list[float]) -> str:
    return f"x{ratio:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"


def _routed(r: dict[str, Any]) -> str:
    if not r["experts_total"]:
        return "-"
    return f"{r['experts_computed']} / {r['experts_total']} ({100 * r['experts_computed'] / r['experts_total']:.1f}%)"


def _starved(r: dict[str, Any]) -> str:
    if r["solver"] == "rtn":
        return "- (no calibration)"
    return f"{r['starved_experts']} of {r['experts']} (< {r['min_expert_tokens']} tokens, {r['starved_policy']})"


HEAD = {"hessian": ["codec", "expert Hessian", "bits/weight", "PPL", "vs fp [95% CI]", "vs per-expert [95% CI]",
                    "starved experts", "experts decoded"],
        "solvers": ["bits", "solver", "bits/weight", "PPL", "vs fp [95% CI]", "starved experts", "experts decoded"]}
TITLE = {"hessian": "Hessian mode (LDLQ+RHT)", "solvers": "RTN vs LDLQ+RHT (int, per-expert Hessians)"}


def _cells(part: str, r: dict[str, Any]) -> list[str]:
    lead = [f"{r['method']}{r['bits']}", r["hessian"]] if part == "hessian" else [str(r["bits"]), r["solver"]]
    cells = lead + [f"{r['bits_per_weight']:.3f}", f"{r['ppl']:.3f}", _ci(r["ratio"], r["ratio_ci95"])]
    if part == "hessian":
        cells.append(_ci(r["ratio_vs_per_expert"], r["ratio_vs_per_expert_ci95"]) if "ratio_vs_per_expert" in r
                     else "-")
    return cells + [_starved(r), _routed(r)]


def tables(payload: dict[str, Any]) -> str:
    """The markdown tables of a finished (or partial) run."""
    fp, rows = payload["fp"], payload["rows"]
    out = [f"{payload['model']}: fp PPL {fp['ppl']:.3f} on {fp['tokens']} PTB test tokens ({fp['n_windows']} windows "
           f"of {fp['seqlen']}); experts decoded = routed experts QuantExperts computed / a dense pass's, all eval calls"]
    for part, slugs in payload["parts"].items():
        got = [rows[s] for s in slugs if s in rows]
        if got:
            out += ["", f"{TITLE[part]}:", "", "| " + " | ".join(HEAD[part]) + " |", "|---" * len(HEAD[part]) + "|"]
            out += ["| " + " | ".join(_cells(part, r)) + " |" for r in got]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-moe", help="MoE zoo alias or checkpoint directory")
    p.add_argument("--parts", nargs="+", choices=["hessian", "solvers"], default=["hessian", "solvers"])
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4], help="bits of the RTN vs LDLQ+RHT part")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N PTB test tokens")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default: the CLI's)")
    p.add_argument("--calib-seqlen", type=int, default=None, help="calibration window length (default: the CLI's)")
    p.add_argument("--trellis-l", type=int, default=None, help="trellis state bits (default: the CLI's)")
    p.add_argument("--work", default="runs/moe_ablation", help="checkpoints and per-run JSON go here")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = {k: getattr(args, k) for k in ("model", "max_tokens", "calib_samples", "calib_seqlen", "trellis_l")}
    work = Path(args.work) / Path(args.model).name
    work.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.json)
    rows = previous_rows(out_json, settings, "moe_ablation")
    base, fp = fp_reference(args.model, work / "fp-ppl.json", args.max_tokens)
    # the tables show every part this run measures and every part an earlier run (other --parts) left rows of
    parts = {part: [r.slug for r in rs] for part, rs in plan(args.bits, list(HEAD)).items()
             if part in args.parts or any(r.slug in rows for r in rs)}
    payload = {"model": args.model, "settings": settings, "parts": parts, "rows": rows, "fp": fp}
    for part_rows in plan(args.bits, args.parts).values():
        for row in part_rows:
            if row.slug in rows:
                continue
            rows[row.slug] = measure(row, args, base, work)
            vs_per_expert(rows, base)
            write_json(out_json, {**payload, "table": tables(payload)}, SCRIPT)
            r = rows[row.slug]
            log.info("%s: %.3f b/w, PPL %.3f vs %.3f (%s)", row.slug, r["bits_per_weight"], r["ppl"], base["ppl"],
                     _ci(r["ratio"], r["ratio_ci95"]))
    vs_per_expert(rows, base)
    write_json(out_json, {**payload, "table": tables(payload)}, SCRIPT)
    print(tables(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
