"""Quantize a model decoder layer by decoder layer: pick each target's method from the recipe, (with
calibration) accumulate its Hessian on what the quantized earlier layers produce, solve, and swap in
the packed modules. ``api.quantize`` is the public entry."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moequant.alloc.recipe import Recipe
from moequant.embed_head import plan_embed_head, quantize_embedding, quantize_head, with_exact_grids
from moequant.errors import MoequantError
from moequant.fsutil import make_temp_dir
from moequant.models.adapters import ModelAdapter, Target, adapter_for, decoder_layers, iter_targets
from moequant.nn.quant_experts import QuantExperts
from moequant.nn.packed import packed_names, packed_tensor
from moequant.nn.quant_linear import QuantLinear
from moequant.report import LayerRecord, QuantReport, StarvedRecord, TensorRecord
from moequant.resume import RunProgress, records_mark, records_since
from moequant.solvers.config import SolverConfig
from moequant.solvers.solve import solve_tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HessianConfig:
    """Which Hessian an expert gets (``per-expert``, ``layer-mean``, ``layer-token-weighted``) and what
    happens to experts with fewer than ``min_expert_tokens`` routed tokens (``shrink``, ``layer``, ``rtn``)."""

    mode: str = "per-expert"
    min_expert_tokens: int | None = None  # None: calib.hessian.DEFAULT_MIN_EXPERT_TOKENS
    starved_policy: str = "shrink"

    def __post_init__(self) -> None:  # checked when the job is built, not after calibration
        if self.min_expert_tokens is not None and self.min_expert_tokens < 0:
            raise ValueError(f"--min-expert-tokens must be >= 0, got {self.min_expert_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "min_expert_tokens": self.resolved_min_tokens, "starved_policy": self.starved_policy}

    @property
    def resolved_min_tokens(self) -> int:
        from moequant.calib.hessian import DEFAULT_MIN_EXPERT_TOKENS

        return DEFAULT_MIN_EXPERT_TOKENS if self.min_expert_tokens is None else self.min_expert_tokens


@dataclass
class Calibration:
    """Calibration token windows ``tokens [S, L]`` and how to turn them into Hessians. ``spill_dir``:
    keep the layer activations in files there instead of memory (``True``: a temporary directory)."""

    tokens: torch.Tensor
    batch_size: int = 8
    hessian: HessianConfig = field(default_factory=HessianConfig)
    spill_dir: Path | bool | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.source, "sequences": int(self.tokens.shape[0]), "seqlen": int(self.tokens.shape[1]),
                "tokens": int(self.tokens.numel()), "batch_size": self.batch_size, "hessian": self.hessian.to_dict()}


def quantize_model(model: nn.Module, recipe: Recipe, calib: Calibration | None, solver: SolverConfig,
                   progress: bool = True, run: RunProgress | None = None,
                   source_gguf: Path | None = None) -> QuantReport:
    """``run``: store each finished layer there, and restore the layers it already holds instead of
    quantizing them again (``quantize --resume``). Embeddings and head, when the recipe asks for them
    (``moequant.embed_head``), are rounded to nearest: the embeddings before the first layer (calibration
    then sees the packed table), the head after the last; a resumed run quantizes them again (the same bytes).
    ``source_gguf``: the GGUF file the model was converted from, whose blocks may hold kept tables exactly
    (``embed_head.with_exact_grids``)."""
    adapter = adapter_for(model)
    targets = list(iter_targets(model, adapter))
    if not targets:
        raise MoequantError(f"{adapter.model_type}: found no linear or expert weights to quantize")
    check_recipe(targets, recipe)
    plan = with_exact_grids(model, plan_embed_head(model, recipe), source_gguf=source_gguf)
    if solver.needs_hessian and calib is None:
        raise MoequantError(f"solver {solver.solver!r} needs calibration data (pass calib=..., or --calib on the CLI)")
    report = QuantReport(recipe=recipe.to_dict(), solver=solver.to_dict(),
                         calibration=None if calib is None else calib.to_dict())
    if plan.embed_config is not None or plan.embed_exact is not None:
        quantize_embedding(model, plan, report)
    by_layer: dict[int, list[Target]] = {}
    for t in targets:
        by_layer.setdefault(t.layer, []).append(t)
    with _maybe_tmpdir(calib) as spill:
        runner = None
        if calib is not None:
            from moequant.calib.runner import LayerwiseRunner

            runner = LayerwiseRunner(model, adapter, calib.tokens, calib.batch_size, spill)
        layers = decoder_layers(model, adapter)
        bar = tqdm(sorted(by_layer), desc="quantize", unit="layer", disable=not progress)
        for layer in bar:
            bar.set_postfix_str(f"layer {layer}")
            if run is not None and run.is_done(layer):
                from moequant.resume import restore_layer_in_memory

                restore_layer_in_memory(run, layer, model, report)
                continue
            if run is not None:
                run.restore_inputs(runner)
            mark = records_mark(report)
            t0 = time.perf_counter()
            quantize_layer(model, adapter, layer, by_layer[layer], recipe, calib, solver, runner, report)
            report.layers.append(LayerRecord(layer, round(time.perf_counter() - t0, 2)))
            if run is not None:
                metas: dict[str, Any] = {}
                state = layer_state(layers[layer], f"{adapter.layers}.{layer}", metas)
                run.commit(layer, len(layers), state, metas, records_since(report, mark), runner)
    if plan.head_config is not None or plan.head_exact is not None:
        quantize_head(model, plan, report)
    if run is not None and plan.quantizes:
        run.store_embed_head_records(report)
    return report


def check_recipe(targets: list[Target], recipe: Recipe, model: nn.Module | None = None) -> None:
    """Fail before any work when a rule's config cannot store a target (e.g. a group size that does
    not divide the tensor's input dim), naming the tensor; with ``model``, also what the recipe asks of
    its embeddings and head (``embed_head.plan_embed_head``: tied weights, row-decodable formats)."""
    from moequant.formats.registry import tensor_class_for

    if model is not None:
        plan_embed_head(model, recipe, warn=False)

    for t in targets:
        config, _ = recipe.match(t.name, t.kind)
        if config is None:
            continue
        try:
            tensor_class_for(config).expected_bits_per_weight(t.shape, config)
        except ValueError as e:
            raise MoequantError(f"{t.name} {tuple(t.shape)}: {e}") from None


class _maybe_tmpdir:
    def __init__(self, calib: Calibration | None) -> None:
        self.calib, self.tmp = calib, None

    def __enter__(self) -> Path | None:
        if self.calib is None or not self.calib.spill_dir:
            return None
        if self.calib.spill_dir is True:  # named moequant-act-<pid>-...: cleaned by a later run if we are killed
            self.tmp = make_temp_dir(Path(tempfile.gettempdir()), kind="act")
            return self.tmp
        Path(self.calib.spill_dir).mkdir(parents=True, exist_ok=True)
        return Path(self.calib.spill_dir)

    def __exit__(self, *exc: Any) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def quantize_layer(model: nn.Module, adapter: ModelAdapter, layer: int, targets: list[Target], recipe: Recipe,
                    calib: Calibration | None, solver: SolverConfig, runner: Any, report: QuantReport) -> None:
    stats: dict[str, Any] = {}
    plan = [(t, *recipe.match(t.name, t.kind)) for t in targets]
    if runner is not None and any(cfg is not None for _, cfg, _ in plan):
        from moequant.calib.capture import LayerCapture

        prefix = f"{adapter.layers}.{layer}"
        with LayerCapture(runner.layers[layer], prefix, [t for t, cfg, _ in plan if cfg is not None], adapter) as cap:
            runner.run(layer, keep_outputs=False)
        stats = cap.result()
        report.shared_inputs.extend(g for g in cap.shared_groups() if len(g) > 1)
    experts: dict[str, dict[str, Any]] = {}
    for t, config, rule in plan:
        module = model.get_submodule(t.module)
        weight = getattr(module, t.param)
        if config is None:
            report.tensors.append(TensorRecord(t.name, t.kind, t.shape, rule, None, None,
                                               weight.numel() * weight.element_size()))
            if t.kind == "experts":
                experts.setdefault(t.module, {})[t.param] = weight.detach()
            continue
        hessian, h_eval, rec = _hessian_for(t, stats.get(t.name), calib, report)
        # what a user can get wrong here (non-finite weights, a solver without its Hessian) is a
        # MoequantError naming the tensor, raised inside; any other exception is a bug
        qt, info = solve_tensor(weight.detach(), config, solver, hessian, t.name, h_eval=h_eval)
        report.tensors.append(TensorRecord(
            t.name, t.kind, t.shape, rule, config.short_name, qt.bits_per_weight(), qt.nbytes(),
            solver=solver.short_name, proxy=info.mean_proxy, proxy_per_expert=info.proxy if t.kind == "experts" else None,
            seconds=round(info.seconds, 3), **rec))
        if t.kind == "linear":
            set_module(model, t.module, QuantLinear(qt, module.bias))
        else:
            experts.setdefault(t.module, {})[t.param] = qt
    for mname, parts in experts.items():
        if any(not isinstance(v, torch.Tensor) for v in parts.values()):
            old = model.get_submodule(mname)
            set_module(model, mname, QuantExperts(parts["gate_up_proj"], parts["down_proj"], old.act_fn))
    if runner is not None:
        runner.run(layer, keep_outputs=True)


def _hessian_for(t: Target, stat: Any, calib: Calibration | None, report: QuantReport
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, Any]]:
    """The undamped Hessian a target is solved with, the one its proxy loss is measured with (an
    expert's own ``H_e`` — its solve Hessian when it saw no token), and what to record."""
    if calib is None:
        return None, None, {}
    if stat is None:
        raise MoequantError(f"{t.name}: calibration captured no inputs for this tensor")
    if t.kind == "linear":
        return stat.mean(), None, {"tokens": int(stat.count)}
    from moequant.calib.hessian import expert_hessians

    hc = calib.hessian
    h, starved = expert_hessians(stat, hc.mode, min_tokens=hc.resolved_min_tokens, policy=hc.starved_policy)
    for s in starved:
        report.starved.append(StarvedRecord(t.name, s.expert, s.count, s.policy))
        log.warning("%s expert %d: %d routed calibration tokens (< %d): %s", t.name, s.expert, s.count,
                    hc.resolved_min_tokens, s.policy)
    seen = (stat.counts > 0)[:, None, None]
    h_eval = torch.where(seen, stat.mean_per_expert(), h)  # [E, K, K]
    return h, h_eval, {"expert_tokens": [int(c) for c in stat.counts.tolist()]}


def layer_state(layer: nn.Module, prefix: str, metas: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Packed tensors (``P_<data>``) and every other parameter / persistent buffer of a decoder layer, as
    the checkpoint stores them; the packed tensors' metas go to ``metas``."""
    out: dict[str, torch.Tensor] = {}
    packed_keys = set()
    for mname, mod in layer.named_modules():
        for p in packed_names(mod):
            full = f"{prefix}.{mname}.{p}" if mname else f"{prefix}.{p}"
            qt = packed_tensor(mod, p)
            metas[full] = qt.meta()
            out.update(qt.to_state_dict(full))
            packed_keys.update(f"{mname}.{p}_{d}" if mname else f"{p}_{d}" for d in qt.data)
    for name, t in layer.state_dict().items():
        if name not in packed_keys:
            out[f"{prefix}.{name}"] = t
    return out


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
