"""The registry of packed tensor formats, keyed by ``format_id``, and dispatch from configs and metadata.

The formats are those of the registered methods (``formats.methods.METHOD_FORMATS``) plus the rotated
wrapper, which looks its inner formats up there (so it does not import this module); which format a config
is stored in is its method's choice (``tensor_class_for``)."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from moequant.codecs.config import MethodConfig
from moequant.formats.base import QuantizedTensor
from moequant.formats.methods import method_formats, tensor_class_for
from moequant.formats.rotated import RotatedTensor
from moequant.registry import Registry

__all__ = ["FORMATS", "encode", "from_state_dict", "make_format_registry", "tensor_class_for"]


def make_format_registry(classes: Iterable[type[QuantizedTensor]]) -> Registry[type[QuantizedTensor]]:
    """A registry of ``classes`` by their ``format_id`` (a duplicate id raises)."""
    reg: Registry[type[QuantizedTensor]] = Registry("format")
    for cls in classes:
        reg.register(cls.format_id, cls)
    return reg


FORMATS: Registry[type[QuantizedTensor]] = make_format_registry([*method_formats(), RotatedTensor])


def encode(w: torch.Tensor, config: MethodConfig, hessian: torch.Tensor | None = None) -> QuantizedTensor:
    """w ``[..., N, K]`` -> the packed tensor of ``config``'s format."""
    return tensor_class_for(config).encode(w, config, hessian)


def from_state_dict(tensors: dict[str, torch.Tensor], prefix: str, meta: dict[str, Any]) -> QuantizedTensor:
    """Rebuild a packed tensor stored under ``prefix`` from its ``meta`` (``QuantizedTensor.meta()``)."""
    if "format" not in meta:
        raise ValueError(f"{prefix}: tensor metadata has no 'format'")
    return FORMATS.get(meta["format"]).from_state_dict(tensors, prefix, meta)
