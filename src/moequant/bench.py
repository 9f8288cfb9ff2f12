"""``moequant bench``: decode and prefill speed, resident memory and peak RSS of a model — a zoo alias, an
HF directory, a ``.gguf`` file or a moequant checkpoint (packed, run through ``QuantLinear`` /
``QuantExperts`` on whatever kernel path is selected) — and, with ``--base``, of the unquantized model a
run was made from, measured in the same process.

What is timed (``time.perf_counter``, ``torch.inference_mode``, fp32 activations):

- **decode**, per batch size B: B sequences of ``prompt`` tokens (BOS + the model's tokenizer on a fixed
  English text, consecutive windows of it, so the B sequences differ; seeded random ids when the model has
  no tokenizer). The first ``prompt - 1`` tokens go through one untimed forward that fills the KV cache;
  then ``tokens`` timed steps each feed one token per sequence (the last prompt token, then each step's
  greedy pick) and take the argmax of its logits. So every timed step is one single-token forward per
  sequence, exactly ``tokens`` new tokens come out of each sequence, EOS never stops it, and the new tokens
  equal ``generate(do_sample=False, max_new_tokens=tokens)``. One untimed warm-up run, then ``repeats``
  timed runs; the median counts. tokens/s = B·tokens / seconds (``tokens_per_s``) and per sequence.
- **prefill**: one sequence of ``prefill`` tokens in one forward with the KV cache on and logits of the last
  position only (``logits_to_keep=1`` where the model takes it, as ``generate`` does); warm-up, then the
  median of ``repeats``.

Memory (after the timed runs, so caches that kernels build on first use are counted):
``resident_bytes`` = unique storages of every parameter and buffer (packed data included, as ``inspect``
counts it), ``attached_tensor_bytes`` = tensors held in module attributes outside parameters and buffers
(where kernels keep repacked weights; also transformers' small rotary tables), ``resident_total_bytes`` =
their sum. Caches kept outside the modules (a global dict of a kernel library) are not seen there; the
RSS figures bound them: ``peak_rss_bytes`` is the process-wide peak (``ru_maxrss``, monotone over a process
that benches several models), ``peak_rss_sampled_bytes`` the highest RSS sampled while this model was loaded
and run, ``rss_after_bytes - rss_before_load_bytes`` what loading and running it added.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moequant.errors import MoequantError

log = logging.getLogger(__name__)

# The prompt text: fixed, plain English, tokenized by each model's own tokenizer (repeated as needed).
PROMPT_TEXT = (
    "The river runs past the old mill and under the stone bridge, where the children of the village "
    "stop on their way to school to watch the water. In spring it carries snow from the hills and rises "
    "over the lower fields; in late summer it is slow and clear, and one can count the pebbles on its bed. "
    "The miller kept a record of its height for forty years, one line a day in a brown book, and when he "
    "died his daughter gave the book to the school. The teacher reads a page of it aloud each morning, "
    "and the class guesses whether the river was higher or lower than it is today. "
)
RANDOM_IDS_SEED = 0


@dataclass(frozen=True)
class BenchSettings:
    """What ``bench`` measures. tokens: decode steps (new tokens) per sequence; prompt: prompt tokens per
    sequence; prefill: tokens of the prefill sequence (0 = no prefill measurement); batches: decode batch
    sizes; repeats: timed runs (median); kernels: ``auto`` (fast paths) or ``reference`` (pure torch)."""

    tokens: int = 32
    prompt: int = 16
    prefill: int = 512
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 3
    kernels: str = "auto"

    def __post_init__(self) -> None:
        from moequant.kernels.select import MODES

        if self.tokens < 1:
            raise ValueError(f"--tokens must be >= 1, got {self.tokens}")
        if self.prompt < 1:
            raise ValueError(f"--prompt must be >= 1, got {self.prompt}")
        if self.prefill < 0:
            raise ValueError(f"--prefill must be >= 0 (0: no prefill measurement), got {self.prefill}")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError(f"--batch sizes must be >= 1, got {' '.join(map(str, self.batches)) or 'none'}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.kernels not in MODES:
            raise ValueError(f"--kernels {self.kernels!r}: expected one of {', '.join(MODES)}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "batches": list(self.batches)}


# ------------------------------------------------------------------------------------------------ inputs

def token_stream(tokenizer: Any, vocab_size: int, n: int) -> tuple[torch.Tensor, str]:
    """``n`` token ids [n] (int64) from the model's tokenizer on ``PROMPT_TEXT`` repeated, or seeded random
    ids below ``vocab_size`` when there is no tokenizer -> (ids, how they were made)."""
    if tokenizer is not None:
        once = tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
        ids = [int(i) for i in once if 0 <= int(i) < vocab_size]
        if ids:
            reps = -(-n // len(ids))
            return torch.tensor((ids * reps)[:n], dtype=torch.long), "tokenizer on moequant.bench.PROMPT_TEXT"
    g = torch.Generator().manual_seed(RANDOM_IDS_SEED)
    return (torch.randint(0, vocab_size, (n,), generator=g, dtype=torch.long),
            f"random ids, torch.Generator seed {RANDOM_IDS_SEED}")


def prompt_batch(tokenizer: Any, vocab_size: int, batch: int, length: int) -> tuple[torch.Tensor, str]:
    """[batch, length] prompt ids: BOS (when the tokenizer has one) then consecutive windows of
    ``token_stream``, one per sequence -> (ids, how they were made). Sequence 0 is the same for every batch
    size."""
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    body = length - (1 if bos is not None else 0)
    ids, how = token_stream(tokenizer, vocab_size, batch * body)
    ids = ids.view(batch, body)
    if bos is not None:
        ids = torch.cat([torch.full((batch, 1), int(bos), dtype=torch.long), ids], dim=1)
        how = "BOS + " + how
    return ids, how


def vocab_size_of(model: nn.Module) -> int:
    v = getattr(model.config, "vocab_size", None)
    if not v:
        v = model.get_output_embeddings().weight.shape[0]
    return int(v)


def check_positions(limit: Any, settings: BenchSettings, what: str) -> None:
    """The longest sequence must fit the model's positions (``max_position_embeddings``, when known)."""
    need = max(settings.prompt + settings.tokens, settings.prefill)
    if isinstance(limit, int) and limit > 0 and need > limit:
        raise MoequantError(f"{what}: --prompt + --tokens / --prefill need {need} positions, the model has "
                            f"{limit} (max_position_embeddings)")


# ------------------------------------------------------------------------------------------------ timing

def decode_run(model: nn.Module, prompt: torch.Tensor, steps: int, expert_counts: dict[str, Any] | None = None
               ) -> tuple[torch.Tensor, float]:
    """Greedy decode with the KV cache: ``prompt`` [B, P] minus its last token in one untimed forward, then
    ``steps`` timed single-token steps -> (new tokens [B, steps], seconds of the steps). With
    ``expert_counts`` (a dict), the experts every ``QuantExperts`` computes during the steps (not the prompt)
    are counted into it (``count_routed_experts``; a run that counts is not one to time)."""
    from moequant.nn.quant_experts import count_routed_experts

    with torch.inference_mode():
        past = None
        if prompt.shape[1] > 1:
            past = model(input_ids=prompt[:, :-1], use_cache=True).past_key_values
        nxt = prompt[:, -1:]  # [B, 1]
        out = []
        counting = count_routed_experts(model) if expert_counts is not None else contextlib.nullcontext({})
        t0 = time.perf_counter()
        with counting as counts:
            for _ in range(steps):
                r = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = r.past_key_values
                nxt = r.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
                out.append(nxt)
        seconds = time.perf_counter() - t0
        if expert_counts is not None:
            expert_counts.update(counts)
    return torch.cat(out, dim=1), seconds


def _takes_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def prefill_run(model: nn.Module, ids: torch.Tensor) -> float:
    """Seconds of one forward over ``ids`` [1, L] with the KV cache on, last-position logits only."""
    kw = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=True, **kw)
        return time.perf_counter() - t0


def _timing(seconds: list[float], work: int) -> dict[str, Any]:
    med = statistics.median(seconds)
    return {"seconds": med, "seconds_all": [round(s, 6) for s in seconds],
            "tokens_per_s": work / med if med > 0 else float("inf")}


def time_decode(model: nn.Module, prompt: torch.Tensor, steps: int, repeats: int) -> dict[str, Any]:
    """Warm-up, then ``repeats`` timed decode runs of ``prompt`` [B, P]: the median and every run. The warm-up
    counts the routed experts each decode step computes (models with ``QuantExperts``): ``experts_computed``
    of ``experts_total`` (what computing every expert would be), summed over layers and steps."""
    from moequant.eval.perplexity import expert_totals

    counts: dict[str, Any] = {}
    decode_run(model, prompt, steps, counts)  # warm-up: first-call work (kernel builds, repacking, allocator)
    runs = [decode_run(model, prompt, steps) for _ in range(repeats)]
    new = runs[0][0]  # [B, steps]
    same = all(torch.equal(new, r[0]) for r in runs[1:])
    b = prompt.shape[0]
    t = _timing([s for _, s in runs], b * steps)
    return {"batch": b, "sequences": int(new.shape[0]), "new_tokens_per_sequence": int(new.shape[1]),
            "prompt_tokens": int(prompt.shape[1]), **t, "tokens_per_s_per_sequence": t["tokens_per_s"] / b,
            "ms_per_step": 1000.0 * t["seconds"] / steps, "repeats_identical": same,
            "generated_ids": new[0].tolist(),
            **{k: v for k, v in expert_totals(counts).items() if k != "experts_per_layer"}}


def time_prefill(model: nn.Module, ids: torch.Tensor, repeats: int) -> dict[str, Any]:
    prefill_run(model, ids)  # warm-up
    return {"tokens": int(ids.shape[1]), "logits": "last position" if _takes_logits_to_keep(model) else "all",
            **_timing([prefill_run(model, ids) for _ in range(repeats)], int(ids.shape[1]))}


# ------------------------------------------------------------------------------------------------ memory

def attached_tensor_bytes(model: nn.Module) -> int:
    """Bytes of tensors held in module attributes (also inside dicts, lists, tuples and objects with a
    ``data`` dict, one level down) that are not parameters or buffers, unique storages only: where kernels
    keep what they build at run time."""
    seen = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())
            if t.device.type != "meta"}
    total = 0

    def visit(v: Any, depth: int) -> None:
        nonlocal total
        if isinstance(v, torch.Tensor):
            if v.device.type == "meta":
                return
            ptr = v.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += v.untyped_storage().nbytes()
        elif depth < 2 and isinstance(v, dict):
            for x in v.values():
                visit(x, depth + 1)
        elif depth < 2 and isinstance(v, (list, tuple)):
            for x in v:
                visit(x, depth + 1)
        elif depth < 2 and isinstance(getattr(v, "data", None), dict):  # a QuantizedTensor kept on a module
            visit(v.data, depth + 1)

    for mod in model.modules():
        for k, v in vars(mod).items():
            if k not in ("_parameters", "_buffers", "_modules"):
                visit(v, 0)
    return total


def memory_of(model: nn.Module) -> dict[str, Any]:
    from moequant.runs import model_sizes

    sizes = model_sizes(model)
    extra = attached_tensor_bytes(model)
    total = sizes["resident_bytes"] + extra
    return {**sizes, "attached_tensor_bytes": extra, "resident_total_bytes": total,
            "resident_mib": total / 2**20}


# ------------------------------------------------------------------------------------------------ runs

def bench_loaded(model: nn.Module, tokenizer: Any, settings: BenchSettings, what: str = "model") -> dict[str, Any]:
    """Every measurement of ``settings`` on a loaded model, under its kernel mode."""
    from moequant.kernels.select import kernels

    check_positions(getattr(model.config, "max_position_embeddings", None), settings, what)
    vocab = vocab_size_of(model)
    out: dict[str, Any] = {"decode": [], "prefill": None}
    with kernels(settings.kernels):
        for b in settings.batches:
            prompt, how = prompt_batch(tokenizer, vocab, b, settings.prompt)
            out["prompt_ids"] = prompt[0].tolist()
            out["prompt_source"] = how
            log.info("%s: decode batch %d, %d prompt + %d new tokens, %d runs", what, b, settings.prompt,
                     settings.tokens, settings.repeats)
            out["decode"].append(time_decode(model, prompt, settings.tokens, settings.repeats))
        if settings.prefill:
            ids, _ = prompt_batch(tokenizer, vocab, 1, settings.prefill)
            log.info("%s: prefill %d tokens, %d runs", what, settings.prefill, settings.repeats)
            out["prefill"] = time_prefill(model, ids, settings.repeats)
    out["memory"] = memory_of(model)
    return out


def bench_spec(spec: str, settings: BenchSettings, verify: bool = True, label: str | None = None) -> dict[str, Any]:
    """Load ``spec`` (like ``eval ppl`` does), bench it, free it."""
    from moequant.models.loader import load_model
    from moequant.runinfo import RssSampler, current_rss_bytes, peak_rss_bytes, return_free_memory

    return_free_memory()
    rss0 = current_rss_bytes()
    with RssSampler() as sampler:
        t0 = time.perf_counter()
        model, tokenizer, resolved = load_model(spec, verify=verify)
        load_s = time.perf_counter() - t0
        res = bench_loaded(model, tokenizer, settings, spec)
        rss_after = current_rss_bytes()
    from moequant import api

    packed = api.packed_modules(model)
    formats = sorted({qt.format_id + (f"({qt.inner.format_id})" if hasattr(qt, "inner") else "")
                      for qt in packed.values()})
    out = {"label": label or spec, "model": spec, "source": resolved.kind, "kernels": settings.kernels,
           "packed_tensors": len(packed), "formats": formats, "load_seconds": round(load_s, 3), **res,
           "rss_before_load_bytes": rss0, "rss_after_bytes": rss_after,
           "peak_rss_sampled_bytes": sampler.peak_bytes, "peak_rss_bytes": peak_rss_bytes(),
           "torch_threads": torch.get_num_threads()}
    del model, tokenizer
    return_free_memory()
    return out


def base_model_of(run: str | Path) -> str:
    """The model a moequant run was quantized from: ``report.json``'s ``model`` (the spec ``quantize`` was
    given: a zoo alias, a path as typed then — tried as is, then beside the run — or a hub id)."""
    from moequant.eval.runs_io import report_naming_model

    run = Path(run)
    rep = report_naming_model(run)
    if rep is None:
        raise MoequantError(f"--base: {run} has no report.json naming the model it was quantized from "
                            "(bench that model on its own)")
    spec = rep.model
    p = Path(spec).expanduser()
    if not p.is_absolute() and not p.exists() and (run.parent / p).exists():
        return str(run.parent / p)
    return spec


def ratios(run: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """``run`` over ``base``: decode tokens/s per batch size, prefill tokens/s, resident bytes."""
    out: dict[str, Any] = {"decode": {}}
    bd = {d["batch"]: d for d in base["decode"]}
    for d in run["decode"]:
        if d["batch"] in bd:
            out["decode"][str(d["batch"])] = d["tokens_per_s"] / bd[d["batch"]]["tokens_per_s"]
    if run.get("prefill") and base.get("prefill"):
        out["prefill"] = run["prefill"]["tokens_per_s"] / base["prefill"]["tokens_per_s"]
    out["resident"] = run["memory"]["resident_total_bytes"] / base["memory"]["resident_total_bytes"]
    return out


@dataclass(frozen=True)
class BenchJob:
    model: str
    settings: BenchSettings = BenchSettings()
    threads: int | None = None  # torch.set_num_threads; None: as the process starts
    base: bool = False  # also bench the run's unquantized model, in this process
    verify: bool = True


def run_bench(job: BenchJob, argv: list[str] | None = None) -> dict[str, Any]:
    """The base model (``--base``) first, then ``job.model``; ratios when both ran."""
    from moequant.models.loader import resolve_model_spec
    from moequant.runinfo import peak_rss_bytes, run_info

    resolved = resolve_model_spec(job.model)  # a bad spec fails before any work
    base_spec = None
    if job.base:
        if resolved.kind != "moequant":
            raise MoequantError(f"--base: {job.model} is not a moequant checkpoint (it is a {resolved.kind} model)")
        base_spec = base_model_of(resolved.path)
    for spec in filter(None, (base_spec, job.model)):  # before any model is loaded, where config.json says
        r = resolved if spec == job.model else resolve_model_spec(spec)
        if r.kind in ("alias", "dir", "moequant") and not r.gguf_file:
            from moequant.models.loader import read_model_config

            check_positions(read_model_config(r.path).get("max_position_embeddings"), job.settings, spec)
    if job.threads is not None:
        torch.set_num_threads(job.threads)
    runs = []
    if base_spec is not None:
        runs.append(bench_spec(base_spec, job.settings, job.verify, label="base"))
    runs.append(bench_spec(job.model, job.settings, job.verify, label="model"))
    out = {"model": job.model, "base_model": base_spec, "settings": job.settings.to_dict(),
           "threads": torch.get_num_threads(), "runs": runs,
           "ratio_vs_base": ratios(runs[-1], runs[0]) if base_spec is not None else None,
           "peak_rss_bytes": peak_rss_bytes(), **run_info(argv)}
    return out


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per benched model."""
    batches = result["settings"]["batches"]
    head = ["model", "kernels", *[f"decode b{b} tok/s" for b in batches], "prefill tok/s", "resident MiB",
            "peak RSS MiB (sampled)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["runs"]:
        dec = [f"{d['tokens_per_s']:.2f}" + (f" ({100 * d['experts_computed'] / d['experts_total']:.0f}% of experts)"
                                              if d.get("experts_total") else "") for d in r["decode"]]
        pre = f"{r['prefill']['tokens_per_s']:.1f}" if r.get("prefill") else "-"
        lines.append(f"| {r['label']}: {r['model']} | {r['kernels']} | " + " | ".join(dec) +
                     f" | {pre} | {r['memory']['resident_mib']:.1f} | {r['peak_rss_sampled_bytes'] / 2**20:.0f} |")
    rv = result.get("ratio_vs_base")
    if rv:
        parts = [f"decode b{b} x{v:.2f}" for b, v in rv["decode"].items()]
        if "prefill" in rv:
            parts.append(f"prefill x{rv['prefill']:.2f}")
        parts.append(f"resident x{rv['resident']:.3f}")
        lines += ["", "model vs base: " + ", ".join(parts)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI

def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    b = subparsers.add_parser("bench", help="decode and prefill tokens/s, resident memory and peak RSS of a model")
    b.add_argument("model", help="moequant checkpoint (run directory), zoo alias, HF directory, .gguf or hub id")
    b.add_argument("--tokens", type=int, default=32, help="new tokens per sequence (timed decode steps; default 32)")
    b.add_argument("--prompt", type=int, default=16, help="prompt tokens per sequence, BOS included (default 16)")
    b.add_argument("--prefill", type=int, default=512, help="tokens of the prefill measurement (default 512; 0: skip)")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="decode batch sizes (default 1 8)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the median counts (default 3)")
    b.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    b.add_argument("--kernels", default="auto", choices=["auto", "reference"],
                   help="auto: fast paths where they apply; reference: the pure-torch decode + matmul")
    b.add_argument("--base", action="store_true",
                   help="also bench the unquantized model the run was made from (its report.json), same process")
    b.add_argument("--json", help="write the full result to this file")
    b.add_argument("--no-verify", action="store_true",
                   help="skip the SHA-256 check of a moequant checkpoint's tensors (faster load; see README)")
    b.set_defaults(func=cmd_bench)
    return b


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        settings = BenchSettings(tokens=args.tokens, prompt=args.prompt, prefill=args.prefill,
                                 batches=tuple(args.batch), repeats=args.repeats, kernels=args.kernels)
    except ValueError as e:
        raise MoequantError(str(e)) from None
    if args.threads is not None and args.threads < 1:
        raise MoequantError(f"--threads must be >= 1, got {args.threads}")
    if args.json:
        from moequant.fsutil import check_json_output

        check_json_output(args.json)
    job = BenchJob(args.model, settings, threads=args.threads, base=args.base, verify=not args.no_verify)
    result = run_bench(job, sys.argv[1:])
    if args.json:
        from moequant.fsutil import atomic_write_json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.json), result)
    print(table(result))
    return 0
