"""The registry of packed tensor formats, keyed by ``format_id``, and dispatch from configs and metadata."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from moequant.codecs.config import LutConfig, MethodConfig, TrellisConfig, UniformConfig
from moequant.formats.base import QuantizedTensor
from moequant.formats.lut import LutDqTensor, LutTensor
from moequant.formats.rotated import RotatedTensor
from moequant.formats.trellis import TrellisTensor
from moequant.formats.uniform import UniformAsymTensor, UniformTensor
from moequant.registry import Registry


def make_format_registry(classes: Iterable[type[QuantizedTensor]]) -> Registry[type[QuantizedTensor]]:
    """A registry of ``classes`` by their ``format_id`` (a duplicate id raises)."""
    reg: Registry[type[QuantizedTensor]] = Registry("format")
    for cls in classes:
        reg.register(cls.format_id, cls)
    return reg


FORMATS: Registry[type[QuantizedTensor]] = make_format_registry(
    (UniformTensor, UniformAsymTensor, LutTensor, LutDqTensor, RotatedTensor, TrellisTensor))


def tensor_class_for(config: MethodConfig) -> type[QuantizedTensor]:
    """The packed format that stores weights quantized under ``config``."""
    if isinstance(config, UniformConfig):
        return UniformTensor if config.symmetric else UniformAsymTensor
    if isinstance(config, LutConfig):
        return LutDqTensor if config.double_quant else LutTensor
    if isinstance(config, TrellisConfig):
        return TrellisTensor
    raise ValueError(f"no packed format for {type(config).__name__}")


def encode(w: torch.Tensor, config: MethodConfig, hessian: torch.Tensor | None = None) -> QuantizedTensor:
    """w ``[..., N, K]`` -> the packed tensor of ``config``'s format."""
    return tensor_class_for(config).encode(w, config, hessian)


def from_state_dict(tensors: dict[str, torch.Tensor], prefix: str, meta: dict[str, Any]) -> QuantizedTensor:
    """Rebuild a packed tensor stored under ``prefix`` from its ``meta`` (``QuantizedTensor.meta()``)."""
    if "format" not in meta:
        raise ValueError(f"{prefix}: tensor metadata has no 'format'")
    return FORMATS.get(meta["format"]).from_state_dict(tensors, prefix, meta)
