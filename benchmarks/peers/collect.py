"""Collect every ``runs/peers/*/ppl.json`` into ``benchmarks/results/peers_smollm2-135m.json`` and print the
markdown table (tool, config, counted bits/weight, tensor types, checkpoint MiB, PPL [95% CI], ratio vs fp
[paired 95% CI]).

    python benchmarks/peers/collect.py [--out benchmarks/results/peers_smollm2-135m.json]

The fp32 row is ``runs/peers/fp32/ppl.json`` (``fp_check.py``); ratios are paired bootstraps over the same
windows (``paired_delta_ci``). Runs scored on other windows than fp32 are refused.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_common as pc  # noqa: E402

from moequant.eval.bootstrap import paired_delta_ci  # noqa: E402
from moequant.runinfo import run_info  # noqa: E402

ORDER = {"none": 0, "moequant": 1, "hqq": 2, "bitsandbytes": 3, "llama.cpp": 4}


def types_cell(d: dict) -> str:
    acct = d.get("bits_accounting") or {}
    if "tensor_types" in acct:
        return ", ".join(f"{k}×{v}" for k, v in sorted(acct["tensor_types"].items(), key=lambda kv: -kv[1]))
    ex = acct.get("stored_tensor_examples")
    if ex:  # "W_q:uint8[2592, 64] scale:float16[5184, 1] ... for [576, 576]" -> "W_q uint8, scale float16, ..."
        parts = re.findall(r"([\w.]+):(\w+)\[", sorted(ex)[0])
        return ", ".join(f"{k} {dt}" for k, dt in parts)
    if d.get("peer") == "moequant":
        rules = ((d.get("config_detail") or {}).get("recipe") or {}).get("rules") or []
        cfg = next((r.get("config") for r in rules if isinstance(r, dict) and r.get("config")), None) or {}
        zero = f" + {cfg.get('bits')}-bit zero" if cfg.get("symmetric") is False else ""
        solver = (d.get("config_detail") or {}).get("solver") or {}
        extra = ""
        if solver.get("incoherence", "none") != "none":  # RHT stores its signs: counted in bits_per_weight
            extra = f" ({solver.get('solver')} solver, {solver['incoherence']} signs)"
        return (f"packed {cfg.get('bits', '?')}-bit codes + {cfg.get('scale_dtype', 'fp16')} scale{zero} per "
                f"{cfg.get('group_size', '?')}{extra}")
    return "-"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(pc.ROOT / "benchmarks" / "results" / "peers_smollm2-135m.json"))
    args = p.parse_args()
    fp_path = pc.RUNS / "fp32" / "ppl.json"
    fp = json.loads(fp_path.read_text())
    rows = []
    for path in sorted(pc.RUNS.glob("*/ppl.json")):
        d = json.loads(path.read_text())
        if "peer" not in d:
            continue
        if d["tokens_per_window"] != fp["tokens_per_window"]:
            print(f"skip {path}: scored on other windows than {fp_path}", file=sys.stderr)
            continue
        row = {k: v for k, v in d.items() if k not in ("machine",)}
        row["json"] = str(path.relative_to(pc.ROOT))
        if d["peer"] != "none":
            delta = paired_delta_ci(fp["nll_per_window"], fp["tokens_per_window"], d["nll_per_window"],
                                    d["tokens_per_window"])
            row["ratio_vs_fp"] = delta.ratio
            row["ratio_vs_fp_ci95"] = list(delta.ratio_ci)
        rows.append(row)
    rows.sort(key=lambda r: (ORDER.get(r["peer"], 9), -(r.get("bits_per_weight") or 99), r["config"]))
    lines = [f"{pc.MODEL}, ptb/test, first {fp['max_tokens'] or 'all'} tokens ({fp['tokens']} scored, "
             f"{fp['n_windows']} windows of {fp['seqlen']} with BOS)", "",
             "| tool | config | bits/weight (decoder linears, counted) | tensor types | checkpoint MiB | "
             "PPL [95% CI] | PPL ratio vs fp [95% CI] |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        bpw = r.get("bits_per_weight")
        ck = r.get("checkpoint_bytes")
        ratio = (f"{r['ratio_vs_fp']:.3f} [{r['ratio_vs_fp_ci95'][0]:.3f}, {r['ratio_vs_fp_ci95'][1]:.3f}]"
                 if "ratio_vs_fp" in r else "-")
        lines.append(f"| {r['peer'] if r['peer'] != 'none' else 'fp32 (unquantized)'} | {r['config']} | "
                     f"{'-' if bpw is None else f'{bpw:.3f}'} | {types_cell(r)} | "
                     f"{'-' if ck is None else f'{ck / 2**20:.1f}'} | {r['ppl']:.2f} [{r['ci95'][0]:.2f}, "
                     f"{r['ci95'][1]:.2f}] | {ratio} |")
    table = "\n".join(lines)
    out = {"model": pc.MODEL, "data": pc.DATA, "split": pc.SPLIT, "max_tokens": fp["max_tokens"],
           "seqlen": fp["seqlen"], "stride": fp["stride"], "add_bos": fp["add_bos"], "tokens": fp["tokens"],
           "n_windows": fp["n_windows"], "fp": str(fp_path.relative_to(pc.ROOT)), "rows": rows, "table": table,
           **run_info(sys.argv[1:])}
    out["command"] = "python benchmarks/peers/collect.py " + " ".join(sys.argv[1:])
    pc.write_json_atomic(Path(args.out), out)
    print(table)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
