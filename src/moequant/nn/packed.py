"""Holding a ``QuantizedTensor``'s data as module buffers so ``.to()``, ``state_dict()`` and
``load_state_dict()`` see exactly the packed tensors (``<name>_<data>``) and nothing else."""

from __future__ import annotations

from typing import Any

from torch import nn

from moequant.formats.base import QuantizedTensor


def register_packed(module: nn.Module, name: str, qt: QuantizedTensor) -> None:
    """Store ``qt``'s data as buffers ``{name}_{data}`` and its class/shape/attrs on the module."""
    for d, t in qt.data.items():
        module.register_buffer(f"{name}_{d}", t)
    packed: dict[str, tuple[type[QuantizedTensor], tuple[int, ...], dict[str, Any]]] = module.__dict__.setdefault(
        "_packed_specs", {})
    packed[name] = (type(qt), qt.shape, dict(qt.attrs))


def packed_tensor(module: nn.Module, name: str) -> QuantizedTensor:
    """The ``QuantizedTensor`` view over the module's current buffers (no copy)."""
    cls, shape, attrs = module._packed_specs[name]
    return cls(shape, {d: getattr(module, f"{name}_{d}") for d in cls.names_for(attrs)}, attrs)


def packed_names(module: nn.Module) -> list[str]:
    return list(module.__dict__.get("_packed_specs", {}))
