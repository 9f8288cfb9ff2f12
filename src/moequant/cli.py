"""Command line: parses arguments into typed jobs and calls ``moequant.runs``; prints results."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from moequant.calib.cli_args import add_calib_arguments
from moequant.errors import MoequantError, one_line
from moequant.interrupt import interrupt_exit_code, sigterm_as_interrupt


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _given(args: argparse.Namespace, name: str) -> bool:
    """Was the method flag ``name`` passed (its parser default is None or False)?"""
    v = getattr(args, name, None)
    return v is not None and v is not False


def _method_flag_names() -> list[str]:
    """Every method's own flags (``formats.methods``): given with another method they are an error, not ignored."""
    from moequant.formats.methods import METHODS

    return [f.dest for f in METHODS.flags()]


def _method_config(args: argparse.Namespace):
    """The config of ``--method``, built by its registered entry from the flags that belong to it."""
    from moequant.formats.methods import METHODS

    if args.method not in METHODS:
        raise MoequantError(f"unknown --method {args.method!r}")
    method = METHODS.get(args.method)
    own = {f.dest for f in method.flags}
    for n in _method_flag_names():
        if n not in own and _given(args, n):
            raise MoequantError(f"{_flag(n)} does not apply to --method {args.method}")
    try:
        return method.from_flags(lambda name, default: default if getattr(args, name) is None else getattr(args, name))
    except ValueError as e:
        raise MoequantError(str(e)) from None


def _recipe(args: argparse.Namespace):
    from moequant.alloc.recipe import DEFAULT_KEEP, Recipe

    if args.recipe:
        given = [n for n in _method_flag_names() if _given(args, n)]
        given += [n for n in ("bits",) if _given(args, n)] + (["method"] if args.method is not None else [])
        if given:
            raise MoequantError(f"--recipe sets every method option; drop {', '.join(_flag(n) for n in given)}")
        eh = [n for n in ("embeddings", "head") if getattr(args, n, None) is not None]
        if eh:
            raise MoequantError(f"--recipe sets every method option; drop {', '.join(_flag(n) for n in eh)} "
                                "(write kind:embedding / kind:head rules into the recipe instead)")
        path = Path(args.recipe)
        if not path.is_file():
            raise MoequantError(f"--recipe {path}: no such file")
        try:
            return Recipe.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as e:
            raise MoequantError(f"--recipe {path}: {e}") from None
    if args.method is None:
        args.method = "int"
    keep = DEFAULT_KEEP + tuple(args.keep or ())
    config = _method_config(args)
    try:
        recipe = Recipe.uniform(config, keep=keep)
    except ValueError as e:  # a --keep pattern that is not a valid rule (bad regex, unknown kind:)
        raise MoequantError(f"--keep: {e}") from None
    return _with_embed_head(recipe, args)


def _with_embed_head(recipe, args: argparse.Namespace):
    """``recipe`` with the ``--embeddings`` / ``--head`` rules in front (they win over the default keeps)."""
    from moequant.alloc.defaults import embed_head_rules
    from moequant.alloc.recipe import Recipe, Rule

    rules = embed_head_rules(getattr(args, "embeddings", None), getattr(args, "head", None))
    return Recipe(tuple(Rule(p, c) for p, c in rules) + recipe.rules) if rules else recipe


def _add_embed_head_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("embeddings and output head (default: kept, their values unchanged: in float32, or packed "
                             "in Q8_0's int8 grid where every value already lies on it; always round to nearest)")
    choices = ["keep", "int8", "int6", "int4"]
    g.add_argument("--embeddings", default=None, choices=choices,
                   help="quantize the input embedding table: int8 = symmetric group 64 (8.25 bits/weight, like "
                   "llama.cpp's Q8_0), int6 = symmetric group 64 with clip search (6.25), int4 = asymmetric group 32 "
                   "with clip search (4.625); a lookup decodes only the rows it needs. A tied head "
                   "(tie_word_embeddings) is the same table: give --head the same choice. keep = float32 as loaded, "
                   "even where the table would pack losslessly")
    g.add_argument("--head", default=None, choices=choices,
                   help="quantize the output head (lm_head), same choices; tied to the embeddings: give both")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    from moequant.formats.methods import METHODS

    # Method flags default to None so that a flag given to a method it does not apply to is an error.
    g = p.add_argument_group("method (defaults: int4, asymmetric, group 128, MSE clip search; see README 'Defaults')")
    g.add_argument("--method", default=None, choices=[m.name for m in METHODS.ordered()], help="codec (default int)")
    g.add_argument("--bits", type=int, default=None,
                   help="bits per weight code: --method int 2, 3, 4, 5, 6, 8 (default 4); --method trellis 1-4 (default 2)")
    for f in METHODS.flags():
        if f.switch:
            g.add_argument(_flag(f.dest), action="store_true", help=f.help)
        else:
            g.add_argument(_flag(f.dest), type=f.type, default=None, choices=None if f.choices is None
                           else list(f.choices), help=f.help)
    g.add_argument("--recipe", help="JSON recipe file (replaces every method flag)")
    g.add_argument("--keep", action="append", help="extra parameter pattern to keep in full precision "
                   "(exact name or re:REGEX), repeatable")


def _add_solver_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("solver and calibration")
    g.add_argument("--solver", default="auto", choices=["auto", "rtn", "ldlq"],
                   help="rtn: round to nearest; ldlq: GPTQ/BlockLDLQ error feedback with calibration Hessians; "
                   "auto (default): ldlq for int at 4 bits and fewer, the trellis, additive and the GGUF block types "
                   "but q8_0; rtn at 5+ bits, for nf4/fp4 and q8_0")
    g.add_argument("--incoherence", default="auto", choices=["auto", "none", "rht"],
                   help="rht: random Hadamard transform with random signs on both sides before quantizing; "
                   "auto (default): rht with ldlq (never for additive or the GGUF block types), none with rtn")
    g.add_argument("--damp", type=float, default=0.01, help="Hessian damping λ (H + λ·mean(diag H)·I), default 0.01")
    g.add_argument("--act-order", action="store_true", help="LDLQ columns by decreasing Hessian diagonal")
    g.add_argument("--seed", type=int, default=0, help="seed of the RHT sign vectors (default 0)")
    g.add_argument("--rht-transform", default="paley-outer", choices=["paley-outer", "paley", "hartley"],
                   help="the Hadamard-type transform of --incoherence rht: paley-outer (default: H_n = B_m (x) H_p, "
                   "the Paley block outside), paley (H_p (x) B_m, runs before format rht v2; slower at run time) or "
                   "hartley (C_o (x) H_p over the odd part only: fastest, entries up to sqrt(2/n) instead of 1/sqrt(n))")
    add_calib_arguments(g, data_help="default ptb when the solver is ldlq; its train split is used", samples=128)
    g.add_argument("--hessian", default="per-expert", choices=["per-expert", "layer-mean", "layer-token-weighted"],
                   help="Hessian of each expert: its own routed tokens (default), or a layer aggregate")
    g.add_argument("--min-expert-tokens", type=int, default=None,
                   help="experts with fewer routed calibration tokens are 'starved' (default: see README)")
    g.add_argument("--starved-policy", default="shrink", choices=["shrink", "layer", "rtn"],
                   help="what a starved expert's Hessian becomes (default shrink towards the layer's)")
    g.add_argument("--offload", action="store_true",
                   help="hold one decoder layer's weights in memory at a time (streamed from the safetensors "
                   "files) and keep calibration activations in files")


def _solver_and_calib(args: argparse.Namespace, recipe):
    """The solver, calibration and Hessian configs; ``auto`` settings resolved from the recipe's methods.
    Logs the recipe that will run and, before any work, a warning when it is known to collapse models."""
    from moequant.alloc.defaults import AUTO, auto_incoherence, auto_solver, collapse_warning, describe
    from moequant.calib.data import CalibData
    from moequant.layerwise import HessianConfig
    from moequant.solvers.config import SolverConfig

    from moequant.alloc.recipe import OPT_IN_KINDS

    eh_patterns = {f"kind:{k}" for k in OPT_IN_KINDS}
    configs = [r.config for r in recipe.rules if r.config is not None and r.pattern not in eh_patterns]
    name = args.solver
    if name == AUTO:
        name = "ldlq" if any(auto_solver(c) == "ldlq" for c in configs) else "rtn"
    inc = auto_incoherence(name, configs) if args.incoherence == AUTO else args.incoherence
    try:
        solver = SolverConfig(solver=name, damp=args.damp, act_order=args.act_order, incoherence=inc, seed=args.seed,
                              rht_transform=args.rht_transform)
        calib = None
        if args.calib or solver.needs_hessian:
            calib = CalibData(data=args.calib or "ptb", split="train", samples=args.calib_samples,
                              seqlen=args.calib_seqlen, seed=args.calib_seed)
        hessian = HessianConfig(mode=args.hessian, min_expert_tokens=args.min_expert_tokens,
                                starved_policy=args.starved_policy)
    except ValueError as e:
        raise MoequantError(str(e)) from None
    if args.calib_batch_size < 1:
        raise MoequantError(f"--calib-batch-size must be >= 1, got {args.calib_batch_size}")
    log = logging.getLogger("moequant")
    said: set[str] = set()
    for c in configs:
        lines = [("info", "recipe: " + describe(c, solver.solver, solver.incoherence, calib.data if calib else None)
                  + (f" ({calib.samples} x {calib.seqlen} tokens)" if calib else "")),
                 ("warning", collapse_warning(c, solver.solver))]
        for level, line in lines:
            if line and line not in said:
                said.add(line)
                getattr(log, level)("%s", line)
    for r in recipe.rules:
        if r.config is not None and r.pattern in eh_patterns:
            log.info("%s: %s, round-to-nearest", r.pattern[5:], r.config.short_name)
    return solver, calib, hessian


def _check_json_arg(args: argparse.Namespace) -> None:
    """``--json``: writable (and not someone else's file) before any work, not after it."""
    if getattr(args, "json", None):
        from moequant.fsutil import check_json_output

        check_json_output(args.json)


def _print_json_or_table(result: dict[str, Any], json_path: str | None, lines: list[str]) -> None:
    if json_path:
        from moequant.fsutil import atomic_write_json

        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(json_path), result)
    print("\n".join(lines))


def cmd_quantize(args: argparse.Namespace) -> int:
    from moequant.runs import QuantizeJob, run_quantize

    recipe = _recipe(args)
    solver, calib, hessian = _solver_and_calib(args, recipe)
    job = QuantizeJob(args.model, recipe, Path(args.out), overwrite=args.overwrite,
                      kept_dtype=args.kept_dtype, progress=not args.quiet, solver=solver, calib=calib,
                      hessian=hessian, calib_batch_size=args.calib_batch_size, offload=args.offload,
                      resume=args.resume)
    r = run_quantize(job, sys.argv[1:])
    lines = []
    if r.get("table") and not args.quiet:
        lines += [r["table"], ""]
    lines += [f"quantized {len(r['quantized_tensors'])} tensors, kept {len(r['kept_tensors'])} -> {r['out']}",
             f"  bits/weight (quantized tensors): {r['bits_per_weight']:.4f}",
             f"  bits/weight (whole model):       {r['bits_per_weight_model']:.4f}",
             f"  checkpoint: {r['checkpoint_bytes'] / 2**20:.1f} MiB, resident: {r['resident_bytes'] / 2**20:.1f} MiB "
             f"(ideal {r['ideal_bytes'] / 2**20:.1f} MiB)",
             f"  report: {Path(r['out']) / 'report.json'}"]
    ls = r.get("layer_seconds") or {}
    if ls.get("restored"):
        n = len(r.get("layers") or [])
        total = "unknown (stored by an older moequant)" if ls["total"] is None else f"{ls['total']:.0f} s"
        lines.insert(-1, f"  resumed: {ls['restored']} of {n} layers came from the interrupted run(s); this run's "
                         f"layers {ls['this_run']:.0f} s, all layers over every run: {total}")
    for t in r.get("exact_tensors", []):
        also = f" (also {', '.join(t['shared_with'])})" if t.get("shared_with") else ""
        grid = (f"source GGUF's {t['method'][5:].upper()} blocks" if t["method"].startswith("gguf-")
                else f"{t['method']} grid")
        lines.insert(-1, f"  kept, stored exactly in the {grid} (every value unchanged): {t['name']}{also}, "
                         f"{t['nbytes'] / 2**20:.1f} MiB instead of {math.prod(t['shape']) * 4 / 2**20:.1f}")
    _print_json_or_table(r, None, lines)
    return 0


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    _check_json_arg(args)
    from moequant.runs import PplJob, finish_ppl_progress, run_ppl

    job = PplJob(args.model, data=args.data, split=args.split, seqlen=args.seqlen, stride=args.stride,
                 add_bos=not args.no_bos, batch_size=args.batch_size, max_tokens=args.max_tokens,
                 progress=not args.quiet, verify=not args.no_verify)
    if args.resume and not args.json:
        raise MoequantError("eval ppl --resume needs --json (the progress is kept beside that file)")
    r = run_ppl(job, sys.argv[1:], out_json=Path(args.json) if args.json else None, resume=args.resume)
    lo, hi = r["ci95"]
    lines = [f"{args.model} {args.data}/{args.split}: PPL {r['ppl']:.3f} [95% CI {lo:.3f}, {hi:.3f}] over "
             f"{r['tokens']} tokens, {r['n_windows']} windows of {r['seqlen']}"]
    if r.get("experts_total"):  # a model with QuantExperts: the routed experts its passes decoded
        lines.append(f"routed experts computed: {r['experts_computed']} of {r['experts_total']} "
                     f"({100 * r['experts_computed'] / r['experts_total']:.1f}% of a dense pass)")
    _print_json_or_table(r, args.json, lines)
    if args.json:
        finish_ppl_progress(Path(args.json))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    _check_json_arg(args)
    from moequant.runs import run_inspect

    r = run_inspect(Path(args.path), verify=not args.no_verify)
    fmts = [t["format"] for t in r["quantized_tensors"]] + ["kept, exact " + t["format"] for t in r.get("exact_tensors", [])]
    w = max([22, *map(len, fmts)])  # the format column (rotated tensors name their rule and inner format)
    lines = [f"{'tensor':60s} {'format':{w}s} {'shape':>18s} {'bits/w':>7s}"]
    for t in r["quantized_tensors"]:
        lines.append(f"{t['name']:60s} {t['format']:{w}s} {str(tuple(t['shape'])):>18s} {t['bits_per_weight']:7.3f}")
    for t in r.get("exact_tensors", []):
        lines.append(f"{t['name']:60s} {'kept, exact ' + t['format']:{w}s} {str(tuple(t['shape'])):>18s} "
                     f"{t['bits_per_weight']:7.3f}")
    lines.append(f"kept in full precision: {len(r['kept_tensors'])} tensors, {r['kept_bytes'] / 2**20:.1f} MiB")
    for t in r["kept_tensors"]:
        lines.append(f"  {t['name']:58s} {t['dtype']:10s} {str(tuple(t['shape'])):>18s}")
    lines.append(f"bits/weight: {r['bits_per_weight']:.4f} (quantized tensors), "
                 f"{r['bits_per_weight_model']:.4f} (whole model)")
    lines.append(f"checkpoint {r['checkpoint_bytes']} B, resident {r['resident_bytes']} B, ideal {r['ideal_bytes']} B "
                 f"(resident/ideal {r['resident_over_ideal']:.4f})")
    _print_json_or_table(r, args.json, lines)
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from moequant.zoo.corpora import CORPORA, SPLITS, load_text, refresh_corpus
    from moequant.zoo.fetch import cache_lock, cache_root
    from moequant.zoo.models import (CARVED_MODELS, GGUF_MODELS, TRAINED_MODELS, alias_state, refresh_alias,
                                     resolve_alias, verify_alias)

    if args.zoo_cmd == "list":
        from moequant.zoo.carve.presets import CARVE_PRESETS

        described = {**{a: s.description for a, s in GGUF_MODELS.items()},
                     **{a: f"tiny OLMoE trained here (`moequant zoo build {a}`)" for a in TRAINED_MODELS},
                     **{a: f"{CARVE_PRESETS[a].description} (`moequant zoo build {a}`)" for a in CARVED_MODELS}}
        print("models (each with what the cache holds):")
        for a, text in described.items():
            print(f"  {a:24s} {text}\n  {'':24s} -> {alias_state(a)}")
        print("corpora:")
        for a, c in CORPORA.items():
            print(f"  {a:24s} {c.description} (train/valid/test)")
        print(f"cache: {cache_root()}")
        return 0
    if args.zoo_cmd in ("fetch", "verify") and args.alias in CORPORA:  # every split is SHA-256 checked on load
        if args.zoo_cmd == "fetch" and args.refresh:
            refresh_corpus(args.alias)
        for split in SPLITS:
            load_text(args.alias, split)
        print(cache_root() / "corpora" / args.alias)
        return 0
    if args.zoo_cmd == "fetch":
        print(refresh_alias(args.alias) if args.refresh else resolve_alias(args.alias))
        return 0
    if args.zoo_cmd == "verify":
        r = verify_alias(args.alias)
        print(f"{r['alias']}: {r['files']} files, {r['bytes'] / 2**20:.1f} MiB match the SHA-256 of their manifest "
              f"({r['path']})")
        return 0
    if args.zoo_cmd == "build":
        from moequant.fsutil import check_output
        from moequant.zoo.tiny_olmoe import VARIANTS, build_tiny_olmoe, replaceable_build

        if args.alias == "moe" or args.alias in CARVED_MODELS:
            return _zoo_build_carved(args)
        _refuse_carve_flags(args)
        if args.resume:
            raise MoequantError(f"--resume: only carved builds keep their progress (`zoo build moe`, "
                                f"{', '.join(CARVED_MODELS)}); {args.alias} trains in minutes and starts over")
        if args.alias not in VARIANTS:
            raise MoequantError(f"cannot build {args.alias!r} (buildable: {', '.join([*VARIANTS, *CARVED_MODELS])}, "
                                f"or `moe --from MODEL`)")
        out = Path(args.out) if args.out else cache_root() / "models" / args.alias
        check_output(out, args.overwrite, "--out", is_ours=replaceable_build(args.alias),
                     kind=f"a previous build of {args.alias} (its training.json) or an empty directory")
        cfg = VARIANTS[args.alias]
        with cache_lock(f"model-{args.alias}"):  # resolve_alias waits for a build into the cache
            print(build_tiny_olmoe(out, args.alias, config=cfg, progress=not args.quiet))
        return 0
    raise MoequantError(f"unknown zoo command {args.zoo_cmd!r}")


_CARVE_FLAGS = ("source", "arch", "experts", "top_k", "shared_fraction", "calib", "calib_samples", "calib_seqlen",
                "calib_seed", "router_balance", "router_steps", "fit_rounds", "no_refit_down",
                "recover_steps", "recover_params",
                "recover_seqlen", "recover_batch", "recover_lr", "recover_experts_lr", "recover_samples",
                "recover_schedule", "carve_seed")


def _add_carve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("carving a dense model into an MoE (`zoo build moe`; defaults in brackets)")
    g.add_argument("--from", dest="source", help="dense model: zoo alias, HF directory, .gguf or hub id "
                   "(Llama / Mistral / Qwen2 / Qwen3)")
    g.add_argument("--arch", choices=["qwen2_moe", "olmoe", "mixtral", "qwen3_moe"], help="target [qwen2_moe]")
    g.add_argument("--experts", type=int, help="routed experts per layer [8]")
    g.add_argument("--top-k", type=int, help="routed experts per token [2]")
    g.add_argument("--shared-fraction", type=float, help="MLP neurons in the shared expert (Qwen2-MoE) or "
                   "replicated in every expert (the others) [0.25]")
    add_calib_arguments(g, data_help="default ptb, train split", samples=64, batch_size=False, defer_defaults=True)
    g.add_argument("--router-balance", type=float, help="weight of the load-balancing loss (Switch Transformer's, "
                   "1 when uniform) in each layer's router fit [0]")
    g.add_argument("--router-steps", type=int, help="Adam steps fitting each layer's router [150]")
    g.add_argument("--fit-rounds", type=int, help="(router fit, down refit) rounds per layer [1]")
    g.add_argument("--no-refit-down", action="store_true", default=None,
                   help="keep the dense down projections (no least-squares refit)")
    g.add_argument("--recover-steps", type=int, help="end-to-end distillation steps after carving [0]")
    g.add_argument("--recover-params", help="what the distillation trains: comma list of routers, norms, experts "
                   "[routers,norms]")
    g.add_argument("--recover-seqlen", type=int, help="distillation window [256]")
    g.add_argument("--recover-batch", type=int, help="distillation windows per step [4]")
    g.add_argument("--recover-lr", type=float, help="distillation learning rate of routers and norms [1e-3]")
    g.add_argument("--recover-experts-lr", type=float, help="distillation learning rate of the experts [2e-5]")
    g.add_argument("--recover-samples", type=int, help="distinct distillation windows drawn from the training "
                   "text (0: the first --recover-seqlen tokens of each calibration window) [0]")
    g.add_argument("--recover-schedule", choices=["constant", "cosine"], help="learning rate after the warm-up "
                   "[constant]")
    g.add_argument("--carve-seed", type=int, help="seed of clustering, router fit and distillation [0]")
    g.add_argument("--eval-data", default="ptb", help="scored after the build: corpus alias (test split) or text file "
                   "[ptb]")
    g.add_argument("--eval-tokens", type=int, default=None, help="score only the first N tokens [all]")
    g.add_argument("--no-eval", action="store_true", help="skip the dense-vs-MoE perplexity after the build")
    g.add_argument("--dense-eval-from", metavar="BUILD", help="reuse the dense model's per-window losses of an "
                   "earlier build of the same --from on the same --eval-data and --eval-tokens (its directory or "
                   "training.json) instead of scoring the dense model again")


def _refuse_carve_flags(args: argparse.Namespace) -> None:
    given = [f for f in _CARVE_FLAGS if getattr(args, f, None) is not None]
    if given:
        flags = ", ".join("--" + ("from" if f == "source" else f.replace("_", "-"))
                          for f in given)
        raise MoequantError(f"{flags}: carving options apply to `moequant zoo build moe --from MODEL` only")


def _carve_spec(args: argparse.Namespace):
    """The CarveSpec of `zoo build moe` from the flags (unset flags keep CarveSpec's defaults)."""
    import dataclasses

    from moequant.calib.data import CalibData
    from moequant.zoo.carve.build import CarveSpec
    from moequant.zoo.carve.fit import FitSettings
    from moequant.zoo.carve.recover import RecoverSettings

    base = CarveSpec()

    def pick(name: str, default: Any) -> Any:
        v = getattr(args, name)
        return default if v is None else v

    try:
        calib = CalibData(data=pick("calib", base.calib.data), samples=pick("calib_samples", base.calib.samples),
                          seqlen=pick("calib_seqlen", base.calib.seqlen), seed=pick("calib_seed", base.calib.seed))
        seed = pick("carve_seed", base.seed)
        fit = FitSettings(balance=pick("router_balance", base.fit.balance),
                          router_steps=pick("router_steps", base.fit.router_steps),
                          rounds=pick("fit_rounds", base.fit.rounds), refit_down=not args.no_refit_down, seed=seed)
        r = base.recover
        params = tuple(s.strip() for s in args.recover_params.split(",")) if args.recover_params else r.params
        recover = RecoverSettings(steps=pick("recover_steps", r.steps), batch=pick("recover_batch", r.batch),
                                  seqlen=pick("recover_seqlen", r.seqlen), lr=pick("recover_lr", r.lr), params=params,
                                  experts_lr=pick("recover_experts_lr", r.experts_lr),
                                  samples=pick("recover_samples", r.samples),
                                  schedule=pick("recover_schedule", r.schedule), seed=seed)
    except ValueError as e:
        raise MoequantError(str(e)) from None
    for name, v in (("--router-steps", fit.router_steps), ("--fit-rounds", fit.rounds),
                    ("--recover-steps", recover.steps), ("--router-balance", fit.balance)):
        if v < 0:
            raise MoequantError(f"{name} must be >= 0, got {v}")
    for name, v in (("--recover-seqlen", recover.seqlen), ("--recover-batch", recover.batch)):
        if v < 1:
            raise MoequantError(f"{name} must be >= 1, got {v}")
    return dataclasses.replace(base, arch=pick("arch", base.arch), experts=pick("experts", base.experts),
                               top_k=pick("top_k", base.top_k),
                               shared_fraction=pick("shared_fraction", base.shared_fraction), calib=calib, fit=fit,
                               recover=recover, seed=seed)


def _zoo_build_carved(args: argparse.Namespace) -> int:
    from moequant.fsutil import check_output, is_empty_dir
    from moequant.zoo.carve.build import COLLAPSE_SHARE, build_moe, collapsed_layers, is_carve_build
    from moequant.zoo.fetch import cache_lock, cache_root

    if args.eval_tokens is not None and args.eval_tokens < 1:
        raise MoequantError(f"--eval-tokens must be >= 1, got {args.eval_tokens}")
    if args.alias == "moe":
        if not args.source:
            raise MoequantError("`zoo build moe` needs --from MODEL (a dense zoo alias, HF directory or .gguf)")
        if not args.out:
            raise MoequantError("`zoo build moe` needs --out DIR")
        source, spec, alias, out = args.source, _carve_spec(args), None, Path(args.out)
    else:
        from moequant.zoo.carve.presets import CARVE_PRESETS

        _refuse_carve_flags(args)
        preset = CARVE_PRESETS[args.alias]
        source, spec, alias = preset.source, preset.spec, preset.alias
        out = Path(args.out) if args.out else cache_root() / "models" / alias
    from moequant.zoo.carve.progress import build_work_dir

    if not (args.resume and build_work_dir(out).is_dir()):  # else: perhaps stopped after the output was in place
        check_output(out, args.overwrite, "--out", is_ours=lambda p: is_empty_dir(p) or is_carve_build(p),
                     kind="a previous carved build (its training.json) or an empty directory")

    def run() -> dict:
        return build_moe(source, out, spec, overwrite=args.overwrite, eval_tokens=args.eval_tokens,
                         evaluate=not args.no_eval, eval_data=args.eval_data, alias=alias, progress=not args.quiet,
                         dense_eval_from=Path(args.dense_eval_from) if args.dense_eval_from else None,
                         resume=args.resume)

    if alias is not None and not args.out:
        with cache_lock(f"model-{alias}"):  # resolve_alias waits for a build into the cache
            prov = run()
    else:
        prov = run()
    ev = prov.get("eval")
    line = f"{out}: {prov['spec']['arch']} {prov['spec']['experts']} experts top-{prov['spec']['top_k']}, " \
           f"{prov['active_fraction']:.0%} of the MLP active, {prov['seconds']['total']:.0f} s"
    if ev:
        lo, hi = ev["ratio_ci95"]
        line += f"; PPL {ev['ppl_moe']:.2f} vs dense {ev['ppl_dense']:.2f} (x{ev['ratio']:.3f} [{lo:.3f}, {hi:.3f}], " \
                f"{ev['tokens']} {args.eval_data} tokens)"
    print(line)
    if ev and (dead := collapsed_layers(ev["routing"], prov["spec"]["top_k"])):
        print(f"warning: routing collapsed in {len(dead)} of {len(ev['routing'])} layers ({_ranges(dead)}): their "
              f"top-{prov['spec']['top_k']} experts take >= {COLLAPSE_SHARE:.0%} of the routed {args.eval_data} tokens, "
              f"so the other experts are nearly unused there (eval.routing in {out / 'training.json'})", file=sys.stderr)
    return 0


def _ranges(xs: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    runs: list[list[int]] = []
    for x in xs:
        if runs and x == runs[-1][-1] + 1:
            runs[-1].append(x)
        else:
            runs.append([x])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def cmd_demo(args: argparse.Namespace) -> int:
    from moequant.sweep import SweepJob, demo_configs, run_sweep

    try:
        entries = demo_configs(tuple(args.bits), args.group_size, args.solver, args.incoherence, args.calib_samples)
    except ValueError as e:
        raise MoequantError(str(e)) from None
    job = SweepJob(model=args.model, entries=entries,
                   out=Path(args.out), max_tokens=args.max_tokens or None, overwrite=args.overwrite,
                   progress=not args.quiet)
    r = run_sweep(job, sys.argv[1:])
    print(r["table"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moequant", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model and write a packed checkpoint")
    q.add_argument("model", help="zoo alias, local HF directory, .gguf file, or hub id")
    q.add_argument("--out", required=True, help="output directory (must not exist)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted run to --out from its last finished layer (same model and "
                   "options; progress is kept in .<out-name>.moequant-run beside --out until the run ends)")
    q.add_argument("--kept-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the tensors kept in full precision (default: as loaded)")
    _add_method_args(q)
    _add_embed_head_args(q)
    _add_solver_args(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="eval_cmd", required=True)
    pp = esub.add_parser("ppl", help="perplexity in windows, with a bootstrap CI")
    pp.add_argument("model", help="checkpoint directory, zoo alias, HF directory, .gguf or hub id")
    pp.add_argument("--data", default="ptb", help="corpus alias (ptb, shakespeare, wikitext2, c4) or a text file")
    pp.add_argument("--split", default="test", choices=["train", "valid", "test"])
    pp.add_argument("--seqlen", type=int, default=512)
    pp.add_argument("--stride", type=int, default=None, help="window stride (default: seqlen, no overlap)")
    pp.add_argument("--no-bos", action="store_true", help="do not prepend BOS to each window")
    pp.add_argument("--batch-size", type=int, default=4)
    pp.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the split")
    pp.add_argument("--json", help="write the full result (per-window NLL included) to this file; the scored "
                    "windows are kept beside it (.<name>.ppl-progress.json) until it is written")
    pp.add_argument("--resume", action="store_true",
                    help="continue an interrupted run to --json from its last scored batch (same model, data and "
                    "options); the result is the uninterrupted run's")
    pp.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of a moequant checkpoint's tensors (faster load; see README)")
    pp.set_defaults(func=cmd_eval_ppl)
    from moequant.eval.tasks_cli import add_tasks_parser

    add_tasks_parser(esub)

    i = sub.add_parser("inspect", help="per-tensor formats, bits/weight and sizes of a checkpoint")
    i.add_argument("path")
    i.add_argument("--json", help="write the result to this file")
    i.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of a moequant checkpoint's tensors (faster load; see README)")
    i.set_defaults(func=cmd_inspect)

    z = sub.add_parser("zoo", help="built-in models and corpora")
    zsub = z.add_subparsers(dest="zoo_cmd", required=True)
    zsub.add_parser("list", help="list aliases")
    zf = zsub.add_parser("fetch", help="assemble a model or corpus alias into the cache")
    zf.add_argument("alias")
    zf.add_argument("--refresh", action="store_true", help="delete the alias's cache entry and make it again")
    zv = zsub.add_parser("verify", help="check every file of an alias's cache entry against its SHA-256")
    zv.add_argument("alias")
    zb = zsub.add_parser("build", help="train a tiny OLMoE fixture (tiny-olmoe, tiny-olmoe-collapsed), build a "
                         "carved MoE alias (smollm2-moe, ...), or carve any dense model: `moe --from MODEL`")
    zb.add_argument("alias", help="a buildable alias, or `moe` with --from and --out")
    zb.add_argument("--out", help="directory (default: the cache; required for `moe`)")
    zb.add_argument("--overwrite", action="store_true")
    zb.add_argument("--resume", action="store_true",
                    help="carved builds: continue an interrupted build of the same job from its progress beside --out "
                         "(carved layers, scored windows, the distillation's state); same result as an uninterrupted build")
    _add_carve_args(zb)
    z.set_defaults(func=cmd_zoo)

    d = sub.add_parser("demo", help="quantize a zoo model at several bit widths, report size and PPL")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--bits", type=int, nargs="+", default=[4, 3],
                   help="widths to run (default 4 3; add 2 for int2, which loses most of the quality: see README)")
    d.add_argument("--group-size", type=int, default=128,
                   help="input columns per scale (default 128, as quantize; SmolLM2's 576 ends in a partial group of 64)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--max-tokens", type=int, default=16384, help="PTB test tokens to score (default 16384; 0 = the whole split)")
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--solver", default="auto", choices=["auto", "rtn", "ldlq"],
                   help="auto (default, as quantize): LDLQ with PTB calibration at every width")
    d.add_argument("--incoherence", default="auto", choices=["auto", "none", "rht"],
                   help="auto (default): rht with ldlq")
    d.add_argument("--calib-samples", type=int, default=32,
                   help="calibration windows of 512 PTB train tokens for the LDLQ rows (default 32; quantize uses 128)")
    d.set_defaults(func=cmd_demo)

    from moequant.compare_job import add_compare_parser

    add_compare_parser(sub)
    from moequant.bench import add_bench_parser

    add_bench_parser(sub)
    from moequant.finetune.cli import add_finetune_parser
    add_finetune_parser(sub)
    from moequant.export.cli import add_export_parser

    add_export_parser(sub)
    return p


class _StderrHandler(logging.StreamHandler):
    """Logs to whatever ``sys.stderr`` is when a record is emitted (not the stream of the first call), so
    ``main`` can run many times in one process (tests capture and close stderr between calls)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", handlers=[_StderrHandler()])
    # Expected failures are MoequantErrors raised where they are detected: one line, exit 2 (-v: the
    # traceback). Anything else is a bug and keeps its traceback (exit 1).
    try:
        with sigterm_as_interrupt():  # SIGTERM unwinds like Ctrl-C: temp files and directories are removed
            return args.func(args)
    except MoequantError as e:
        if args.verbose:
            raise
        print(f"moequant: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("moequant: interrupted", file=sys.stderr)
        return interrupt_exit_code(e)  # 130 for Ctrl-C, 143 for SIGTERM


if __name__ == "__main__":
    sys.exit(main())
