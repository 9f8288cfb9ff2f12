"""``QuantExperts``: the fused 3-D experts of an MoE block, computed from packed weights, and the grouped
routed-experts path it shares with transformers' stock experts modules (``moequant.nn.experts_impl``).

Drop-in for transformers' ``<X>Experts`` modules (OLMoE, Qwen2/3-MoE, Mixtral):
``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.

Grouped path (``grouped_experts``): the ``T·k`` (token, slot) pairs are sorted by expert once (a stable
argsort, so tokens keep their order within an expert), ``bincount`` gives each expert's contiguous
slice, the routed tokens are gathered once, each projection runs once per routed expert on its slice —
dense stacks of one dtype in a single ``grouped_mm`` call where torch has a kernel for it, packed ones
expert by expert through their per-expert views — and one ``index_add_`` scatters the weighted rows
back. No Python work per token; only routed experts are decoded, so the resident weights stay packed.
Slots routed to an expert id outside ``[0, E)`` (masked / padded) are skipped.

The per-expert views of a packed tensor (``QuantizedTensor.select(e)``) are built once and kept on the
module (``expert_views``; not in ``state_dict``), so a per-tensor runtime cache a fast kernel keeps on a
view (e.g. an int4 repack) lives as long as the weights do. They are rebuilt when the buffers change
(``.to()``, ``load_state_dict``, an in-place write).

Counting (``count_routed_experts(model)``, a context manager): while it is open, every ``QuantExperts`` of
``model`` adds to an ``ExpertCounts`` how many experts its projections ran for (the routed experts, those
with at least one token, once per call) and how many a dense pass would run (``E`` per call). Outside it
the forward pass does no counting work beyond one dict lookup.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moequant.formats.base import QuantizedTensor
from moequant.kernels import trellis as trellis_kernels
from moequant.kernels import uniform as uniform_kernels
from moequant.nn.packed import buffers_token, buffers_unchanged, packed_tensor, register_packed

ExpertLinear = Callable[[int, torch.Tensor], torch.Tensor]  # (expert e, x [n_e, K]) -> [n_e, N]

_VIEWS = "_moequant_expert_views"
_COUNTS = "_moequant_expert_counts"


# ---------------------------------------------------------------- routing (pure)


@dataclass(frozen=True)
class ExpertRouting:
    """The routed (token, slot) pairs of a batch, sorted by expert (stable: token order within an expert).
    ``counts[e]`` pairs go to expert ``e``; expert ``e``'s pairs are ``[starts[e], starts[e] + counts[e])``."""

    token: torch.Tensor  # [S] row of hidden_states of each pair
    pair: torch.Tensor  # [S] flat index t·k + slot into top_k_weights.reshape(-1)
    counts: tuple[int, ...]  # [E]
    offsets: torch.Tensor  # [E] int32, cumulative counts (the end of each expert's slice)

    @property
    def size(self) -> int:
        return self.token.numel()

    def slices(self) -> Iterator[tuple[int, int, int]]:
        """``(e, start, end)`` of every expert with at least one pair, in expert order."""
        start = 0
        for e, c in enumerate(self.counts):
            if c:
                yield e, start, start + c
                start += c


def route_by_expert(top_k_index: torch.Tensor, num_experts: int) -> ExpertRouting:
    """Sort the pairs of ``top_k_index`` [T, k] by expert; ids outside ``[0, num_experts)`` are dropped."""
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1).long()  # [T·k]
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))  # masked slots sort last
    order = torch.argsort(key, stable=True)  # [T·k]
    counts_t = torch.bincount(key, minlength=num_experts + 1)[:num_experts]  # [E]
    counts = tuple(counts_t.tolist())  # the one host sync
    pair = order[:sum(counts)]  # [S]
    return ExpertRouting(token=pair // k, pair=pair, counts=counts,
                         offsets=torch.cumsum(counts_t, 0).to(torch.int32))


# ---------------------------------------------------------------- grouped projections


def grouped_mm_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether one ``grouped_mm`` call beats (or matches) a loop over experts for ``x [S, K]``, ``w [E, N, K]``.
    Measured on torch 2.13 CPU (1 thread): fp32 equal to the loop bit for bit and 1-5% faster; bf16 up to
    1.4x slower than the loop at prefill sizes, so the loop is kept there. CUDA: bf16 on SM80+."""
    if not hasattr(F, "grouped_mm") or x.dtype != w.dtype or x.device != w.device or w.dim() != 3:
        return False
    if not (_aligned16(x) and _aligned16(w) and w.shape[1] * w.element_size() % 16 == 0):
        return False  # the kernels need 16-byte aligned data and row strides (the output's too)
    if x.device.type == "cpu":
        return x.dtype == torch.float32
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


def _aligned16(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and all(st == 1 or st * t.element_size() % 16 == 0 for st in t.stride())


def looped_linear(x: torch.Tensor, routing: ExpertRouting, linear: ExpertLinear, n_out: int) -> torch.Tensor:
    """``x [S, K]`` (sorted by expert) -> ``[S, n_out]``, calling ``linear(e, x_e)`` once per routed expert."""
    y = x.new_empty(x.shape[0], n_out)  # [S, N]
    for e, start, end in routing.slices():
        y[start:end] = linear(e, x[start:end])
    return y


def dense_grouped_linear(x: torch.Tensor, w: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
    """``x [S, K]`` (sorted by expert) times each expert's ``w [E, N, K]`` transposed -> ``[S, N]``: one
    ``grouped_mm`` where it applies, else one ``F.linear`` per routed expert (weight cast to ``x``'s dtype)."""
    if grouped_mm_applies(x, w):
        return F.grouped_mm(x, w.transpose(-2, -1), offs=routing.offsets.to(x.device))
    return looped_linear(x, routing, lambda e, xe: F.linear(xe, w[e].to(xe.dtype)), w.shape[1])


def default_gate(gate_up: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``[S, 2I]`` (gate columns first, then up) -> ``act(gate) · up`` ``[S, I]``."""
    gate, up = gate_up.chunk(2, dim=-1)  # [S, I] x2
    return act_fn(gate) * up


def grouped_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                    num_experts: int, gate_up: Callable[[torch.Tensor, ExpertRouting], torch.Tensor],
                    down: Callable[[torch.Tensor, ExpertRouting], torch.Tensor],
                    gate: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The routed-experts MLP, grouped by expert: ``sum_slots w · down_e(gate(gate_up_e(x)))`` -> ``[T, H]``.
    ``gate_up`` / ``down`` map rows sorted by expert (``[S, H]`` / ``[S, I]``) to ``[S, 2I]`` / ``[S, H]``."""
    out = torch.zeros_like(hidden_states)  # [T, H]
    routing = route_by_expert(top_k_index, num_experts)
    if routing.size == 0:
        return out
    x = hidden_states[routing.token]  # [S, H]
    h = down(gate(gate_up(x, routing)), routing)  # [S, H]
    h = h * top_k_weights.reshape(-1)[routing.pair].to(h.dtype)[:, None]
    out.index_add_(0, routing.token, h.to(out.dtype))
    return out


# ---------------------------------------------------------------- per-expert views of packed tensors


def expert_views(module: nn.Module, name: str) -> list[QuantizedTensor]:
    """``[packed_tensor(module, name).select(e) for e in range(E)]``, built once and kept on the module
    (outside ``state_dict``) while its ``{name}_*`` buffers stay the same tensors, unmodified."""
    shape = module._packed_specs[name][1]
    cache: dict[str, tuple[tuple, list[QuantizedTensor]]] = module.__dict__.setdefault(_VIEWS, {})
    hit = cache.get(name)
    if hit is not None and buffers_unchanged(module, hit[0]):
        return hit[1]
    token = buffers_token(module, name)
    qt = packed_tensor(module, name)
    views = [qt.select(e) for e in range(shape[0])]
    cache[name] = (token, views)
    return views


def clear_expert_views(module: nn.Module) -> None:
    module.__dict__.pop(_VIEWS, None)


# ---------------------------------------------------------------- counting routed experts


@dataclass
class ExpertCounts:
    """Expert work of one ``QuantExperts`` while counted: ``computed`` = experts whose projections ran (one per
    routed expert, i.e. with at least one (token, slot) pair, per call), ``total`` = what a dense pass would run
    (``E`` per call), ``calls`` = forward calls."""

    computed: int = 0
    total: int = 0
    calls: int = 0


def _counted(project: Callable[[torch.Tensor, ExpertRouting], torch.Tensor],
             counts: ExpertCounts) -> Callable[[torch.Tensor, ExpertRouting], torch.Tensor]:
    """``project`` that first adds the experts it is about to run for (those ``routing`` gives rows) to ``counts``."""

    def run(x: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
        counts.computed += sum(1 for c in routing.counts if c)
        return project(x, routing)

    return run


@contextmanager
def count_routed_experts(model: nn.Module) -> Iterator[dict[str, ExpertCounts]]:
    """Count, inside the ``with`` block, the experts every ``QuantExperts`` of ``model`` computes: yields
    ``{module name: ExpertCounts}`` (empty when the model has none), filled as the model runs. Nested blocks on
    the same modules count into the innermost one and restore the outer one on exit."""
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantExperts)]
    counts = {name: ExpertCounts() for name, _ in modules}
    outer = [m.__dict__.get(_COUNTS) for _, m in modules]
    for name, m in modules:
        m.__dict__[_COUNTS] = counts[name]
    try:
        yield counts
    finally:
        for (_, m), prev in zip(modules, outer):
            if prev is None:
                m.__dict__.pop(_COUNTS, None)
            else:
                m.__dict__[_COUNTS] = prev


# ---------------------------------------------------------------- the module


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
            return expert_views(self, name)[e].dequantize(dtype)
        return getattr(self, name)[e].to(dtype)

    def _expert_linear(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ`` with expert ``e``'s weight ``name``, from its (cached) packed view when packed."""
        if self.is_packed(name):
            return expert_views(self, name)[e].linear(x)
        return F.linear(x, getattr(self, name)[e].to(x.dtype))

    def _project(self, name: str, n_out: int) -> Callable[[torch.Tensor, ExpertRouting], torch.Tensor]:
        if self.is_packed(name):
            return lambda x, r: self._packed_grouped(name, x, r, n_out)
        return lambda x, r: dense_grouped_linear(x, getattr(self, name), r)

    def _packed_grouped(self, name: str, x: torch.Tensor, routing: ExpertRouting, n_out: int) -> torch.Tensor:
        """Every routed expert's packed ``name`` on its rows of ``x [S, K]``: one grouped kernel call where the
        format and device have one (uniform and trellis on CUDA), else one call per routed expert."""
        if x.is_cuda:
            qt = packed_tensor(self, name)
            y = uniform_kernels.grouped_linear(qt, x, routing.counts)
            y = trellis_kernels.grouped_linear(qt, x, routing.counts) if y is None else y
            if y is not None:
                return y
        return looped_linear(x, routing, lambda e, xe: self._expert_linear(name, e, xe), n_out)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        gate_up = self._project("gate_up_proj", 2 * self.intermediate_dim)
        counts: ExpertCounts | None = self.__dict__.get(_COUNTS)
        if counts is not None:  # only inside count_routed_experts
            counts.calls += 1
            counts.total += self.num_experts
            gate_up = _counted(gate_up, counts)  # once per call: down runs for the same experts
        return grouped_experts(hidden_states, top_k_index, top_k_weights, self.num_experts, gate_up,
                               self._project("down_proj", self.hidden_dim),
                               lambda gu: default_gate(gu, self.act_fn))

    def reference_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
        """The oracle for ``forward``: one expert at a time, its tokens found with ``torch.where``."""
        out = torch.zeros_like(hidden_states)  # [T, H]
        for e in torch.unique(top_k_index).tolist():
            if e < 0 or e >= self.num_experts:
                continue  # masked / padded slots
            token_idx, slot = torch.where(top_k_index == e)  # [n_e], [n_e]
            x = hidden_states[token_idx]  # [n_e, H]
            h = self._expert_linear("down_proj", e, default_gate(self._expert_linear("gate_up_proj", e, x),
                                                                 self.act_fn))  # [n_e, H]
            h = h * top_k_weights[token_idx, slot, None].to(h.dtype)
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out

    def _apply(self, fn, recurse: bool = True):
        clear_expert_views(self)  # views (and their runtime caches) belong to the old tensors
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        clear_expert_views(self)
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        parts = []
        for name in ("gate_up_proj", "down_proj"):
            if self.is_packed(name):
                q = packed_tensor(self, name)
                parts.append(f"{name}: {q.format_id} {q.bits_per_weight():.3f} bpw")
            else:
                parts.append(f"{name}: dense {getattr(self, name).dtype}")
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, inter={self.intermediate_dim}, " + ", ".join(parts)
