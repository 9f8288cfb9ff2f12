"""What fine-tuning may change in a packed model, behind one small interface, and which method opens what.

``TrainableTensor`` is a packed weight opened up for training: its continuous parameters (float32 leaves the
optimiser updates), a differentiable decoded weight, its state as tensors (for resuming) and the packed tensor
it stands for now; PV-tuning's V-step also needs ``reencode`` (the discrete codes moved towards a target), a
soft trellis ``set_temperature``. ``TRAINABLES`` is the one registry of which class opens a format under which
fine-tuning method (``FINETUNE_METHODS``); the rotated format ``rht`` is opened by every method by opening its
inner tensor with that method (``packed_trainables.Rotated``). ``open_tensors`` opens the packed weights of a
model (or of some decoder layers), ``train_forward`` makes the ``QuantLinear`` / ``QuantExperts`` modules
holding them compute from given (differentiable) weights while it is active, and ``write_back`` stores the
packed tensors into the modules again.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moequant.errors import MoequantError
from moequant.finetune.packed_trainables import (AdditiveTrainable, GgufScales, LutAbsmax, LutDqScales, Rotated,
                                                 UniformScales)
from moequant.finetune.trellis_trainable import TRELLIS_TRAINABLES, TrellisTrainOptions
from moequant.formats.additive import AdditiveTensor
from moequant.formats.base import QuantizedTensor
from moequant.formats.kquant import GGUF_CLASSES
from moequant.formats.lut import LutDqTensor, LutTensor
from moequant.formats.rotated import RotatedTensor
from moequant.formats.trellis import TrellisTensor
from moequant.formats.uniform import UniformAsymTensor, UniformTensor
from moequant.nn.packed import packed_names, packed_tensor, register_packed
from moequant.nn.quant_experts import QuantExperts, default_gate, grouped_experts, looped_linear
from moequant.nn.quant_linear import QuantLinear
from moequant.registry import Registry


class TrainableTensor(Protocol):
    shape: tuple[int, ...]

    def parameters(self) -> dict[str, torch.Tensor]:
        """The continuous parameters, float32 leaves that require grad."""

    def weight(self) -> torch.Tensor:
        """The decoded weight ``[*shape]``, differentiable in ``parameters()``."""

    def state(self) -> dict[str, torch.Tensor]:
        """Everything that defines the tensor now and may have changed (``parameters()``, codes that move)."""

    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def packed(self) -> QuantizedTensor: ...


# What each method trains (the CLI's help says it the same way).
FINETUNE_METHODS: dict[str, str] = {
    "pv": "PV-tuning of additive and trellis runs: P-steps on the continuous parameters (codebooks and scales; "
          "trellis scales and LUT) and norms, V-steps re-choosing a capped fraction of the codes (trellis: "
          "QTIP-style Viterbi re-encoding, whole tiles)",
    "kd": "distillation with the codes fixed: the continuous parameters of every packed format (int scales, "
          "nf4/fp4 absmax, GGUF super-block scales, additive codebooks and scales, trellis scales and LUT) and norms",
    "bcjr": "BCJR-QAT of trellis runs: a latent weight through a soft trellis (forward-backward at temperature tau, "
            "annealed), hardened by Viterbi on the final soft codeword",
    "ste": "straight-through trellis QAT: a latent weight, Viterbi codes in the forward pass, identity gradient",
}

Opener = Callable[[QuantizedTensor], TrainableTensor]


def _trainables() -> Registry[Opener]:
    """``"<method> <format_id>"`` -> the class that opens that format for that method (duplicates raise)."""
    reg: Registry[Opener] = Registry("trainable")
    reg.register(f"pv {AdditiveTensor.format_id}", AdditiveTrainable)
    kd: list[tuple[type[QuantizedTensor], Opener]] = [
        (UniformTensor, UniformScales), (UniformAsymTensor, UniformScales), (LutTensor, LutAbsmax),
        (LutDqTensor, LutDqScales), *((cls, GgufScales) for cls in GGUF_CLASSES.values()),
        (AdditiveTensor, AdditiveTrainable)]
    for cls, opener in kd:
        reg.register(f"kd {cls.format_id}", opener)
    for method in ("kd", "bcjr", "ste"):
        reg.register(f"{method} {TrellisTensor.format_id}", TRELLIS_TRAINABLES[method])
    reg.register(f"pv {TrellisTensor.format_id}", TRELLIS_TRAINABLES["kd"])  # kd's P-step, reencode as V-step
    return reg


TRAINABLES: Registry[Opener] = _trainables()


def trainable_formats(method: str) -> list[str]:
    """The format ids ``method`` opens (besides ``rht`` around them)."""
    return [key.split(" ", 1)[1] for key in TRAINABLES if key.split(" ", 1)[0] == method]


def open_tensor(method: str, name: str, qt: QuantizedTensor, trellis: TrellisTrainOptions | None = None
                ) -> TrainableTensor:
    """``qt`` (the packed weight ``name``) opened for ``method`` (``trellis``: the options of a trellis tensor's
    class, its defaults when None); a one-line ``MoequantError`` naming the tensor and its format when
    ``method`` does not train that format."""
    if isinstance(qt, RotatedTensor):
        inner = qt.inner
        return Rotated(qt, _open(method, name, inner, f"{inner.format_id} inside rht", trellis))
    return _open(method, name, qt, qt.format_id, trellis)


def _open(method: str, name: str, qt: QuantizedTensor, stored: str, trellis: TrellisTrainOptions | None
          ) -> TrainableTensor:
    key = f"{method} {qt.format_id}"
    if method not in FINETUNE_METHODS:
        raise MoequantError(f"unknown finetune method {method!r} (known: {', '.join(FINETUNE_METHODS)})")
    if key not in TRAINABLES:
        raise MoequantError(f"{name} is stored as {stored}: --method {method} trains "
                            f"{', '.join(trainable_formats(method))} tensors (also inside rht)")
    if isinstance(qt, TrellisTensor):
        return TRAINABLES.get(key)(qt, trellis)
    return TRAINABLES.get(key)(qt)


def layer_prefixes(model: nn.Module, layers: Iterable[int]) -> tuple[str, ...]:
    """``("model.layers.0.", ...)``: the module-name prefixes of decoder layers ``layers``; a one-line
    ``MoequantError`` for an index the model does not have."""
    from moequant.models.adapters import adapter_for, decoder_layers

    adapter = adapter_for(model)
    count = len(decoder_layers(model, adapter))
    for i in layers:
        if not 0 <= i < count:
            raise MoequantError(f"--layers {i}: the model has {count} decoder layers (0-{count - 1})")
    return tuple(f"{adapter.layers}.{i}." for i in layers)


def _selected(name: str, prefixes: tuple[str, ...] | None) -> bool:
    return prefixes is None or name.startswith(prefixes)


def open_tensors(model: nn.Module, method: str, prefixes: tuple[str, ...] | None = None,
                 trellis: TrellisTrainOptions | None = None) -> dict[str, TrainableTensor]:
    """``{parameter name: TrainableTensor}`` of every packed weight of a ``QuantLinear`` / ``QuantExperts``
    (under ``prefixes`` when given, e.g. ``layer_prefixes``), opened for ``method``; ``MoequantError`` for a
    format the method does not train, or when there is nothing to open."""
    out: dict[str, TrainableTensor] = {}
    exact = set(getattr(model, "moequant_exact", ()))  # kept tables stored exactly: kept, so not tuned
    for mname, mod in model.named_modules():
        if not isinstance(mod, (QuantLinear, QuantExperts)):
            continue
        for p in packed_names(mod):
            name = f"{mname}.{p}"
            if _selected(name, prefixes) and name not in exact:
                out[name] = open_tensor(method, name, packed_tensor(mod, p), trellis)
    if not out:
        where = "" if prefixes is None else f" in {', '.join(x.rstrip('.') for x in prefixes)}"
        raise MoequantError(f"the model has no packed linear or expert weights{where} to fine-tune")
    return out


def norm_parameters(model: nn.Module, prefixes: tuple[str, ...] | None = None) -> dict[str, nn.Parameter]:
    """``{name: weight}`` of every normalisation layer (RMSNorm / LayerNorm weights, q/k norms included), under
    ``prefixes`` when given."""
    return {f"{n}.weight": m.weight for n, m in model.named_modules()
            if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), nn.Parameter)
            and _selected(f"{n}.weight", prefixes)}


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _linear_forward(mod: QuantLinear, weights: dict[str, torch.Tensor], name: str | None):
    """``mod``'s forward from ``weights[name]``; ``name`` None (a frozen weight): its own forward, or its decoded
    weight when autograd must reach ``x`` (the fast kernels have no backward)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        if name is not None:
            return F.linear(x, weights[name].to(x.dtype), mod.bias)
        if _needs_grad(x):
            return F.linear(x, mod.dequantized_weight(x.dtype), mod.bias)
        return type(mod).forward(mod, x)
    return forward


def _experts_forward(mod: QuantExperts, weights: dict[str, torch.Tensor], mname: str, trained: set[str]):
    """``mod``'s forward with its trained projections (``trained``) from ``weights``, the frozen ones as in
    ``_linear_forward``."""
    def project(p: str, n_out: int):
        name = f"{mname}.{p}"
        own = mod._project(p, n_out)

        def run(x: torch.Tensor, routing) -> torch.Tensor:
            if name in trained:
                w = weights[name].to(x.dtype)  # [E, N, K]
                return looped_linear(x, routing, lambda e, xe: F.linear(xe, w[e]), n_out)
            if mod.is_packed(p) and _needs_grad(x):
                return looped_linear(x, routing, lambda e, xe: F.linear(xe, mod.expert_weight(p, e, xe.dtype)), n_out)
            return own(x, routing)
        return run

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return grouped_experts(hidden_states, top_k_index, top_k_weights, mod.num_experts,
                               project("gate_up_proj", 2 * mod.intermediate_dim), project("down_proj", mod.hidden_dim),
                               lambda gu: default_gate(gu, mod.act_fn))
    return forward


@contextlib.contextmanager
def train_forward(model: nn.Module, names: Iterable[str], weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """While active, the modules holding the packed weights ``names`` compute from ``weights[name]`` (read at
    each call: the caller puts each step's differentiable weights there). Every other ``QuantLinear`` /
    ``QuantExperts`` computes from its decoded weight whenever autograd must pass through it to trained
    parameters before it, else as usual."""
    trained = set(names)
    patched = []
    try:
        for mname, mod in model.named_modules():
            if isinstance(mod, QuantLinear):
                mod.forward = _linear_forward(mod, weights, f"{mname}.weight" if f"{mname}.weight" in trained
                                              else None)
            elif isinstance(mod, QuantExperts):
                mod.forward = _experts_forward(mod, weights, mname, trained)
            else:
                continue
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
