"""Quantize one model with several method configs, save each packed checkpoint, load it back
natively, and report bits/weight, sizes and perplexity next to the unquantized model — all scored on
the same windows, with a paired bootstrap CI of the PPL ratio. The README's main job (``moequant
demo``) and the benchmark tables are sweeps."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moequant.codecs.config import MethodConfig
from moequant.errors import MoequantError
from moequant.runinfo import run_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepJob:
    model: str
    configs: tuple[MethodConfig, ...]
    out: Path
    data: str = "ptb"
    split: str = "test"
    max_tokens: int | None = 16384
    seqlen: int = 512
    overwrite: bool = False
    progress: bool = True


def demo_configs(bits: tuple[int, ...], group_size: int = 128) -> tuple[MethodConfig, ...]:
    """int4/int3 symmetric, int2 asymmetric (a 4-level symmetric grid wastes a level on Gaussian
    weights), all with MSE clip search."""
    from moequant.codecs.config import UniformConfig

    return tuple(UniformConfig(bits=b, group_size=group_size, symmetric=b > 2, clip_search=True) for b in bits)


def run_sweep(job: SweepJob, argv: list[str] | None = None) -> dict[str, Any]:
    from moequant import api
    from moequant.alloc.recipe import Recipe
    from moequant.eval.bootstrap import paired_delta_ci
    from moequant.formats.checkpoint import checkpoint_bytes
    from moequant.models.loader import load_model
    from moequant.runs import PplJob, model_sizes, run_ppl

    if job.out.exists() and not job.overwrite:
        raise MoequantError(f"output directory {job.out} already exists (pass --overwrite or choose --out)")
    job.out.mkdir(parents=True, exist_ok=True)
    ppl_job = PplJob(job.model, job.data, job.split, seqlen=job.seqlen, max_tokens=job.max_tokens, progress=job.progress)
    model, tok, _ = load_model(job.model)
    base = run_ppl(ppl_job, argv, model=model, tokenizer=tok)
    base_sizes = model_sizes(model)
    rows = [{"method": "fp32 (unquantized)", "bits_per_weight": 32.0, "checkpoint_bytes": None,
             "resident_bytes": base_sizes["resident_bytes"], "ppl": base["ppl"], "ci95": base["ci95"],
             "ratio_ci95": None}]
    del model
    for cfg in job.configs:
        model, tok, _ = load_model(job.model)
        api.quantize(model, Recipe.uniform(cfg), progress=job.progress)
        ckpt = job.out / cfg.short_name
        api.save(model, ckpt, tokenizer=tok, overwrite=job.overwrite)
        bpw = model.moequant_report.bits_per_weight()
        del model
        qmodel = api.load(ckpt)
        sizes = model_sizes(qmodel)
        res = run_ppl(ppl_job, argv, model=qmodel, tokenizer=tok)
        (ckpt / "ppl.json").write_text(json.dumps(res, indent=1))
        delta = paired_delta_ci(base["nll_per_window"], base["tokens_per_window"],
                                res["nll_per_window"], res["tokens_per_window"])
        rows.append({"method": cfg.short_name, "bits_per_weight": bpw, "checkpoint_bytes": checkpoint_bytes(ckpt),
                     "resident_bytes": sizes["resident_bytes"], "ideal_bytes": sizes["ideal_bytes"],
                     "ppl": res["ppl"], "ci95": res["ci95"], "ratio_ci95": list(delta.ratio_ci)})
        del qmodel
    table = format_table(job, rows)
    result = {"model": job.model, "data": f"{job.data}/{job.split}", "max_tokens": job.max_tokens, "seqlen": job.seqlen,
              "tokens": base["tokens"], "rows": rows, "table": table, **run_info(argv)}
    (job.out / "summary.json").write_text(json.dumps(result, indent=1))
    return result


def format_table(job: SweepJob, rows: list[dict[str, Any]]) -> str:
    head = (f"{job.model}, {job.data}/{job.split} ({'first ' + str(job.max_tokens) if job.max_tokens else 'all'} tokens, "
            f"windows of {job.seqlen} with BOS)")
    lines = [head, "",
             "| method | bits/weight (quantized tensors) | checkpoint MiB | resident MiB | PPL [95% CI] | PPL ratio vs fp [95% CI] |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ck = "-" if r["checkpoint_bytes"] is None else f"{r['checkpoint_bytes'] / 2**20:.1f}"
        ratio = "-" if r["ratio_ci95"] is None else f"[{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}]"
        lines.append(f"| {r['method']} | {r['bits_per_weight']:.3f} | {ck} | {r['resident_bytes'] / 2**20:.1f} | "
                     f"{r['ppl']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {ratio} |")
    return "\n".join(lines)
