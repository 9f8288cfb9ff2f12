"""Holding a ``QuantizedTensor``'s data as module buffers so ``.to()``, ``state_dict()`` and
``load_state_dict()`` see exactly the packed tensors (``<name>_<data>``) and nothing else."""

from __future__ import annotations

from typing import Any

import torch
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


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return -1


def buffers_key(module: nn.Module, name: str) -> tuple:
    """Identity of ``name``'s buffers: the same tensors, same storage, not written since (in-place
    writes such as ``load_state_dict`` bump the version counter)."""
    cls, _, attrs = module._packed_specs[name]
    bufs = [getattr(module, f"{name}_{d}") for d in cls.names_for(attrs)]
    return tuple((t.data_ptr(), t.device, t.dtype, tuple(t.shape), _version(t)) for t in bufs)


_CACHE = "_moequant_packed_cache"


def cached_packed_tensor(module: nn.Module, name: str) -> QuantizedTensor:
    """``packed_tensor(module, name)``, built once and kept on the module (outside ``state_dict``) while
    its buffers stay the same, unmodified tensors — so a runtime cache a fast kernel keeps on the
    ``QuantizedTensor`` (a repacked weight) lives as long as the weights, not one call."""
    key = buffers_key(module, name)
    cache: dict[str, tuple[tuple, QuantizedTensor]] = module.__dict__.setdefault(_CACHE, {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    qt = packed_tensor(module, name)
    cache[name] = (key, qt)
    return qt


def clear_packed_cache(module: nn.Module) -> None:
    module.__dict__.pop(_CACHE, None)
