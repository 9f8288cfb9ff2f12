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
    qt.prepare_runtime()


def packed_tensor(module: nn.Module, name: str) -> QuantizedTensor:
    """The ``QuantizedTensor`` view over the module's current buffers (no copy)."""
    cls, shape, attrs = module._packed_specs[name]
    return cls(shape, {d: getattr(module, f"{name}_{d}") for d in cls.names_for(attrs)}, attrs)


def packed_names(module: nn.Module) -> list[str]:
    return list(module.__dict__.get("_packed_specs", {}))


def _storage(t: torch.Tensor) -> Any:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (none among packed buffers)
        return None


def buffers_token(module: nn.Module, name: str) -> tuple:
    """What ``buffers_unchanged`` compares, per buffer of ``name``: ``(attribute, tensor, version counter
    (None for an inference tensor, which keeps none), data pointer, storage)``. The storage is held only so
    that its address cannot be reused by a new allocation while the token lives (after ``t.data = other``
    the pointer then always differs)."""
    cls, _, attrs = module._packed_specs[name]
    out = []
    for d in cls.names_for(attrs):
        key = f"{name}_{d}"
        t = getattr(module, key)
        try:
            version = t._version
        except RuntimeError:  # inference tensors keep no version counter
            version = None
        out.append((key, t, version, t.data_ptr(), _storage(t)))
    return tuple(out)


def buffers_unchanged(module: nn.Module, token: tuple) -> bool:
    """The buffers ``token`` was taken of are still the module's, same objects over the same memory, not
    written since: a buffer replaced (``register_buffer``, ``module.x = t``, ``load_state_dict(assign=True)``),
    re-pointed (``t.data = other``, ``set_``) or written in place (``copy_``, ``load_state_dict``: the version
    counter) reads as changed. O(buffers) attribute reads (~0.2 µs each), nothing hashed, no tensor walked."""
    bufs = module._buffers
    for key, t, version, ptr, _ in token:
        if bufs.get(key) is not t or t.data_ptr() != ptr or (version is not None and t._version != version):
            return False
    return True


_CACHE = "_moequant_packed_cache"
_NO_CACHE: dict = {}


def cached_packed_tensor(module: nn.Module, name: str) -> QuantizedTensor:
    """``packed_tensor(module, name)``, built once and kept on the module (outside ``state_dict``) while
    its buffers stay the same, unmodified tensors (``buffers_unchanged``) — so a runtime cache a fast kernel
    keeps on the ``QuantizedTensor`` (a repacked weight) lives as long as the weights, not one call."""
    if torch.compiler.is_compiling():  # traced: a view over the current buffers (dynamo guards them; the token's
        return packed_tensor(module, name)  # data-pointer comparison is not traceable)
    hit = module.__dict__.get(_CACHE, _NO_CACHE).get(name)
    if hit is not None and buffers_unchanged(module, hit[0]):
        return hit[1]
    token = buffers_token(module, name)
    qt = packed_tensor(module, name)
    module.__dict__.setdefault(_CACHE, {})[name] = (token, qt)
    return qt


def clear_packed_cache(module: nn.Module) -> None:
    module.__dict__.pop(_CACHE, None)
