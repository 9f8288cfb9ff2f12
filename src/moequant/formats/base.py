"""The ``QuantizedTensor`` contract: a packed tensor that knows its data tensors, attributes and format.

Every subclass declares, once:
- ``format_id`` / ``format_version``: the on-disk contract (written into ``config.json``);
- ``data_names``: the stored tensors; each has the logical tensor's leading (expert) dims first, so
  ``select(e)`` slices expert ``e`` out of every one of them;
- ``attr_names``: JSON-serialisable attributes (bit width, group size, ...); ``shape`` is always one.

It gets ``to_state_dict`` / ``from_state_dict`` (exact round trip), ``nbytes`` and
``bits_per_weight`` (every stored bit / number of weights) for free, and implements ``encode`` and
``dequantize``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from moequant.codecs.config import MethodConfig


class QuantizedTensor(ABC):
    format_id: ClassVar[str] = ""
    format_version: ClassVar[int] = 1
    config_type: ClassVar[type[MethodConfig]]
    data_names: ClassVar[tuple[str, ...]] = ()
    attr_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, shape: tuple[int, ...], data: dict[str, torch.Tensor], attrs: dict[str, Any]) -> None:
        missing = [n for n in self.attr_names if n not in attrs]
        if missing:
            raise ValueError(f"{self.format_id}: missing attributes {missing}")
        names = self.names_for(attrs)
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"{self.format_id}: missing data tensors {missing}")
        self.shape = tuple(int(s) for s in shape)
        self.data = {n: data[n] for n in names}
        self.attrs = {n: attrs[n] for n in self.attr_names}
        lead = self.shape[:-2]
        for n, t in self.data.items():
            if tuple(t.shape[: len(lead)]) != lead:
                raise ValueError(f"{self.format_id}: data tensor {n!r} {tuple(t.shape)} lacks leading dims {lead}")

    # --- to implement -------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def encode(cls, w: torch.Tensor, config: MethodConfig, hessian: torch.Tensor | None = None) -> "QuantizedTensor":
        """w ``[..., N, K]`` -> packed tensor. ``hessian`` ``[..., K, K]`` or ``[..., K]`` (diag) may weight errors."""

    @classmethod
    @abstractmethod
    def from_parts(cls, shape: tuple[int, ...], parts: dict[str, torch.Tensor], config: MethodConfig
                   ) -> "QuantizedTensor":
        """Pack the codec's unpacked parts (``codecs.columns.ColumnQuantizer.parts``) into this format."""

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """-> ``[*shape]`` in ``dtype``."""

    @classmethod
    @abstractmethod
    def expected_bits_per_weight(cls, shape: tuple[int, ...], config: MethodConfig) -> float:
        """Bits per weight this format will store for ``shape`` under ``config`` (no encoding needed)."""

    # --- provided ------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K] -> x Ŵᵀ + b [..., N]`` for a 2-D tensor (reference path: decode, then matmul).
        Formats that can do better (rotate activations, fused kernels) override it."""
        if len(self.shape) != 2:
            raise ValueError(f"{self.format_id}: linear() needs a 2-D tensor, shape is {self.shape}")
        return torch.nn.functional.linear(x, self.dequantize(x.dtype), bias)

    @classmethod
    def names_for(cls, attrs: dict[str, Any]) -> tuple[str, ...]:
        """The stored data tensors of an instance with ``attrs`` (``data_names`` unless a wrapper format
        stores its inner format's tensors too)."""
        return cls.data_names

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return next(iter(self.data.values())).device

    def nbytes(self) -> int:
        """Stored bytes of every data tensor."""
        return sum(t.numel() * t.element_size() for t in self.data.values())

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / self.numel

    def select(self, index: int) -> "QuantizedTensor":
        """The slice ``[index]`` along the first leading (expert) dim."""
        if len(self.shape) < 3:
            raise ValueError(f"{self.format_id}: select() needs a leading expert dim, shape is {self.shape}")
        return type(self)(self.shape[1:], {n: t[index] for n, t in self.data.items()}, dict(self.attrs))

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        return type(self)(self.shape, {n: t.to(device) for n, t in self.data.items()}, dict(self.attrs))

    def meta(self) -> dict[str, Any]:
        """JSON description written into ``quantization_config`` for this tensor."""
        return {"format": self.format_id, "format_version": self.format_version, "shape": list(self.shape),
                **{k: v for k, v in self.attrs.items()}}

    def to_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{prefix + "_" + data_name: tensor}`` — the stored tensor names are a contract."""
        return {f"{prefix}_{n}": t.contiguous() for n, t in self.data.items()}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str, meta: dict[str, Any]) -> "QuantizedTensor":
        if meta.get("format") != cls.format_id:
            raise ValueError(f"{prefix}: format {meta.get('format')!r} is not {cls.format_id!r}")
        if int(meta.get("format_version", 1)) > cls.format_version:
            raise ValueError(f"{prefix}: {cls.format_id} version {meta['format_version']} is newer than supported")
        attrs = {n: meta[n] for n in cls.attr_names}
        data = {}
        for n in cls.names_for(attrs):
            key = f"{prefix}_{n}"
            if key not in tensors:
                raise KeyError(f"checkpoint lacks tensor {key!r} ({cls.format_id})")
            data[n] = tensors[key]
        return cls(tuple(meta["shape"]), data, attrs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, {self.attrs}, {self.bits_per_weight():.3f} bpw)"
