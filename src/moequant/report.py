"""What ``quantize`` did: every target weight (quantized or kept, by which rule), every tensor kept in
full precision (targets a rule kept and everything that is not a target: embeddings, norms, head,
routers), the solver's proxy losses, calibration token counts, starved experts and shared-input groups."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn


@dataclass
class TensorRecord:
    name: str
    kind: str
    shape: tuple[int, ...]
    rule: str | None
    method: str | None  # config short name, None when kept
    bits_per_weight: float | None = None
    nbytes: int = 0
    solver: str | None = None
    proxy: float | None = None  # mean over experts of tr(ΔHΔᵀ)/tr(WHWᵀ)
    proxy_per_expert: list[float] | None = None
    tokens: int | None = None  # calibration tokens behind the Hessian
    expert_tokens: list[int] | None = None  # routed tokens per expert
    seconds: float | None = None
    shared_with: list[str] | None = None  # other parameters stored as this one packed tensor (a tied head)


@dataclass
class KeptTensor:
    """A tensor stored in full precision. rule: the recipe pattern that kept a target, or
    ``"not a target"`` (embeddings, norms, head, routers, biases); tied_to: the tensor whose storage it
    shares (a tied head), its bytes then counted once in the totals."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    rule: str
    tied_to: str | None = None


NOT_A_TARGET = "not a target"
EXACT = "exact"  # TensorRecord.solver of a kept table stored packed, every value unchanged (embed_head)


@dataclass
class StarvedRecord:
    tensor: str
    expert: int
    tokens: int
    policy: str


@dataclass
class LayerRecord:
    """One decoder layer's wall time in the layer loop (calibration passes, solves, the pass that feeds the
    next layer; not the checkpoint writes). restored: taken over from an earlier, interrupted run by
    ``quantize --resume``; seconds is that run's time, or None when the layer was stored by a moequant
    that did not record it."""

    layer: int
    seconds: float | None
    restored: bool = False


@dataclass
class QuantReport:
    """The report attached to a quantized model as ``model.moequant_report``."""

    recipe: dict[str, Any]
    solver: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    tensors: list[TensorRecord] = field(default_factory=list)
    starved: list[StarvedRecord] = field(default_factory=list)
    shared_inputs: list[list[str]] = field(default_factory=list)
    kept_tensors: list[KeptTensor] = field(default_factory=list)  # filled by record_kept(model)
    layers: list[LayerRecord] = field(default_factory=list)  # in the order the layer loop met them

    def record_kept(self, model: nn.Module) -> None:
        """List every full-precision tensor the quantized ``model`` stores (its state dict minus the
        packed data), with the rule that kept it."""
        self.kept_tensors = kept_tensors(model, {t.name: t.rule for t in self.kept})

    def kept_totals(self) -> dict[str, int]:
        """Tensors, weights and bytes kept in full precision (tied tensors counted once)."""
        own = [k for k in self.kept_tensors if k.tied_to is None]
        return {"tensors": len(self.kept_tensors), "weights": sum(math.prod(k.shape) for k in own),
                "bytes": sum(k.nbytes for k in own)}

    @property
    def quantized(self) -> list[TensorRecord]:
        """Tensors rounded to a method (not the kept tables stored exactly: ``exact``)."""
        return [t for t in self.tensors if t.method is not None and t.solver != EXACT]

    @property
    def exact(self) -> list[TensorRecord]:
        """Kept tables stored packed with every value unchanged (``embed_head.with_exact_grids``)."""
        return [t for t in self.tensors if t.method is not None and t.solver == EXACT]

    @property
    def kept(self) -> list[TensorRecord]:
        return [t for t in self.tensors if t.method is None]

    def bits_per_weight(self) -> float:
        """Every stored bit of the quantized tensors / their number of weights."""
        q = self.quantized
        n = sum(math.prod(t.shape) for t in q)
        return 8.0 * sum(t.nbytes for t in q) / n if n else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "solver": self.solver, "calibration": self.calibration,
                "bits_per_weight": self.bits_per_weight(),
                "quantized_tensors": [asdict(t) for t in self.quantized],
                "exact_tensors": [asdict(t) for t in self.exact],
                "kept_tensors": [asdict(t) for t in self.kept_tensors],
                "kept_totals": self.kept_totals(),
                "starved_experts": [asdict(s) for s in self.starved],
                "shared_inputs": self.shared_inputs,
                "layers": [asdict(r) for r in self.layers],
                "layer_seconds": self.layer_seconds()}

    def layer_seconds(self) -> dict[str, Any]:
        """The layer loop's time over every run that made this checkpoint: ``total`` (None when a restored
        layer's time is unknown), ``this_run`` (the layers this run quantized) and ``restored`` (how many
        layers an earlier run quantized)."""
        known = [r.seconds for r in self.layers if r.seconds is not None]
        return {"total": round(sum(known), 2) if len(known) == len(self.layers) else None,
                "this_run": round(sum(r.seconds or 0.0 for r in self.layers if not r.restored), 2),
                "restored": sum(r.restored for r in self.layers)}

    def table(self) -> str:
        """A readable per-tensor table (markdown)."""
        lines = ["| tensor | method | bits/weight | proxy loss | tokens | seconds |", "|---|---|---|---|---|---|"]
        for t in self.tensors:
            proxy = "-" if t.proxy is None else f"{t.proxy:.4g}"
            tok = "-" if t.tokens is None else str(t.tokens)
            if t.expert_tokens is not None:
                tok = f"{sum(t.expert_tokens)} routed (min {min(t.expert_tokens)})"
            bpw = "-" if t.bits_per_weight is None else f"{t.bits_per_weight:.3f}"
            sec = "-" if t.seconds is None else f"{t.seconds:.1f}"
            method = t.method if t.method else f"kept ({t.rule})"
            if t.solver == EXACT:
                method = f"kept, stored exactly as {t.method} (lossless)"
            elif t.solver and t.method:
                method += f" {t.solver}"
            if t.shared_with:
                method += f" (also {', '.join(t.shared_with)})"
            lines.append(f"| {t.name} | {method} | {bpw} | {proxy} | {tok} | {sec} |")
        if self.starved:
            lines += ["", "Starved experts (fewer routed calibration tokens than the threshold):", "",
                      "| tensor | expert | tokens | policy |", "|---|---|---|---|"]
            lines += [f"| {s.tensor} | {s.expert} | {s.tokens} | {s.policy} |" for s in self.starved]
        if self.shared_inputs:
            lines += ["", "Tensors sharing one input Hessian: " +
                      "; ".join(", ".join(n.rsplit(".", 2)[-2] for n in g) for g in self.shared_inputs[:3]) +
                      (" ... (every layer alike)" if len(self.shared_inputs) > 3 else "")]
        return "\n".join(lines)


def kept_tensors(model: nn.Module, target_rules: dict[str, str | None]) -> list[KeptTensor]:
    """Every tensor of ``model``'s state dict that is not packed data, in state-dict order.
    ``target_rules``: recipe pattern of each target a rule kept (None: no rule matched)."""
    from moequant.nn.packed import packed_names, packed_tensor

    packed = {f"{m}.{p}_{d}" if m else f"{p}_{d}" for m, mod in model.named_modules() for p in packed_names(mod)
              for d in packed_tensor(mod, p).data}
    out: list[KeptTensor] = []
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name in packed:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        tied = seen.get(key) if t.device.type != "meta" else None
        seen.setdefault(key, name)
        rule = NOT_A_TARGET
        if name in target_rules:
            rule = target_rules[name] or "no rule matched"
        out.append(KeptTensor(name, tuple(t.shape), str(t.dtype).removeprefix("torch."),
                              t.numel() * t.element_size(), rule, tied))
    return out


def model_bit_count(model: nn.Module) -> dict[str, Any]:
    """The whole model's weights and bits: every packed tensor at its stored bits (``QuantizedTensor.nbytes``)
    and every other parameter at its dtype's bits; a tensor several modules share (a tied head, packed or
    not) counted once. Buffers (rotary tables, Gemma's embedding scale) are not weights and are not
    counted. -> ``{packed_weights, packed_bits, dense_weights, dense_bits, bits_per_weight}``."""
    from moequant.nn.packed import packed_names, packed_tensor

    seen: set[tuple[int, int, int]] = set()
    packed_w = packed_bits = 0
    for _, mod in model.named_modules():
        for p in packed_names(mod):
            qt = packed_tensor(mod, p)
            first = next(iter(qt.data.values()))
            key = _storage_key(first)
            if key in seen:
                continue
            seen.add(key)
            packed_w += qt.numel
            packed_bits += 8 * qt.nbytes()
    dense_w = dense_bits = 0
    for t in model.parameters():  # each Parameter once
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        dense_w += t.numel()
        dense_bits += 8 * t.numel() * t.element_size()
    total = packed_w + dense_w
    return {"packed_weights": packed_w, "packed_bits": packed_bits, "dense_weights": dense_w,
            "dense_bits": dense_bits, "bits_per_weight": (packed_bits + dense_bits) / total if total else float("nan")}


def _storage_key(t: Any) -> tuple[int, int, int]:
    if t.is_meta:
        return id(t), 0, t.numel()
    return t.untyped_storage().data_ptr(), t.storage_offset(), t.numel()
