"""Hooks that accumulate the Hessian statistics of one decoder layer while calibration batches run
through it; ``calib.hessian`` holds the math, this file only decides what each statistic sees.

- Every targeted linear (``nn.Linear`` or ``QuantLinear``) gets a forward pre-hook that adds its
  input ``x [..., K]`` to a ``HessianStat``. Linears fed the *same* tensor within one layer forward
  (q/k/v; gate/up of a dense MLP or of Qwen2-MoE's shared expert, plus its scalar gate) share one
  statistic, accumulated once. An input is recognised by its memory: data pointer, shape, strides,
  dtype, device and in-place version counter (absent under ``torch.inference_mode``). Every input
  seen during a layer forward is referenced until that forward ends, so its memory cannot be
  recycled for a different tensor that would then look identical. Groups are fixed by the first
  call of each linear.
- The fused experts module gets a pre-hook that sees ``(hidden_states [T, H], top_k_index [T, k],
  top_k_weights [T, k])``, positional or by keyword. For every expert ``e`` some token is routed to,
  ``x_e = hidden_states[tokens of e]`` ``[n_e, H]`` goes to ``gate_up_proj``'s statistic and
  ``act(gate) ⊙ up`` ``[n_e, I]`` — computed with the module's current weights, before the routing
  weight — to ``down_proj``'s. Index entries outside ``[0, E)`` are padding and skipped.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from moequant.calib.hessian import ExpertHessianStat, HessianStat
from moequant.models.adapters import ModelAdapter, Target

Stat = HessianStat | ExpertHessianStat
_EXPERT_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


def _memory_key(x: torch.Tensor) -> tuple[Any, ...]:
    """Two live tensors with this key read the same numbers: same memory, layout and, outside
    inference mode (whose tensors keep no version counter), no in-place write in between."""
    version = None if x.is_inference() else x._version
    return x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, version


class LayerCapture:
    """``with LayerCapture(layer, "model.layers.3", targets, adapter) as cap: <run the batches>``, then
    ``cap.result()`` -> ``{target name: HessianStat | ExpertHessianStat}``.

    ``targets``: the ``Target``s of this layer to collect (``iter_targets`` entries); those of kind
    ``experts`` must live in the module ``layer_prefix + "." + adapter.experts``.
    """

    def __init__(self, layer: nn.Module, layer_prefix: str, targets: list[Target], adapter: ModelAdapter) -> None:
        self.layer, self.prefix, self.adapter = layer, layer_prefix, adapter
        self.linears = [t for t in targets if t.kind == "linear"]
        self.expert_targets = [t for t in targets if t.kind == "experts"]
        if self.expert_targets:
            where = f"{layer_prefix}.{adapter.experts}"
            stray = [t.name for t in self.expert_targets if t.module != where]
            if stray:
                raise ValueError(f"expert targets outside {where}: {stray}")
        for t in targets:
            if not t.module.startswith(layer_prefix + "."):
                raise ValueError(f"target {t.name} is not inside {layer_prefix}")
        self.stats: dict[str, Stat] = {}
        # inputs of the current layer forward -> the statistics they were added to
        self._seen: dict[tuple[Any, ...], tuple[torch.Tensor, list[HessianStat]]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _module(self, full_name: str) -> nn.Module:
        return self.layer.get_submodule(full_name[len(self.prefix) + 1:])

    def __enter__(self) -> "LayerCapture":
        try:
            self._handles.append(self.layer.register_forward_pre_hook(lambda m, a: self._seen.clear()))
            self._handles.append(self.layer.register_forward_hook(lambda m, a, o: self._seen.clear()))
            for t in self.linears:
                self._handles.append(self._module(t.module).register_forward_pre_hook(
                    self._linear_hook(t.name), with_kwargs=True))
            if self.expert_targets:
                self._handles.append(self._module(self.expert_targets[0].module).register_forward_pre_hook(
                    self._experts_hook(), with_kwargs=True))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def _linear_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["input"]  # [..., K]
            key = _memory_key(x)
            entry = self._seen.get(key)
            stat = self.stats.get(name)
            if stat is None:  # first call: join the statistic of an identical input of this forward
                stat = self.stats[name] = entry[1][0] if entry else HessianStat.zeros(x.shape[-1])
            if entry is None:
                entry = self._seen[key] = (x, [])
            if any(s is stat for s in entry[1]):
                return  # this input was already added to this statistic in this forward
            stat.add(x)
            entry[1].append(stat)
        return hook

    def _experts_hook(self) -> Callable[..., None]:
        by_param: dict[str, ExpertHessianStat] = {}
        for t in self.expert_targets:  # [E, 2I, H] / [E, H, I]: the statistic is over the input dim
            stat = ExpertHessianStat.zeros(t.shape[0], t.shape[-1])
            self.stats[t.name] = by_param[t.param] = stat
        gate_up, down = by_param.get("gate_up_proj"), by_param.get("down_proj")

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            values = dict(zip(_EXPERT_ARGS, args)) | {k: v for k, v in kwargs.items() if k in _EXPERT_ARGS}
            hidden = values["hidden_states"].detach()
            hidden = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
            index = values["top_k_index"].reshape(hidden.shape[0], -1)  # [T, k]
            n_experts = self.expert_targets[0].shape[0]
            for e in torch.unique(index).tolist():
                if not 0 <= e < n_experts:
                    continue  # padded / masked routing slot
                tokens = torch.where(index == e)[0]  # [n_e]
                x = hidden[tokens]  # [n_e, H]
                if gate_up is not None:
                    gate_up.add(e, x)
                if down is not None:
                    down.add(e, _down_input(module, e, x))  # [n_e, I]
        return hook

    def result(self) -> dict[str, Stat]:
        """Statistic per target name; names in one shared group map to the same object. A linear that
        never ran is absent."""
        return dict(self.stats)

    def shared_groups(self) -> list[list[str]]:
        """Target names grouped by the statistic they share, in capture order (singletons included)."""
        groups: dict[int, list[str]] = {}
        for name, stat in self.stats.items():
            groups.setdefault(id(stat), []).append(name)
        return list(groups.values())


def _down_input(module: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """``act(gate_e x) ⊙ (up_e x)`` ``[n_e, I]`` from ``x [n_e, H]``: what ``down_proj[e]`` multiplies,
    before the routing weight. Uses the module's current (possibly already quantized) weights, in at
    least float32."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.no_grad():
        if hasattr(module, "expert_weight"):  # QuantExperts: decodes the packed slice
            w = module.expert_weight("gate_up_proj", e, dtype)  # [2I, H]
        else:
            w = module.gate_up_proj[e].to(dtype)  # [2I, H]
        gate, up = F.linear(x.to(dtype), w).chunk(2, dim=-1)  # [n_e, I] each
        return module.act_fn(gate) * up
