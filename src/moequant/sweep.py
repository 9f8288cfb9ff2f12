"""Quantize one model with several methods, save each packed checkpoint, load it back natively, and
report bits/weight, sizes and perplexity next to the unquantized model — all scored on the same
windows, with a paired bootstrap CI of the PPL ratio to the unquantized model and, for chosen pairs,
between two methods. The README's main job (``moequant demo``) and the benchmark tables are sweeps."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moequant.calib.data import CalibData
from moequant.codecs.config import MethodConfig
from moequant.errors import MoequantError
from moequant.layerwise import HessianConfig
from moequant.runinfo import peak_rss_bytes, run_info
from moequant.solvers.config import SolverConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepEntry:
    """One method of a sweep: a codec config applied to every target, a solver, and (for LDLQ) the
    calibration text and Hessian options."""

    config: MethodConfig
    solver: SolverConfig = SolverConfig()
    calib: CalibData | None = None
    hessian: HessianConfig = HessianConfig()
    label: str = ""

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        name = self.config.short_name
        if self.solver.solver != "rtn" or self.solver.incoherence != "none":
            name += f" {self.solver.short_name}"
        if self.calib is not None and self.hessian.mode != "per-expert":
            name += f" H={self.hessian.mode}"
        return name


@dataclass(frozen=True)
class SweepJob:
    model: str
    entries: tuple[SweepEntry, ...]
    out: Path
    data: str = "ptb"
    split: str = "test"
    max_tokens: int | None = 16384
    seqlen: int = 512
    overwrite: bool = False
    progress: bool = True
    pairs: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (A, B) names: paired CI of PPL_A / PPL_B


def demo_configs(bits: tuple[int, ...], group_size: int = 128, solver: str = "auto", incoherence: str = "auto",
                 calib_samples: int = 32) -> tuple[SweepEntry, ...]:
    """What ``moequant quantize MODEL --bits B`` does with no other flag, at every width (asymmetric int-k
    with MSE clip search; LDLQ + RHT calibrated on PTB train at 4 bits and fewer), except that the
    calibration uses ``calib_samples`` windows of 512 tokens (default 32 instead of 128, to fit the demo
    in minutes). Each entry is labelled with the recipe it ran."""
    from moequant.alloc.defaults import AUTO, auto_incoherence, auto_solver, describe
    from moequant.codecs.config import UniformConfig

    entries = []
    for b in bits:
        cfg = UniformConfig(bits=b, group_size=group_size, symmetric=False, clip_search=True)
        name = auto_solver(cfg) if solver == AUTO else solver
        inc = auto_incoherence(name, [cfg]) if incoherence == AUTO else incoherence
        sc = SolverConfig(solver=name, incoherence=inc)
        calib = CalibData(samples=calib_samples) if sc.needs_hessian else None
        label = describe(cfg, name, inc, None if calib is None else f"ptb train {calib.samples} x {calib.seqlen}")
        entries.append(SweepEntry(cfg, sc, calib, label=label))
    return tuple(entries)


def run_sweep(job: SweepJob, argv: list[str] | None = None) -> dict[str, Any]:
    from moequant import api
    from moequant.alloc.recipe import Recipe
    from moequant.eval.bootstrap import paired_ppl
    from moequant.eval.result_schema import QuantizeReportJson
    from moequant.formats.checkpoint import checkpoint_bytes
    from moequant.fsutil import AtomicDir, atomic_write_json, check_output, input_paths
    from moequant.layerwise import check_recipe
    from moequant.models.adapters import adapter_for, iter_targets
    from moequant.models.loader import load_model
    from moequant.runs import PplJob, model_sizes, run_ppl

    # before any work: writable, not the input model, and only a moequant output may be replaced
    check_output(job.out, job.overwrite, "--out", sources=input_paths(job.model))
    names = [e.name for e in job.entries]
    if len(set(names)) != len(names):
        raise MoequantError(f"sweep methods must have distinct names, got {names}")
    for a, b in job.pairs:
        if a not in names or b not in names:
            raise MoequantError(f"pair ({a!r}, {b!r}) names a method not in the sweep {names}")
    ppl_job = PplJob(job.model, job.data, job.split, seqlen=job.seqlen, max_tokens=job.max_tokens, progress=job.progress)
    model, tok, _ = load_model(job.model)
    targets = list(iter_targets(model, adapter_for(model)))
    for e in job.entries:  # fail before any scoring
        check_recipe(targets, Recipe.uniform(e.config))
    # the whole sweep is built in a temp directory beside --out and renamed into place when complete:
    # an interrupted sweep leaves the previous --out as it was
    with AtomicDir(job.out, overwrite=job.overwrite, what="--out") as tmp:
        base = run_ppl(ppl_job, argv, model=model, tokenizer=tok)
        base_sizes = model_sizes(model)
        rows = [{"method": "fp32 (unquantized)", "bits_per_weight": 32.0, "checkpoint_bytes": None,
                 "resident_bytes": base_sizes["resident_bytes"], "ideal_bytes": None, "ppl": base["ppl"],
                 "ci95": base["ci95"], "ratio_ci95": None}]
        del model
        scored: dict[str, dict[str, Any]] = {}
        for e in job.entries:
            dirname = e.name.replace(" ", "_").replace("=", "-")
            ckpt, work = job.out / dirname, tmp / dirname  # final path (recorded), path while the sweep runs
            model, tok, _ = load_model(job.model)
            calib = _calibration(e, tok)
            api.quantize(model, Recipe.uniform(e.config), calib, solver=e.solver, progress=job.progress)
            report = model.moequant_report
            api.save(model, work, tokenizer=tok)
            rep_json = QuantizeReportJson(**report.to_dict(), **run_info(argv))
            atomic_write_json(work / "report.json", rep_json.to_dict())
            del model
            qmodel = api.load(work)
            sizes = model_sizes(qmodel)
            res = run_ppl(ppl_job, argv, model=qmodel, tokenizer=tok)
            atomic_write_json(work / "ppl.json", res)
            del qmodel
            scored[e.name] = res
            delta = paired_ppl(res["nll_per_window"], res["tokens_per_window"],
                               base["nll_per_window"], base["tokens_per_window"])
            proxies = [t.proxy for t in report.quantized if t.proxy is not None]
            rows.append({"method": e.name, "config": e.config.to_dict(), "solver": e.solver.to_dict(),
                         "calibration": report.calibration, "bits_per_weight": report.bits_per_weight(),
                         "checkpoint_bytes": checkpoint_bytes(work), "resident_bytes": sizes["resident_bytes"],
                         "ideal_bytes": sizes["ideal_bytes"], "ppl": res["ppl"], "ci95": res["ci95"],
                         "ratio_ci95": list(delta.ratio_ci),
                         "mean_proxy": sum(proxies) / len(proxies) if proxies else None,
                         "starved_experts": [s.__dict__ for s in report.starved], "checkpoint": str(ckpt)})
        pairs = []
        for a, b in job.pairs:
            d = paired_ppl(scored[a]["nll_per_window"], scored[a]["tokens_per_window"],
                           scored[b]["nll_per_window"], scored[b]["tokens_per_window"])
            pairs.append({"a": a, "b": b, "ppl_a": scored[a]["ppl"], "ppl_b": scored[b]["ppl"],
                          "ratio_a_over_b_ci95": list(d.ratio_ci), "verdict": d.verdict})
        table = format_table(job, rows, pairs)
        result = {"model": job.model, "data": f"{job.data}/{job.split}", "max_tokens": job.max_tokens,
                  "seqlen": job.seqlen, "tokens": base["tokens"], "n_windows": base["n_windows"], "rows": rows,
                  "pairs": pairs, "table": table, "peak_rss_bytes": peak_rss_bytes(), **run_info(argv)}
        atomic_write_json(tmp / "summary.json", result)
    return result


def _calibration(e: SweepEntry, tok: Any):
    if e.calib is None:
        return None
    from moequant.calib.data import calibration_tokens
    from moequant.layerwise import Calibration

    return Calibration(calibration_tokens(tok, e.calib), hessian=e.hessian, source=e.calib.to_dict())


def format_table(job: SweepJob, rows: list[dict[str, Any]], pairs: list[dict[str, Any]] | None = None) -> str:
    head = (f"{job.model}, {job.data}/{job.split} ({'first ' + str(job.max_tokens) if job.max_tokens else 'all'} tokens, "
            f"windows of {job.seqlen} with BOS)")
    lines = [head, "",
             "| method | bits/weight (quantized tensors) | checkpoint MiB | resident MiB (ideal) | PPL [95% CI] "
             "| PPL ratio vs fp [95% CI] |",
             "|---|---|---|---|---|---|"]
    fp_ppl = next((r["ppl"] for r in rows if r["ratio_ci95"] is None), None)  # the unquantized row
    for r in rows:
        ck = "-" if r["checkpoint_bytes"] is None else f"{r['checkpoint_bytes'] / 2**20:.1f}"
        res = f"{r['resident_bytes'] / 2**20:.1f}"
        if r.get("ideal_bytes"):
            res += f" ({r['ideal_bytes'] / 2**20:.1f})"
        ratio = "-" if r["ratio_ci95"] is None else f"[{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}]"
        if r["ratio_ci95"] is not None and fp_ppl:
            ratio = f"x{r['ppl'] / fp_ppl:.3f} {ratio}"
        lines.append(f"| {r['method']} | {r['bits_per_weight']:.3f} | {ck} | {res} | "
                     f"{r['ppl']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {ratio} |")
    if pairs:
        lines += ["", "| A | B | PPL A | PPL B | PPL A / PPL B [95% paired CI] | verdict |", "|---|---|---|---|---|---|"]
        for p in pairs:
            lo, hi = p["ratio_a_over_b_ci95"]
            lines.append(f"| {p['a']} | {p['b']} | {p['ppl_a']:.2f} | {p['ppl_b']:.2f} | [{lo:.4f}, {hi:.4f}] "
                         f"| {p['verdict']} |")
    return "\n".join(lines)
