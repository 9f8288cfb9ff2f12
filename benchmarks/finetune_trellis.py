"""Issue #14's experiment: ``smollm2-135m`` with one decoder layer (then two) at 2-bit trellis and every other
weight unquantized — PTQ vs BCJR-QAT vs straight-through trellis QAT (and, on request, KD with the codes fixed;
``M-layer`` runs method M with ``finetune --loss layer``, the layer-wise objective, instead of the KL),
each scored on PTB test next to the unquantized model and next to PTQ (same windows, paired bootstrap CIs).

    python benchmarks/finetune_trellis.py --json benchmarks/results/finetune_trellis_smollm2-135m.json

For each ``--layers`` set (default ``0`` then ``0,1``; ``all`` is the whole model, finetuned without
``--layers``): ``moequant quantize`` with a recipe that quantizes only
those layers' linears (the CLI's solver defaults, LDLQ + RHT for the trellis; ``--trellis-l`` and the calibration
flags passed on), then ``moequant finetune RUN --method M --layers SET --steps --lr [--tau]`` from that PTQ run
for each ``--methods`` entry, then ``moequant eval ppl`` of every checkpoint. Each row keeps its commands,
bits/weight, the finetune report's KL before/after, tokens seen and seconds, the PPL with its paired ratio
against fp and against the PTQ row of the same layers, and (bcjr) against the STE row.

Runs the real command line in subprocesses (``_cli_runs``). Resumable: finished rows in ``--json`` are kept,
finished checkpoints (a ``report.json``) and eval JSONs reused from ``--work``/MODEL/<digest of the settings>,
an interrupted finetune continued with ``--resume``; a ``--json`` made with other settings is refused. ``--ptq DIR``
starts from an existing checkpoint of the one ``--layers`` set instead of quantizing (the whole-model rows from
``moequant quantize MODEL --method trellis --bits 2``), after checking it quantizes exactly that set. ``--max-tokens`` scores only the first N PTB
test tokens (default the whole split).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from _cli_runs import eval_ppl, finetune, fp_reference, paired, previous_rows, quantize, quantize_seconds, write_json

from moequant.alloc.recipe import DEFAULT_KEEP, Recipe
from moequant.codecs.config import TrellisConfig

log = logging.getLogger("finetune_trellis")

SCRIPT = "benchmarks/finetune_trellis.py"
METHODS = ("bcjr", "ste", "kd", "bcjr-layer", "ste-layer", "kd-layer")  # "-layer": finetune --loss layer


WHOLE = "all"  # a --layers entry: every decoder layer (the whole-model rows)


def layer_slug(layers: str) -> str:
    return "L" + layers.replace(",", "+")


def recipe(layers: str, config: TrellisConfig) -> dict[str, Any]:
    """Keep the protected weights (norms, embeddings, head, routers), quantize every weight of decoder layers
    ``layers`` ("0", "0,1" or "all"), keep the rest (no rule matches them)."""
    alt = r"\d+" if layers == WHOLE else "(" + "|".join(str(int(i)) for i in layers.split(",")) + ")"
    return {"rules": [*({"match": p, "config": None} for p in DEFAULT_KEEP),
                      {"match": rf"re:model\.layers\.{alt}\..*", "config": config.to_dict()}]}


def relate(rows: dict[str, dict[str, Any]], base: dict[str, Any]) -> None:
    """Each finetuned row's paired ratio against the PTQ row of its layers, and BCJR's against STE's, where
    those rows exist."""
    tokens = base["tokens_per_window"]
    for r in rows.values():
        suffix = r["method"].partition("-")[1:]  # bcjr-layer is compared with ste-layer, under "ste"
        for key in ("ptq", "ste") if r["method"].startswith("bcjr") else ("ptq",) if r["method"] != "ptq" else ():
            method = key + "".join(suffix) if key == "ste" else key
            other = rows.get(f"{method}-{layer_slug(r['layers'])}")
            if other is not None:
                d = paired({"nll_per_window": other["nll_per_window"], "tokens_per_window": tokens},
                           {"nll_per_window": r["nll_per_window"], "tokens_per_window": tokens})
                r[f"ratio_vs_{key}"], r[f"ratio_vs_{key}_ci95"] = d.ratio, list(d.ratio_ci)


def given_ptq(layers: str, args: argparse.Namespace) -> tuple[dict[str, Any], list[str], float]:
    """``--ptq DIR``: an existing checkpoint as the PTQ row of ``layers`` -> (its trellis config, the command that
    made it, its quantize seconds). It must quantize exactly the weights ``recipe(layers)`` would, all at
    ``--bits``-bit trellis; otherwise: exit (its rows would not be the ones the table names)."""
    rep = json.loads((Path(args.ptq) / "report.json").read_text())
    want = Recipe.from_dict(recipe(layers, TrellisConfig(bits=args.bits)))
    listed = [(t["name"], t.get("kind", "other")) for key in ("quantized_tensors", "exact_tensors", "kept_tensors")
              for t in rep[key]]
    selected = {name for name, kind in listed if want.match(name, kind)[0] is not None}
    quantized = {t["name"]: t for t in rep["quantized_tensors"]}
    wrong = sorted(n for n, t in quantized.items() if not t["method"].startswith(f"trellis{args.bits}-"))
    if set(quantized) != selected or wrong:
        missing, extra = sorted(selected - set(quantized)), sorted(set(quantized) - selected)
        sys.exit(f"finetune_trellis: --ptq {args.ptq} is not layers {layers} at {args.bits}-bit trellis: "
                 + "; ".join(f"{what} {names[0]} (+{len(names) - 1} more)" for what, names in
                             (("not quantized:", missing), ("also quantized:", extra), ("not trellis:", wrong))
                             if names))
    rules = {r["match"]: r["config"] for r in rep["config"]["rules"]}
    configs = {json.dumps(rules[t["rule"]], sort_keys=True) for t in quantized.values()}
    if len(configs) != 1:
        sys.exit(f"finetune_trellis: --ptq {args.ptq} quantizes with {len(configs)} trellis configs; give one")
    return json.loads(configs.pop()), rep["command"].split(), quantize_seconds(Path(args.ptq), float("nan"))


def ptq_dir(layers: str, args: argparse.Namespace, work: Path) -> Path:
    """The PTQ checkpoint of ``layers``: ``--ptq`` when given, else the one this script quantizes."""
    return Path(args.ptq) if args.ptq else work / f"ptq-{layer_slug(layers)}"


def ptq_checkpoint(layers: str, args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], list[str], float]:
    """Quantize ``layers`` into ``work/ptq-<layers>`` unless that checkpoint exists (or ``--ptq`` names one)."""
    if args.ptq:
        return given_ptq(layers, args)
    cfg = TrellisConfig(bits=args.bits, **({} if args.trellis_l is None else {"L": args.trellis_l}))
    slug = f"ptq-{layer_slug(layers)}"
    path = work / f"{slug}-recipe.json"
    path.write_text(json.dumps(recipe(layers, cfg), indent=1))
    flags = ["--recipe", str(path)] + [f"--{k.replace('_', '-')}={getattr(args, k)}"
                                       for k in ("calib_samples", "calib_seqlen") if getattr(args, k) is not None]
    qcmd, qsecs = quantize(args.model, flags, work / slug)
    return cfg.to_dict(), qcmd, quantize_seconds(work / slug, qsecs)


def measure_ptq(layers: str, args: argparse.Namespace, base: dict[str, Any], work: Path) -> dict[str, Any]:
    slug = f"ptq-{layer_slug(layers)}"
    cfg, qcmd, qsecs = ptq_checkpoint(layers, args, work)
    run_dir = ptq_dir(layers, args, work)
    res, ecmd, esecs = eval_ppl(str(run_dir), work / f"{slug}-ppl.json", args.max_tokens)
    rep = json.loads((run_dir / "report.json").read_text())
    d = paired(base, res)
    return {"slug": slug, "layers": layers, "method": "ptq", "config": cfg, "command": " ".join(qcmd),
            "eval_command": " ".join(ecmd), "bits_per_weight": rep["bits_per_weight"],
            "bits_per_weight_model": rep["bits_per_weight_model"], "seconds": qsecs,
            "seconds_eval": esecs,
            "ppl": res["ppl"], "ratio": d.ratio, "ratio_ci95": list(d.ratio_ci), "nll_per_window": res["nll_per_window"]}


def ensure_ptq(layers: str, args: argparse.Namespace, work: Path, kept: dict[str, Any] | None) -> None:
    """The PTQ checkpoint a finetune row starts from, built if missing (its row may be kept from an earlier run
    whose work directory is gone). It must score the PTQ row's NLLs (its eval JSON is reused when there): a tree
    whose quantize rounds differently would start the new rows from another model than the kept ones (then: exit,
    rerun every row)."""
    slug = f"ptq-{layer_slug(layers)}"
    ptq_checkpoint(layers, args, work)
    if kept is None:
        return
    res, _, _ = eval_ppl(str(ptq_dir(layers, args, work)), work / f"{slug}-ppl.json", args.max_tokens)
    diff = max(abs(a - b) / abs(b) for a, b in zip(res["nll_per_window"], kept["nll_per_window"]))
    if len(res["nll_per_window"]) != len(kept["nll_per_window"]) or diff > 1e-7:
        made = f"--ptq {args.ptq}" if args.ptq else "rebuilt by this tree"
        sys.exit(f"finetune_trellis: the {slug} checkpoint ({made}) scores PPL {res['ppl']:.3f}, the kept "
                 f"{slug} row {kept['ppl']:.3f}: new finetune rows would start from another model than the kept ones; "
                 "rerun every row with a new --json (or only the new methods with their own --json)")


def measure_finetune(layers: str, method: str, args: argparse.Namespace, base: dict[str, Any], work: Path,
                     kept_ptq: dict[str, Any] | None = None) -> dict[str, Any]:
    ptq = ptq_dir(layers, args, work)
    ensure_ptq(layers, args, work, kept_ptq)
    slug = f"{method}-{layer_slug(layers)}"
    base_method, _, loss = method.partition("-")
    flags = ["--method", base_method, *(["--layers", layers] if layers != WHOLE else []), "--steps", str(args.steps),
             "--lr", str(args.lr), "--batch", str(args.batch)] + (["--loss", loss] if loss else []) + \
        (["--tau", args.tau, "--soft-bits", str(args.soft_bits)] if base_method == "bcjr" else []) + \
        (["--ste-every", str(args.ste_every)] if base_method == "ste" else [])
    cmd, secs = finetune(ptq, flags, work / slug)
    res, ecmd, esecs = eval_ppl(str(work / slug), work / f"{slug}-ppl.json", args.max_tokens)
    rep = json.loads((work / slug / "report.json").read_text())
    ft = rep["finetune"]
    d = paired(base, res)
    return {"slug": slug, "layers": layers, "method": method, "command": " ".join(cmd), "eval_command": " ".join(ecmd),
            "bits_per_weight": rep["bits_per_weight"], "kl_before": ft["loss_before"], "kl_after": ft["loss_after"],
            "tokens_seen": ft["tokens_seen"], "seconds": ft["seconds"], "seconds_run": secs, "seconds_eval": esecs,
            "ppl": res["ppl"], "ratio": d.ratio, "ratio_ci95": list(d.ratio_ci), "nll_per_window": res["nll_per_window"]}


def _ci(r: dict[str, Any], key: str) -> str:
    if f"{key}_ci95" not in r:
        return "-"
    lo, hi = r[f"{key}_ci95"]
    return f"x{r[key]:.4f} [{lo:.4f}, {hi:.4f}]"


HEAD = ["layers", "method", "bits/weight", "PPL", "vs fp [95% CI]", "vs PTQ [95% CI]", "vs STE [95% CI]",
        "KL before -> after", "tokens seen", "seconds"]


def tables(payload: dict[str, Any]) -> str:
    fp, rows = payload["fp"], payload["rows"]
    out = [f"{payload['model']}: fp PPL {fp['ppl']:.3f} on {fp['tokens']} PTB test tokens ({fp['n_windows']} windows "
           f"of {fp['seqlen']}); the listed layers at 2-bit trellis, every other weight unquantized", "",
           "| " + " | ".join(HEAD) + " |", "|---" * len(HEAD) + "|"]
    for slug in payload["order"]:
        r = rows.get(slug)
        if r is None:
            continue
        kl = f"{r['kl_before']:.5f} -> {r['kl_after']:.5f}" if "kl_after" in r else "-"
        cells = [r["layers"], r["method"], f"{r['bits_per_weight']:.3f}", f"{r['ppl']:.3f}", _ci(r, "ratio"),
                 _ci(r, "ratio_vs_ptq"), _ci(r, "ratio_vs_ste"), kl, f"{r.get('tokens_seen', 0):,}",
                 "-" if r["seconds"] is None else f"{r['seconds']:.0f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(layers, method) in running order, PTQ first for each layer set."""
    return [(layers, m) for layers in args.layers for m in ("ptq", *args.methods)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="zoo alias or checkpoint directory (decoder layers named model.layers.N: Llama, Qwen2, Qwen2-MoE, ...)")
    p.add_argument("--layers", nargs="+", default=["0", "0,1"],
                   help=f"decoder layer sets, each quantized alone ('{WHOLE}': every layer, the whole-model rows)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["bcjr", "ste"], help="finetune methods")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--trellis-l", type=int, default=None, help="trellis state bits (default: the CLI's)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3, help="finetune --lr (relative to each parameter's RMS)")
    p.add_argument("--tau", default="0.3:0.05", help="bcjr temperature START:END")
    p.add_argument("--batch", type=int, default=4, help="finetune windows per step")
    p.add_argument("--soft-bits", type=int, default=8, help="bcjr: soft-pass state bits (finetune's default 8)")
    p.add_argument("--ste-every", type=int, default=8, help="ste: Viterbi every N-th step (finetune's default 8)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default: the CLI's)")
    p.add_argument("--calib-seqlen", type=int, default=None, help="calibration window length (default: the CLI's)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N PTB test tokens")
    p.add_argument("--ptq", default=None, help="an existing checkpoint of the one --layers set at --bits-bit trellis "
                   "(e.g. `moequant quantize MODEL --method trellis --bits 2` for 'all') to start from, instead of "
                   "quantizing; checked against the set, its report's command and time recorded")
    p.add_argument("--work", default="runs/finetune_trellis", help="checkpoints and per-run JSON go here")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    if args.ptq and (len(args.layers) != 1 or args.trellis_l is not None or args.calib_samples is not None
                     or args.calib_seqlen is not None):
        p.error("--ptq is the PTQ checkpoint of one --layers set: give exactly one, and no --trellis-l or "
                "--calib-* (the checkpoint fixed them)")
    if args.ptq and not (Path(args.ptq) / "report.json").is_file():
        p.error(f"--ptq {args.ptq}: no moequant checkpoint there (no report.json)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    settings = {k: getattr(args, k) for k in ("model", "bits", "trellis_l", "steps", "lr", "tau", "batch", "soft_bits",
                                              "ste_every", "calib_samples", "calib_seqlen", "max_tokens")}
    if args.ptq:  # (absent otherwise: the settings, and so the work directory, of earlier runs stay as they were)
        settings["ptq"] = str(Path(args.ptq).resolve())
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    work = Path(args.work) / Path(args.model).name / digest  # checkpoints are only reused under equal settings
    work.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.json)
    rows = previous_rows(out_json, settings, "finetune_trellis")
    base, fp = fp_reference(args.model, work / "fp-ppl.json", args.max_tokens)
    order = [f"{m}-{layer_slug(layers)}" for layers, m in plan(args)]
    payload = {"model": args.model, "settings": settings, "work": str(work), "order": order, "rows": rows, "fp": fp}
    for layers, method in plan(args):
        slug = f"{method}-{layer_slug(layers)}"
        if slug not in rows:
            rows[slug] = measure_ptq(layers, args, base, work) if method == "ptq" else \
                measure_finetune(layers, method, args, base, work, rows.get(f"ptq-{layer_slug(layers)}"))
        relate(rows, base)
        write_json(out_json, {**payload, "table": tables(payload)}, SCRIPT)
        log.info("%s: PPL %.3f vs fp %.3f (%s)", slug, rows[slug]["ppl"], base["ppl"], _ci(rows[slug], "ratio"))
    print(tables(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
