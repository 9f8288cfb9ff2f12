"""Quantizing the input embeddings and the output head, on request only (``quantize --embeddings`` /
``--head``, or recipe rules ``kind:embedding`` / ``kind:head``): finding them, checking the request
against the model, rounding them to nearest and swapping in the packed modules.

- The embedding table becomes a ``QuantEmbedding`` (a lookup decodes only the rows it needs), so its
  format must decode row by row (int, NF4/FP4 without double quant).
- An untied head becomes a ``QuantLinear`` (any format).
- A tied head (``tie_word_embeddings``: the head *is* the embedding table) is quantized once, with the
  table: the head becomes a ``TiedQuantLinear`` over the ``QuantEmbedding``'s packed tensor, and the
  checkpoint stores it once (``quantization_config.tied``). Asking for one without the other, or for two
  different methods, is an error that says so.

Always round to nearest, whatever the solver of the decoder layers: no Hessian reaches these tables
(llama.cpp quantizes its output tensors the same way). The embeddings are quantized before the first
decoder layer, so calibration sees what the packed model will; the head after the last.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moequant.alloc.recipe import Recipe
from moequant.codecs.config import MethodConfig
from moequant.errors import MoequantError
from moequant.models.adapters import Target
from moequant.report import QuantReport, TensorRecord
from moequant.solvers.config import SolverConfig

log = logging.getLogger(__name__)

EMBEDDING, HEAD = "embedding", "head"


@dataclass(frozen=True)
class EmbedHeadPlan:
    """What the recipe asks of a model's embeddings and head. ``embedding`` / ``head``: the targets
    (None when the model has no ``nn.Embedding`` input embeddings / no ``nn.Linear`` output head);
    ``tied``: the head shares the embedding table; configs None: kept; rules: the deciding patterns."""

    embedding: Target | None
    head: Target | None
    tied: bool
    embed_config: MethodConfig | None = None
    embed_rule: str | None = None
    head_config: MethodConfig | None = None
    head_rule: str | None = None

    @property
    def quantizes(self) -> bool:
        return self.embed_config is not None or self.head_config is not None


def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.is_meta or b.is_meta:
        return False
    return (a.untyped_storage().data_ptr(), a.storage_offset(), a.shape) == \
        (b.untyped_storage().data_ptr(), b.storage_offset(), b.shape)


def embed_head_targets(model: nn.Module) -> tuple[Target | None, Target | None, bool]:
    """(input embedding target, output head target, tied) of a causal LM; a target is None when the model
    has no such ``nn.Embedding`` / ``nn.Linear`` (e.g. it is already packed). ``layer`` is -1: neither
    lives in a decoder layer."""
    def get(attr: str) -> nn.Module | None:
        fn = getattr(model, attr, None)
        try:
            return fn() if callable(fn) else None
        except (NotImplementedError, AttributeError):
            return None

    emb, head = get("get_input_embeddings"), get("get_output_embeddings")
    targets: list[Target | None] = []
    for mod, cls, kind in ((emb, nn.Embedding, EMBEDDING), (head, nn.Linear, HEAD)):
        name = _module_name(model, mod) if isinstance(mod, cls) else None
        targets.append(None if name is None else
                       Target(f"{name}.weight" if name else "weight", name, "weight", kind, tuple(mod.weight.shape), -1))
    tied = targets[0] is not None and targets[1] is not None and _same_tensor(head.weight, emb.weight)
    return targets[0], targets[1], tied


def _says(config: MethodConfig | None, rule: str | None, what: str) -> str:
    how = "kept" if config is None else f"quantized {config.short_name}"
    by = f"rule {rule!r}" if rule else "no rule matched"
    return f"{what} {how} ({by})"


def plan_embed_head(model: nn.Module, recipe: Recipe, warn: bool = True) -> EmbedHeadPlan:
    """Match the embeddings and the head against ``recipe`` and check the result: a tied pair gets one
    method or none, the embeddings a row-decodable format, both a config that can store their shape.
    Every failure is a one-line ``MoequantError``. A ``kind:`` rule with a method for a module the model
    lacks is a warning (``warn``) and ignored."""
    from moequant.formats.registry import tensor_class_for
    from moequant.nn.quant_embedding import check_row_local

    emb, head, tied = embed_head_targets(model)
    ec, er = recipe.match(emb.name, EMBEDDING) if emb is not None else (None, None)
    hc, hr = recipe.match(head.name, HEAD) if head is not None else (None, None)
    if warn:
        for target, kind, what in ((emb, EMBEDDING, "input embeddings (nn.Embedding)"),
                                   (head, HEAD, "output head (nn.Linear lm_head)")):
            if target is None and any(r.pattern == f"kind:{kind}" and r.config is not None for r in recipe.rules):
                log.warning("the model has no %s: rule kind:%s ignored", what, kind)
    if tied and ec != hc:
        raise MoequantError(
            f"{emb.name} and {head.name} are one tied tensor (tie_word_embeddings): {_says(ec, er, 'embeddings')} "
            f"but {_says(hc, hr, 'head')}; one packed table serves both, so quantize them alike "
            f"(--embeddings X --head X, or kind:embedding and kind:head rules with one config) or keep both")
    for target, config, rule in ((emb, ec, er), (None if tied else head, hc, hr)):
        if target is None or config is None:
            continue
        try:
            cls = tensor_class_for(config)
            if target.kind == EMBEDDING:
                check_row_local(cls)
            cls.expected_bits_per_weight(target.shape, config)
        except ValueError as e:
            raise MoequantError(f"{target.name} {target.shape} (rule {rule!r}): {e}") from None
    return EmbedHeadPlan(emb, head, tied, ec, er, hc, hr)


def _record(t: Target, rule: str | None, config: MethodConfig, qt: Any, seconds: float,
            shared_with: list[str] | None) -> TensorRecord:
    return TensorRecord(t.name, t.kind, t.shape, rule, config.short_name, qt.bits_per_weight(), qt.nbytes(),
                        solver="rtn", seconds=round(seconds, 3), shared_with=shared_with)


def quantize_embedding(model: nn.Module, plan: EmbedHeadPlan, report: QuantReport) -> None:
    """Round the embedding table to nearest under ``plan.embed_config`` and swap in a ``QuantEmbedding``
    (and, when tied, a ``TiedQuantLinear`` head over it); record it in ``report``."""
    from moequant.layerwise import set_module
    from moequant.nn.quant_embedding import QuantEmbedding, TiedQuantLinear
    from moequant.solvers.solve import solve_tensor

    t = plan.embedding
    old = model.get_submodule(t.module)
    w = old.weight.detach()  # [V, H]
    qt, info = solve_tensor(w, plan.embed_config, SolverConfig(), None, t.name)
    scale = getattr(old, "embed_scale", None)
    if scale is not None and not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale))
    new = QuantEmbedding(qt, scale, dtype=w.dtype, padding_idx=old.padding_idx)
    set_module(model, t.module, new)
    shared = None
    if plan.tied:
        head = model.get_submodule(plan.head.module)
        set_module(model, plan.head.module, TiedQuantLinear(new, head.bias))
        shared = [plan.head.name]
    report.tensors.append(_record(t, plan.embed_rule, plan.embed_config, qt, info.seconds, shared))


def quantize_head(model: nn.Module, plan: EmbedHeadPlan, report: QuantReport) -> None:
    """Round an untied head to nearest under ``plan.head_config`` and swap in a ``QuantLinear`` (a tied
    head was packed with the embeddings)."""
    from moequant.layerwise import set_module
    from moequant.nn.quant_linear import QuantLinear
    from moequant.solvers.solve import solve_tensor

    if plan.tied or plan.head_config is None:
        return
    t = plan.head
    old = model.get_submodule(t.module)
    qt, info = solve_tensor(old.weight.detach(), plan.head_config, SolverConfig(), None, t.name)  # [V, H]
    set_module(model, t.module, QuantLinear(qt, old.bias))
    report.tensors.append(_record(t, plan.head_rule, plan.head_config, qt, info.seconds, None))


def refuse_offloaded(model: nn.Module, recipe: Recipe) -> None:
    """``--offload`` copies the embeddings and the head byte for byte: a recipe that quantizes them is an error."""
    plan = plan_embed_head(model, recipe, warn=False)
    if plan.quantizes:
        raise MoequantError("--offload copies the embeddings and the head unchanged; quantizing them (--embeddings, "
                            "--head, kind:embedding / kind:head rules) needs the in-memory path: drop --offload")
