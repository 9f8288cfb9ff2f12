"""Per-architecture data: where the decoder layers, the quantizable linears and the fused 3-D experts
live. Adapters are data, not code paths: one runner serves every architecture. What is kept in full
precision by default (routers, norms, embeddings, head, Qwen2-MoE's shared-expert gate) is the
recipe's ``DEFAULT_KEEP``; the router is never a target at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from moequant.errors import MoequantError


@dataclass(frozen=True)
class ModelAdapter:
    """Where things live in a ``transformers`` causal LM of one ``model_type``.

    layers: dotted path of the decoder ``ModuleList``.
    experts: path of the fused experts module inside a layer (``None`` for dense models); it holds
        ``gate_up_proj [E, 2I, H]`` (gate rows first, then up) and ``down_proj [E, H, I]``.
    router: path of the router inside a layer (never a target: kept in full precision).
    dense_layers: some decoder layers may hold a dense MLP instead of the experts and router
        (Qwen3-MoE / Qwen2-MoE ``mlp_only_layers``, ``decoder_sparse_step``); on every other adapter a
        layer without the declared ``experts`` or ``router`` module is an error, so a renamed path can
        never leave the experts silently unquantized.
    disk_renames: ``(in-memory, on-disk)`` substrings where a checkpoint written by ``save_pretrained``
        names a module differently (Mixtral's ``mlp.`` is ``block_sparse_moe.`` on disk).
    disk_expert_names: the per-expert linear names on disk for (gate, up, down); the fused tensors are
        ``gate_up_proj[e] = cat(gate, up)`` and ``down_proj[e] = down``.
    """

    model_type: str
    layers: str = "model.layers"
    experts: str | None = None
    router: str | None = None
    expert_params: tuple[str, ...] = ("gate_up_proj", "down_proj")
    dense_layers: bool = False
    disk_renames: tuple[tuple[str, str], ...] = ()
    disk_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


_DENSE = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "gemma")
_MOE = ("olmoe", "qwen3_moe", "qwen2_moe", "mixtral")

ADAPTERS: dict[str, ModelAdapter] = {
    **{t: ModelAdapter(t) for t in _DENSE},
    **{t: ModelAdapter(t, experts="mlp.experts", router="mlp.gate", dense_layers=t in ("qwen3_moe", "qwen2_moe"))
       for t in _MOE},
}
ADAPTERS["mixtral"] = ModelAdapter("mixtral", experts="mlp.experts", router="mlp.gate",
                                   disk_renames=((".mlp.", ".block_sparse_moe."),), disk_expert_names=("w1", "w3", "w2"))


def adapter_for(model_or_type: nn.Module | str) -> ModelAdapter:
    model_type = model_or_type if isinstance(model_or_type, str) else getattr(model_or_type.config, "model_type", "?")
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise MoequantError(f"unsupported architecture {model_type!r} (supported: {', '.join(sorted(ADAPTERS))})") from None


@dataclass(frozen=True)
class Target:
    """A weight that a recipe may quantize.

    name: full parameter name (``model.layers.0.mlp.experts.gate_up_proj``).
    module: full name of the module that owns it; kind: ``linear`` (2-D ``[N, K]``) or ``experts``
    (3-D ``[E, N, K]``); layer: decoder layer index.
    """

    name: str
    module: str
    param: str
    kind: str
    shape: tuple[int, ...]
    layer: int


def decoder_layers(model: nn.Module, adapter: ModelAdapter) -> nn.ModuleList:
    layers = model.get_submodule(adapter.layers)
    if not isinstance(layers, nn.ModuleList):
        raise MoequantError(f"{adapter.model_type}: {adapter.layers} is not a ModuleList")
    return layers


def iter_targets(model: nn.Module, adapter: ModelAdapter) -> Iterator[Target]:
    """Every quantizable weight in decoder order: ``nn.Linear`` weights and fused expert tensors.
    The router is skipped (it is never a target)."""
    for i, layer in enumerate(decoder_layers(model, adapter)):
        prefix = f"{adapter.layers}.{i}"
        experts, router = _moe_modules(layer, prefix, adapter)
        for mname, mod in layer.named_modules():
            if mod is router:
                continue
            full = f"{prefix}.{mname}" if mname else prefix
            if experts is not None and mod is experts:
                for p in adapter.expert_params:
                    t = getattr(mod, p, None)
                    if not (isinstance(t, torch.Tensor) and t.dim() == 3):
                        raise MoequantError(f"{adapter.model_type}: {full}.{p} is not a fused [E, N, K] expert "
                                            f"tensor ({type(t).__name__}); this transformers version lays the "
                                            f"experts out differently than moequant's adapter expects")
                    yield Target(f"{full}.{p}", full, p, "experts", tuple(t.shape), i)
            elif isinstance(mod, nn.Linear):
                yield Target(f"{full}.weight", full, "weight", "linear", tuple(mod.weight.shape), i)


def _moe_modules(layer: nn.Module, prefix: str, adapter: ModelAdapter) -> tuple[nn.Module | None, nn.Module | None]:
    """(experts, router) of one decoder layer; (None, None) for a dense model or, where the adapter
    allows it, a dense layer (neither module present). A declared path that does not resolve otherwise
    is an error naming the layer and the path."""
    if adapter.experts is None:
        return None, _get(layer, adapter.router) if adapter.router else None
    experts = _get(layer, adapter.experts)
    router = _get(layer, adapter.router) if adapter.router else None
    if experts is None and router is None and adapter.dense_layers:
        return None, None
    for path, mod in ((adapter.experts, experts), (adapter.router, router)):
        if path is not None and mod is None:
            raise MoequantError(f"{adapter.model_type}: decoder layer {prefix} has no module {path!r} (the "
                                f"{adapter.model_type} adapter expects its {'experts' if path == adapter.experts else 'router'} "
                                f"there); refusing to quantize with experts missing")
    return experts, router


def _get(layer: nn.Module, path: str) -> nn.Module | None:
    """The submodule at ``path``, or None when the path does not resolve."""
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None
