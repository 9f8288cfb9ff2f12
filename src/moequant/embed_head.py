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

**Lossless packing of kept tables** (``with_exact_grids``): a table kept by the default rules (no rule names
it) whose float32 values lie exactly on one of llama.cpp's ``Q4_0`` / ``Q5_0`` / ``Q8_0`` grids (symmetric
int4 / int5 / int8 codes, one fp16 scale per 32 columns: a model converted from a GGUF file whose
embeddings or head are of those types, as SmolLM2's tied table (Q8_0) and Qwen2.5-Coder-0.5B's head (Q8_0)
and embeddings (Q5_0) are) is stored packed in that grid (the narrowest that holds it): every value the
same, bit for bit (``codecs.uniform.exact_symmetric_parts`` proves it group by group), at 4.5 / 5.5 / 8.5
bits/weight instead of 32, on disk and in memory. Nothing is rounded, so it is not counted as quantized
(``TensorRecord.solver`` is ``"exact"``; the report's ``bits_per_weight`` is the quantized targets' alone, the
whole-model figure counts it). A rule that names the table (``--embeddings keep`` / ``--head keep``, ``kind:embedding`` /
``kind:head`` or the exact name with no method) keeps it in float32 as loaded. The K-quant tables of
``Q4_K_M`` files (Q4_K embeddings, Q6_K head) are not provable from the values: those are taken from the source
GGUF's own blocks when they decode to the table bit for bit (``exact_gguf``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from moequant.alloc.recipe import Recipe
from moequant.codecs.config import MethodConfig
from moequant.errors import MoequantError
from moequant.models.adapters import Target
from moequant.report import EXACT, QuantReport, TensorRecord
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
    embed_exact: Any = None  # the packed QuantizedTensor holding the kept table's exact values (with_exact_grids)
    head_exact: Any = None

    @property
    def quantizes(self) -> bool:
        """Whether the embeddings or the head are swapped for packed modules (quantized or stored exactly)."""
        return self.embed_config is not None or self.head_config is not None or self.packs_exact

    @property
    def packs_exact(self) -> bool:
        return self.embed_exact is not None or self.head_exact is not None

    def exact_tables(self) -> dict[str, Any]:
        """``{parameter name: packed table}`` of the tables stored exactly (``with_exact_grids``)."""
        pairs = ((self.embedding, self.embed_exact), (self.head, self.head_exact))
        return {t.name: qt for t, qt in pairs if qt is not None}


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


def _record(t: Target, rule: str | None, short_name: str, qt: Any, seconds: float,
            shared_with: list[str] | None, solver: str = "rtn") -> TensorRecord:
    return TensorRecord(t.name, t.kind, t.shape, rule, short_name, qt.bits_per_weight(), qt.nbytes(),
                        solver=solver, seconds=round(seconds, 3), shared_with=shared_with)


def _exact_name(qt: Any) -> str:
    """The config short name of an exactly stored table's grid (e.g. ``int8-g32``), or its GGUF format
    (``gguf-q6_k``: the source GGUF's blocks, ``exact_gguf``)."""
    from moequant.nn.exact_head import exact_grid_config

    if qt.format_id.startswith("gguf-"):
        return qt.format_id
    return exact_grid_config(qt.attrs["bits"]).short_name


def _kept_by_default(config: MethodConfig | None, rule: str | None) -> bool:
    """Kept by no rule or by a catch-all ``re:`` rule (the default keeps), not by a rule that names the table."""
    return config is None and (rule is None or rule.startswith("re:"))


def with_exact_grids(model: nn.Module, plan: EmbedHeadPlan,
                     weight_of: Callable[[Target], torch.Tensor] | None = None,
                     source_gguf: Path | None = None) -> EmbedHeadPlan:
    """``plan`` with each table that the recipe keeps by default and whose values lie exactly on one of the
    group-32 fp16-scale grids (``Q4_0`` / ``Q5_0`` / ``Q8_0``: ``nn.exact_head.EXACT_GRIDS``) given its packed
    form, to be stored instead of the float table (module docstring); failing that, when the model was converted
    from the GGUF file ``source_gguf``, the table's own blocks there if they decode to it bit for bit
    (``exact_gguf``: the K-quant tables of ``Q4_K_M`` files). A tied pair is packed once, when neither side is
    kept by a rule that names it. ``weight_of(target)``: the table as float32 (default: the model's own
    parameter; ``--offload`` reads it from disk)."""
    from moequant.exact_gguf import exact_gguf_table
    from moequant.nn.exact_head import exact_packed_view

    def exact(target: Target | None, config: MethodConfig | None, rule: str | None) -> Any:
        if target is None or not _kept_by_default(config, rule):
            return None
        if weight_of is not None:
            w = weight_of(target).to(torch.float32)
        else:
            w = model.get_submodule(target.module).weight.detach()
        packed = exact_packed_view(w)
        if packed is None and source_gguf is not None:
            packed = exact_gguf_table(w, Path(source_gguf), target.kind)
        return packed

    embed = exact(plan.embedding, plan.embed_config, plan.embed_rule)
    if plan.tied:
        if embed is None or not _kept_by_default(plan.head_config, plan.head_rule):
            return plan
        return replace(plan, embed_exact=embed)
    return replace(plan, embed_exact=embed, head_exact=exact(plan.head, plan.head_config, plan.head_rule))


def quantize_embedding(model: nn.Module, plan: EmbedHeadPlan, report: QuantReport) -> None:
    """Round the embedding table to nearest under ``plan.embed_config`` and swap in a ``QuantEmbedding``
    (and, when tied, a ``TiedQuantLinear`` head over it); record it in ``report``."""
    from moequant.layerwise import set_module
    from moequant.nn.quant_embedding import QuantEmbedding, TiedQuantLinear
    from moequant.solvers.solve import solve_tensor

    t = plan.embedding
    old = model.get_submodule(t.module)
    w = old.weight.detach()  # [V, H]
    if plan.embed_exact is not None:
        qt, (record,) = plan.embed_exact, exact_records(plan)[0]
    else:
        qt, info = solve_tensor(w, plan.embed_config, SolverConfig(), None, t.name)
        record = _record(t, plan.embed_rule, plan.embed_config.short_name, qt, info.seconds,
                         [plan.head.name] if plan.tied else None)
    scale = getattr(old, "embed_scale", None)
    if scale is not None and not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale))
    new = QuantEmbedding(qt, scale, dtype=w.dtype, padding_idx=old.padding_idx)
    set_module(model, t.module, new)
    if plan.tied:
        head = model.get_submodule(plan.head.module)
        set_module(model, plan.head.module, TiedQuantLinear(new, head.bias))
    report.tensors.append(record)


def quantize_head(model: nn.Module, plan: EmbedHeadPlan, report: QuantReport) -> None:
    """Round an untied head to nearest under ``plan.head_config`` and swap in a ``QuantLinear`` (a tied
    head was packed with the embeddings)."""
    from moequant.layerwise import set_module
    from moequant.nn.quant_linear import QuantLinear
    from moequant.solvers.solve import solve_tensor

    if plan.tied or (plan.head_config is None and plan.head_exact is None):
        return
    t = plan.head
    old = model.get_submodule(t.module)
    if plan.head_exact is not None:
        qt, (record,) = plan.head_exact, exact_records(plan)[1]
    else:
        qt, info = solve_tensor(old.weight.detach(), plan.head_config, SolverConfig(), None, t.name)  # [V, H]
        record = _record(t, plan.head_rule, plan.head_config.short_name, qt, info.seconds, None)
    set_module(model, t.module, QuantLinear(qt, old.bias))
    report.tensors.append(record)


def exact_records(plan: EmbedHeadPlan) -> tuple[list[TensorRecord], list[TensorRecord]]:
    """The report records of ``plan``'s exactly stored tables, (before the layers, after them), as
    ``quantize_embedding`` / ``quantize_head`` write them (``--offload`` stores the tables itself)."""
    before = [] if plan.embed_exact is None else [
        _record(plan.embedding, plan.embed_rule, _exact_name(plan.embed_exact), plan.embed_exact, 0.0,
                [plan.head.name] if plan.tied else None, EXACT)]
    after = [] if plan.head_exact is None else [
        _record(plan.head, plan.head_rule, _exact_name(plan.head_exact), plan.head_exact, 0.0, None, EXACT)]
    return before, after


def refuse_offloaded(model: nn.Module, recipe: Recipe) -> None:
    """``--offload`` copies the embeddings and the head byte for byte: a recipe that quantizes them is an error."""
    plan = plan_embed_head(model, recipe, warn=False)
    if plan.quantizes:
        raise MoequantError("--offload copies the embeddings and the head unchanged; quantizing them (--embeddings, "
                            "--head, kind:embedding / kind:head rules) needs the in-memory path: drop --offload")
