"""moequant's grouped routed-experts path as a transformers experts implementation named ``"moequant"``.

transformers (v5) decorates its fused experts classes (``OlmoeExperts``, ``Qwen2MoeExperts``,
``Qwen3MoeExperts``, ``MixtralExperts``, ...) with ``@use_experts_implementation``: their ``forward``
looks up ``self.config._experts_implementation`` in ``ALL_EXPERTS_FUNCTIONS`` on every call and runs
``fn(self, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``. ``self`` is the
stock module: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, ``act_fn``, ``num_experts``, the layout
flags the decorator sets (``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``) and
``_apply_gate`` (``act(gate) · up`` unless the model overrides it).

``moequant_experts_forward`` computes ``moequant.nn.quant_experts.grouped_experts`` for such a module,
with either weight dense or packed (held through ``moequant.nn.packed.register_packed``), and for a
``QuantExperts``. Layouts it does not cover (biases, transposed or ungated experts, a post-expert norm,
expert parallelism) run transformers' own ``grouped_mm`` path when the weights are dense and are refused
when packed.

``use_moequant_experts(model)`` registers the function (idempotent; an unrelated function already under
the name is an error) and selects it on the model; ``moequant.api.load`` calls it for packed checkpoints.
Nothing happens at import.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from moequant.nn.packed import packed_names
from moequant.nn.quant_experts import (QuantExperts, default_gate, dense_grouped_linear, expert_views,
                                       grouped_experts, looped_linear)

log = logging.getLogger(__name__)

IMPLEMENTATION = "moequant"


def _supported_layout(module: nn.Module) -> bool:
    return (getattr(module, "has_gate", True) and not getattr(module, "has_bias", False)
            and not getattr(module, "is_transposed", False) and not getattr(module, "has_post_expert_norm", False)
            and not getattr(module, "_is_expert_parallel", False))


def moequant_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """``ALL_EXPERTS_FUNCTIONS["moequant"]``: the grouped experts MLP of ``self`` -> ``[T, H]``."""
    if isinstance(self, QuantExperts):
        return self(hidden_states, top_k_index, top_k_weights)
    packed = set(packed_names(self))
    if not _supported_layout(self):
        if packed:
            raise NotImplementedError(f"{type(self).__name__}: packed experts with biases, transposed or ungated "
                                      f"weights or a post-expert norm are not supported")
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)

    def project(name: str):
        if name in packed:
            views = expert_views(self, name)
            n_out = views[0].shape[0]
            return lambda x, r: looped_linear(x, r, lambda e, xe: views[e].linear(xe), n_out)
        return lambda x, r: dense_grouped_linear(x, getattr(self, name), r)

    apply_gate = getattr(self, "_apply_gate", None)
    gate = apply_gate if apply_gate is not None else (lambda gu: default_gate(gu, self.act_fn))
    return grouped_experts(hidden_states, top_k_index, top_k_weights, self.num_experts,
                           project("gate_up_proj"), project("down_proj"), gate)


def register_experts_implementation() -> None:
    """Register ``moequant_experts_forward`` as transformers' ``"moequant"`` experts implementation (once;
    re-registering the same function is a no-op, a different function under the name is an error)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    current = ALL_EXPERTS_FUNCTIONS.get(IMPLEMENTATION)
    if current is moequant_experts_forward:
        return
    if current is not None and (getattr(current, "__module__", None), getattr(current, "__qualname__", None)) != (
            moequant_experts_forward.__module__, moequant_experts_forward.__qualname__):
        raise ValueError(f"transformers experts implementation {IMPLEMENTATION!r} is already registered to "
                         f"{getattr(current, '__module__', '?')}.{getattr(current, '__qualname__', current)}")
    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, moequant_experts_forward)


def use_moequant_experts(model: nn.Module) -> bool:
    """Register the implementation and select it on ``model`` (a transformers ``PreTrainedModel`` whose
    modeling code dispatches experts through ``@use_experts_implementation``). Returns whether it was set."""
    register_experts_implementation()
    setter = getattr(model, "set_experts_implementation", None)
    can_set = getattr(type(model), "_can_set_experts_implementation", None)
    if setter is None or can_set is None or not can_set():
        return False
    setter(IMPLEMENTATION)
    config = getattr(model, "config", None)
    done = getattr(config, "_experts_implementation", None) == IMPLEMENTATION
    if done:
        log.debug("%s: experts run through moequant's grouped path", type(model).__name__)
    return done

