"""``QuantExperts``: the fused 3-D experts of an MoE block, computed from packed weights.

Drop-in for transformers' ``<X>Experts`` modules (OLMoE, Qwen2/3-MoE, Mixtral):
``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``. Only the
experts a batch routes to are decoded, one at a time, so the resident weights stay packed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moequant.formats.base import QuantizedTensor
from moequant.nn.packed import packed_tensor, register_packed


class QuantExperts(nn.Module):
    """gate_up_proj ``[E, 2I, H]`` (gate rows first, then up) and down_proj ``[E, H, I]``, each either
    a ``QuantizedTensor`` (stored packed) or a dense tensor (kept in full precision by the recipe)."""

    def __init__(self, gate_up: QuantizedTensor | torch.Tensor, down: QuantizedTensor | torch.Tensor,
                 act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.num_experts, two_i, self.hidden_dim = tuple(gate_up.shape)
        self.intermediate_dim = two_i // 2
        if tuple(down.shape) != (self.num_experts, self.hidden_dim, self.intermediate_dim):
            raise ValueError(f"down_proj shape {tuple(down.shape)} does not match gate_up_proj {tuple(gate_up.shape)}")
        self.act_fn = act_fn
        for name, w in (("gate_up_proj", gate_up), ("down_proj", down)):
            if isinstance(w, QuantizedTensor):
                register_packed(self, name, w)
            else:
                self.register_parameter(name, nn.Parameter(w.detach(), requires_grad=False))

    def is_packed(self, name: str) -> bool:
        return name in self.__dict__.get("_packed_specs", {})

    def expert_weight(self, name: str, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense weight of expert ``e`` for ``name`` (decoded when packed): ``[2I, H]`` or ``[H, I]``."""
        if self.is_packed(name):
            return packed_tensor(self, name).select(e).dequantize(dtype)
        return getattr(self, name)[e].to(dtype)

    def _expert_linear(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ`` with expert ``e``'s weight ``name``, from its packed slice when packed."""
        if self.is_packed(name):
            return packed_tensor(self, name).select(e).linear(x)
        return F.linear(x, getattr(self, name)[e].to(x.dtype))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)  # [T, H]
        hit = torch.unique(top_k_index)
        for e in hit.tolist():
            if e < 0 or e >= self.num_experts:
                continue  # masked / padded slots
            token_idx, slot = torch.where(top_k_index == e)  # [n_e], [n_e]
            x = hidden_states[token_idx]  # [n_e, H]
            gate, up = self._expert_linear("gate_up_proj", e, x).chunk(2, dim=-1)  # [n_e, I] x2
            h = self._expert_linear("down_proj", e, self.act_fn(gate) * up)  # [n_e, H]
            h = h * top_k_weights[token_idx, slot, None].to(h.dtype)
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        parts = []
        for name in ("gate_up_proj", "down_proj"):
            if self.is_packed(name):
                q = packed_tensor(self, name)
                parts.append(f"{name}: {q.format_id} {q.bits_per_weight():.3f} bpw")
            else:
                parts.append(f"{name}: dense {getattr(self, name).dtype}")
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, inter={self.intermediate_dim}, " + ", ".join(parts)
