"""What fine-tuning may change in a packed model, behind one small interface.

``TrainableTensor`` is a packed weight opened up for training: its continuous parameters (float32 leaves the
P-step updates), a differentiable decoded weight, the V-step on its discrete codes, its state as tensors (for
resuming) and the packed tensor it stands for now. ``TRAINABLE`` maps a format id to the class that opens it
(additive codes today; a trellis or int class follows the same six methods). ``train_forward`` makes the
``QuantLinear`` / ``QuantExperts`` modules holding those tensors compute from given (differentiable) weights
while it is active; ``write_back`` stores the packed tensors into the modules again.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moequant.codecs.additive import reconstruct
from moequant.errors import MoequantError
from moequant.finetune.pv import fp16_straight_through, v_step
from moequant.formats.additive import AdditiveTensor
from moequant.formats.base import QuantizedTensor
from moequant.nn.packed import packed_names, packed_tensor, register_packed
from moequant.nn.quant_experts import QuantExperts, default_gate, grouped_experts, looped_linear
from moequant.nn.quant_linear import QuantLinear


class TrainableTensor(Protocol):
    shape: tuple[int, ...]

    def parameters(self) -> dict[str, torch.Tensor]:
        """The continuous parameters, float32 leaves that require grad."""

    def weight(self) -> torch.Tensor:
        """The decoded weight ``[*shape]``, differentiable in ``parameters()``."""

    def reencode(self, target: torch.Tensor, max_fraction: float) -> float:
        """Move the codes towards ``target [*shape]``; the fraction of codes changed."""

    def state(self) -> dict[str, torch.Tensor]:
        """Everything that defines the tensor now (``parameters()`` and codes)."""

    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def packed(self) -> QuantizedTensor: ...


class AdditiveTrainable:
    """An ``AdditiveTensor`` opened up: codes int64 ``[E, N, G, M]``, codebooks float32 ``[S, M, C, g]`` (``S = 1``
    for one set — a plain linear or ``share="layer"`` — else ``E``), scales float32 ``[E, N]``. The forward
    uses their float16 values (``fp16_straight_through``), so training computes with what is stored."""

    def __init__(self, qt: AdditiveTensor) -> None:
        self.shape = tuple(qt.shape)
        self.cfg = qt.config
        *lead, n, k = self.shape
        e = 1 if not lead else lead[0]
        self.codes = qt.codes().reshape(e, n, k // self.cfg.g, self.cfg.M)  # [E, N, G, M]
        books = qt.data["codebooks"].to(torch.float32)
        self.books = books.reshape(-1, *books.shape[-3:]).clone().requires_grad_(True)  # [S, M, C, g]
        self.scale = qt.data["scale"].to(torch.float32).reshape(e, n).clone().requires_grad_(True)  # [E, N]

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"codebooks": self.books, "scale": self.scale}

    def _books(self, books: torch.Tensor) -> torch.Tensor:
        return books[0] if books.shape[0] == 1 else books  # [M, C, g] or [E, M, C, g]

    def weight(self) -> torch.Tensor:
        books = self._books(fp16_straight_through(self.books))
        return reconstruct(self.codes, books, fp16_straight_through(self.scale)).reshape(self.shape)

    def reencode(self, target: torch.Tensor, max_fraction: float) -> float:
        e, n, _, _ = self.codes.shape
        books = self._books(self.books.detach()).to(torch.float16).to(torch.float32)
        scale = self.scale.detach().to(torch.float16).to(torch.float32)
        self.codes, frac = v_step(target.reshape(e, n, -1), self.codes, books, scale, max_fraction)
        return frac

    def state(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "codebooks": self.books.detach(), "scale": self.scale.detach()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.codes = state["codes"].to(torch.int64).clone()
        with torch.no_grad():
            self.books.copy_(state["codebooks"])
            self.scale.copy_(state["scale"])

    def packed(self) -> QuantizedTensor:
        *lead, n, _ = self.shape
        books = self.books.detach()
        books = books[0] if books.shape[0] == 1 else books  # [M, C, g] or [E, M, C, g]
        parts = {"codes": self.codes.reshape(*lead, *self.codes.shape[1:]), "codebooks": books,
                 "scale": self.scale.detach().reshape(*lead, n)}
        return AdditiveTensor.from_parts(self.shape, parts, self.cfg)


TRAINABLE: dict[str, type] = {AdditiveTensor.format_id: AdditiveTrainable}


def open_tensors(model: nn.Module) -> dict[str, TrainableTensor]:
    """``{parameter name: TrainableTensor}`` of every packed weight of a ``QuantLinear`` / ``QuantExperts``;
    ``MoequantError`` for a format no class opens or a model without such weights."""
    out: dict[str, TrainableTensor] = {}
    for mname, mod in model.named_modules():
        if not isinstance(mod, (QuantLinear, QuantExperts)):
            continue
        for p in packed_names(mod):
            qt = packed_tensor(mod, p)
            cls = TRAINABLE.get(qt.format_id)
            if cls is None:
                raise MoequantError(f"{mname}.{p} is stored as {qt.format_id}: PV-tuning opens "
                                    f"{', '.join(sorted(TRAINABLE))} tensors only")
            out[f"{mname}.{p}"] = cls(qt)
    if not out:
        raise MoequantError("the model has no packed linear or expert weights to fine-tune")
    return out


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: weight}`` of every normalisation layer (RMSNorm / LayerNorm weights, q/k norms included)."""
    return {f"{n}.weight": m.weight for n, m in model.named_modules()
            if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), nn.Parameter)}


def _linear_forward(mod: QuantLinear, weights: dict[str, torch.Tensor], name: str):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weights[name].to(x.dtype), mod.bias)
    return forward


def _experts_forward(mod: QuantExperts, weights: dict[str, torch.Tensor], mname: str):
    def project(p: str, n_out: int):
        if f"{mname}.{p}" not in weights:
            return mod._project(p, n_out)

        def run(x: torch.Tensor, routing) -> torch.Tensor:
            w = weights[f"{mname}.{p}"].to(x.dtype)  # [E, N, K]
            return looped_linear(x, routing, lambda e, xe: F.linear(xe, w[e]), n_out)
        return run

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return grouped_experts(hidden_states, top_k_index, top_k_weights, mod.num_experts,
                               project("gate_up_proj", 2 * mod.intermediate_dim), project("down_proj", mod.hidden_dim),
                               lambda gu: default_gate(gu, mod.act_fn))
    return forward


@contextlib.contextmanager
def train_forward(model: nn.Module, names: Iterable[str], weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """While active, the modules holding the packed weights ``names`` compute from ``weights[name]`` (read at
    each call: the caller puts each step's differentiable weights there)."""
    patched = []
    try:
        for mname in sorted({n.rpartition(".")[0] for n in names}):
            mod = model.get_submodule(mname)
            mod.forward = _linear_forward(mod, weights, f"{mname}.weight") if isinstance(mod, QuantLinear) \
                else _experts_forward(mod, weights, mname)
            patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.forward


def write_back(model: nn.Module, tensors: dict[str, TrainableTensor]) -> None:
    """Store each tensor's current packed form into its module (the buffers are replaced)."""
    for name, t in tensors.items():
        mname, _, p = name.rpartition(".")
        register_packed(model.get_submodule(mname), p, t.packed())
