"""Whole jobs behind the CLI (quantize a model to a directory, score perplexity, inspect a
checkpoint), each taking a typed job description and returning the JSON-able result it also writes."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moequant.alloc.recipe import Recipe
from moequant.calib.data import CalibData
from moequant.errors import MoequantError
from moequant.exact_gguf import source_gguf
from moequant.layerwise import HessianConfig
from moequant.runinfo import RssSampler, add_job_run, current_rss_bytes, job_runs, peak_rss_bytes, run_info
from moequant.solvers.config import SolverConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeJob:
    model: str
    recipe: Recipe
    out: Path
    overwrite: bool = False
    kept_dtype: str = "auto"  # dtype of kept (full precision) tensors: auto = as loaded
    progress: bool = True
    solver: SolverConfig = SolverConfig()
    calib: CalibData | None = None  # calibration text; required by solver="ldlq"
    hessian: HessianConfig = HessianConfig()
    calib_batch_size: int = 8
    offload: bool = False  # stream the weights layer by layer from safetensors, activations in files
    resume: bool = False  # continue the interrupted run to ``out`` from its last finished layer


def run_quantize(job: QuantizeJob, argv: list[str] | None = None) -> dict[str, Any]:
    """Quantize ``job.model`` into ``job.out``. Progress is kept layer by layer in a work directory beside
    ``out`` (``moequant.resume``), removed once ``report.json`` is written; ``job.resume`` continues
    from it."""
    from moequant import resume
    from moequant.fsutil import check_output, input_paths
    from moequant.models.loader import resolve_model_spec

    if job.resume and (job.out.exists() or job.out.is_symlink()):
        done = _finish_saved_run(job, argv)  # killed after the checkpoint's rename, before report.json
        if done is not None:
            return done
    resume.check_work_dir(job.out, job.resume)
    # before any work: writable, not the input model, and only a moequant output may be replaced
    check_output(job.out, job.overwrite, "--out", sources=input_paths(job.model))
    resolved = resolve_model_spec(job.model)
    if job.offload:
        if resolved.kind not in ("alias", "dir") or resolved.gguf_file:
            raise MoequantError(f"--offload streams safetensors files: {job.model!r} is a {resolved.kind} model "
                                "(use a zoo alias or a local Hugging Face directory)")
        if job.kept_dtype != "auto":
            raise MoequantError("--offload keeps the stored dtype of unquantized tensors; drop --kept-dtype")
    progress = resume.RunProgress.claim(job.out, resume.fingerprint(job, resolved), job.resume)
    try:
        result = _quantize(job, resolved, progress, argv)
    except BaseException:
        progress.release()
        raise
    progress.remove()
    return result


def _quantize(job: QuantizeJob, resolved: Any, progress: Any, argv: list[str] | None) -> dict[str, Any]:
    from moequant import api
    from moequant.fsutil import atomic_write_json
    from moequant.models.loader import load_model, load_tokenizer

    rss0 = current_rss_bytes()
    t0 = time.time()
    if job.offload:
        model, tok = None, load_tokenizer(resolved)
    else:
        model, tok, resolved = load_model(job.model)
        if job.kept_dtype != "auto":
            model.to(getattr(torch, job.kept_dtype))
    t_load = time.time() - t0
    if model is not None:  # architecture and recipe checked before the calibration text is tokenized
        from moequant.layerwise import check_recipe
        from moequant.models.adapters import adapter_for, iter_targets

        check_recipe(list(iter_targets(model, adapter_for(model))), job.recipe, model)
    calib = None
    if job.calib is not None:
        from moequant.calib.data import calibration_tokens
        from moequant.layerwise import Calibration

        if tok is None:
            raise MoequantError(f"{job.model}: no tokenizer, cannot tokenize the calibration text")
        calib = Calibration(calibration_tokens(tok, job.calib), batch_size=job.calib_batch_size, hessian=job.hessian,
                            source=job.calib.to_dict())
        progress.check_tokens(calib.tokens)
    peak_before = peak_rss_bytes()  # loading, tokenizing the calibration text
    rss_start = current_rss_bytes()
    t0 = time.time()
    if job.offload:
        from moequant.offload import quantize_offloaded

        with RssSampler() as sampler:
            report = quantize_offloaded(Path(resolved.path), job.out, job.recipe, calib, job.solver, tokenizer=tok,
                                        overwrite=job.overwrite, progress=job.progress, run=progress,
                                        source_gguf=source_gguf(resolved))
        t_quant = time.time() - t0
        peak = peak_rss_bytes()
        model = api.load(job.out)
    else:
        api.quantize(model, job.recipe, calib, solver=job.solver, progress=job.progress, run=progress,
                     source_gguf=source_gguf(resolved))
        report = model.moequant_report
        t_quant = time.time() - t0
        api.save(model, job.out, tokenizer=tok, overwrite=job.overwrite)
        peak = peak_rss_bytes()
    result = quantize_result(job, resolved.kind, report, model, {
        "peak_rss_bytes": peak, "rss_before_load_bytes": rss0, "peak_rss_before_quantize_bytes": peak_before,
        # offload only: RSS when the layer loop starts and the highest RSS sampled during it
        "rss_start_quantize_bytes": rss_start if job.offload else None,
        "peak_rss_quantize_bytes": sampler.peak_bytes if job.offload else None,
        "seconds": {"load": round(t_load, 2), "quantize": round(t_quant, 2)}, **job_runs(progress.job)}, argv)
    atomic_write_json(job.out / "report.json", result)
    return result


def quantize_result(job: QuantizeJob, source_kind: str, report: Any, model: torch.nn.Module,
                    measures: dict[str, Any], argv: list[str] | None) -> dict[str, Any]:
    """What ``report.json`` holds (``QuantizeReportJson``): the job, the report, the checkpoint's sizes,
    ``measures`` (memory and seconds) and the run info."""
    from moequant.eval.result_schema import QuantizeReportJson
    from moequant.formats.checkpoint import checkpoint_bytes

    report.record_kept(model)  # every full-precision tensor, targets or not
    return QuantizeReportJson(
        model=job.model, source=source_kind, out=str(job.out), offload=job.offload,
        config=job.recipe.to_dict(),
        bits_per_weight=report.bits_per_weight(),
        checkpoint_bytes=checkpoint_bytes(job.out),
        **model_sizes(model),
        **{k: v for k, v in report.to_dict().items() if k not in ("recipe", "bits_per_weight")},
        table=report.table(),
        **measures,
        **run_info(argv),
    ).to_dict()


def _finish_saved_run(job: QuantizeJob, argv: list[str] | None) -> dict[str, Any] | None:
    """``--resume`` when ``out`` exists: if it is the checkpoint of the interrupted run (killed after the
    checkpoint was renamed into place, before ``report.json`` or the work directory's removal), write
    the missing ``report.json`` from the stored layer records, remove the work directory and return the
    result; else None (the run is resumed or refused as usual)."""
    import json

    from moequant import api, resume
    from moequant.eval.result_schema import QuantizeReportJson
    from moequant.fsutil import atomic_write_json
    from moequant.models.loader import resolve_model_spec

    work = resume.work_dir_for(job.out)
    if not work.exists():
        return None
    resume.check_work_dir(job.out, True)
    found = resume.saved_checkpoint_report(work, job.out, resume.fingerprint(job, resolve_model_spec(job.model)))
    if found is None:
        return None
    if (job.out / "report.json").is_file():
        path = job.out / "report.json"
        result = QuantizeReportJson.from_dict(json.loads(path.read_text()), str(path)).to_dict()
    else:
        log.info("--resume: %s was written before the run stopped; writing its report.json", job.out)
        runs = add_job_run(resume.read_job(work).get("runs"), True, work)
        result = quantize_result(job, found["source"], found["report"], api.load(job.out),
                                 {"completed_by_resume": True, **job_runs({"runs": runs})}, argv)
        atomic_write_json(job.out / "report.json", result)
    resume.remove_work_dir(work)
    return result


def model_sizes(model: torch.nn.Module) -> dict[str, Any]:
    """Resident bytes (unique storages of every parameter and buffer) next to the ideal: packed bytes
    of the quantized tensors + bytes of everything kept; bits/weight over the whole model
    (``report.model_bit_count``: every parameter, packed ones at their stored bits, dense ones at their
    dtype's, shared ones once, buffers not counted)."""
    from moequant import api
    from moequant.report import model_bit_count

    packed = api.packed_modules(model)
    packed_bytes = sum(q.nbytes() for q in packed.values())
    seen = {t.untyped_storage().data_ptr() for q in packed.values() for t in q.data.values()}
    kept_bytes = 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        kept_bytes += t.numel() * t.element_size()
    resident = api.resident_bytes(model)
    ideal = packed_bytes + kept_bytes
    count = model_bit_count(model)
    return {"resident_bytes": resident, "ideal_bytes": ideal, "packed_bytes": packed_bytes,
            "kept_bytes": kept_bytes, "resident_over_ideal": resident / ideal if ideal else float("nan"),
            "bits_per_weight_model": count["bits_per_weight"], "model_bit_count": count}


@dataclass(frozen=True)
class PplJob:
    model: str
    data: str = "ptb"
    split: str = "test"
    seqlen: int = 512
    stride: int | None = None
    add_bos: bool = True
    batch_size: int = 4
    max_tokens: int | None = None
    progress: bool = True
    verify: bool = True  # SHA-256 of a moequant checkpoint's tensors checked as they are read


def run_ppl(job: PplJob, argv: list[str] | None = None, model=None, tokenizer=None,
            out_json: Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Score ``job``. With ``out_json`` (where the caller writes the result) the finished windows are kept beside
    it after every batch (``eval.ppl_progress``), and ``resume`` continues an interrupted run from them; the
    caller removes them with ``finish_ppl_progress`` once the result is written."""
    from moequant.eval.perplexity import PplConfig, evaluate_perplexity
    from moequant.eval.ppl_progress import PplProgress, fingerprint
    from moequant.eval.result_schema import ABSENT, PplJson
    from moequant.zoo.corpora import tokenize_corpus
    from moequant.models.loader import load_model
    from moequant.zoo.corpora import load_text

    try:  # the job's options, checked before the model is loaded
        cfg = PplConfig(seqlen=job.seqlen, stride=job.stride, add_bos=job.add_bos, batch_size=job.batch_size,
                        max_tokens=job.max_tokens)
    except ValueError as e:
        raise MoequantError(f"eval ppl: {e}") from None
    if out_json is not None and not resume:
        PplProgress(Path(out_json), {}).refuse_stale()  # before the model is loaded: fail fast
    resolved = None
    if model is None:
        model, tokenizer, resolved = load_model(job.model, verify=job.verify)
    if tokenizer is None:
        raise MoequantError(f"model {job.model!r} has no tokenizer: perplexity needs one")
    text = load_text(job.data, job.split)
    ids = tokenize_corpus(tokenizer, text)
    bos = tokenizer.bos_token_id if job.add_bos else None
    if job.add_bos and bos is None:
        raise MoequantError(f"model {job.model!r}: tokenizer has no BOS token; pass --no-bos")
    if ids.numel() < (1 if job.add_bos else 2):
        raise MoequantError(f"--data {job.data} ({job.split}): {ids.numel()} tokens, nothing to score")
    done: dict[int, float] = {}
    keeper = None
    if out_json is not None:
        keeper = PplProgress(Path(out_json), fingerprint(job.model, resolved, ids, {
            "data": job.data, "split": job.split, **cfg.to_dict(), "batch_size": job.batch_size}))
        done = keeper.load(resume)
    elif resume:
        raise MoequantError("eval ppl --resume needs --json (the progress is kept beside that file)")
    t0 = time.time()
    try:
        res = evaluate_perplexity(model, ids, cfg, bos, progress=job.progress, done=done,
                                  on_batch=None if keeper is None else keeper.save)
    except ValueError as e:  # progress that does not fit these windows (checked against the fingerprint first)
        raise MoequantError(f"eval ppl: {e}") from None
    out = PplJson(model=job.model, data=job.data, split=job.split, **res.to_dict(),
                  seconds=round(time.time() - t0, 2), **run_info(argv),
                  # scored by the interrupted run; ``seconds`` covers the rest
                  resumed_windows=len(done) if done else ABSENT,
                  seconds_all_runs=keeper.seconds_all_runs() if done and keeper is not None else ABSENT,
                  **(job_runs({"runs": keeper.runs}) if keeper is not None else {})).to_dict()
    if done and res.experts_total:
        log.warning("routed-expert counts cover only the %d windows scored by this run", res.n_windows - len(done))
    if not math.isfinite(out["ppl"]):
        log.warning("perplexity is not finite")
    return out


def finish_ppl_progress(out_json: Path) -> None:
    """Remove the progress of a run whose result ``out_json`` is written."""
    from moequant.eval.ppl_progress import progress_path

    progress_path(Path(out_json)).unlink(missing_ok=True)


def run_inspect(path: Path, argv: list[str] | None = None, verify: bool = True) -> dict[str, Any]:
    from moequant import api
    from moequant.formats.checkpoint import checkpoint_bytes, read_quantization_config

    qcfg = read_quantization_config(path, verify=verify)
    model = api.load(path, verify=verify)
    tensors = []
    for name, qt in api.packed_modules(model).items():
        # a rotated tensor names its rule and inner format: rht[paley-outer](uniform-packed)
        fmt = qt.format_id + (f"[{qt.transform}]({qt.inner.format_id})" if hasattr(qt, "inner") else "")
        tensors.append({"name": name, "format": fmt, "shape": list(qt.shape),
                        "bits_per_weight": qt.bits_per_weight(), "bytes": qt.nbytes(),
                        **{k: v for k, v in qt.attrs.items()}})
    kept = [{"name": n, "shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
             "bytes": p.numel() * p.element_size()} for n, p in model.named_parameters()]
    exact_names = set(qcfg.get("exact", ()))
    exact = [t for t in tensors if t["name"] in exact_names]  # kept tables stored packed, values unchanged
    tensors = [t for t in tensors if t["name"] not in exact_names]
    n_q = sum(math.prod(t["shape"]) for t in tensors)
    return {"path": str(path), "checkpoint_bytes": checkpoint_bytes(path), **model_sizes(model),
            "bits_per_weight": 8.0 * sum(t["bytes"] for t in tensors) / n_q if n_q else float("nan"),
            "recipe": qcfg.get("recipe"), "quantized_tensors": tensors, "exact_tensors": exact, "kept_tensors": kept,
            **run_info(argv)}
