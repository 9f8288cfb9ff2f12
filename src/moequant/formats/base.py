"""The ``QuantizedTensor`` contract: a packed tensor that knows its data tensors, attributes and format.

Every subclass declares, once:
- ``format_id`` / ``format_version``: the on-disk contract (written into ``config.json``);
- ``data_names``: the stored tensors; each has the logical tensor's leading (expert) dims first, so
  ``select(e)`` slices expert ``e`` out of every one of them;
- ``attr_names``: JSON-serialisable attributes (bit width, group size, ...); ``shape`` is always one.

It gets ``to_state_dict`` / ``from_state_dict`` (exact round trip), ``nbytes`` and
``bits_per_weight`` (every stored bit / number of weights) for free, and implements ``encode``,
``dequantize`` and ``data_spec`` (the shape and dtype of every stored tensor, from the logical shape and
the attributes alone: a reader checks what it reads against it before using it; ``check_meta`` checks
the metadata itself).
"""

from __future__ import annotations

import dataclasses
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

    @classmethod
    @abstractmethod
    def data_spec(cls, shape: tuple[int, ...], attrs: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``{data_name: (shape, dtype)}`` of every stored tensor of a ``shape`` tensor with ``attrs``
        (attributes already checked by ``check_meta``); ``ValueError`` when they admit no layout."""

    # --- provided ------------------------------------------------------------------------------
    @classmethod
    def check_meta(cls, meta: Any) -> tuple[tuple[int, ...], dict[str, Any]]:
        """``meta`` (``QuantizedTensor.meta()`` as read from a checkpoint) -> (shape, attrs), checked:
        the format and a supported version, ``shape`` a list of at least 2 positive ints, every attribute
        present and of its config field's type and range. ``ValueError`` saying what is wrong."""
        if not isinstance(meta, dict):
            raise ValueError(f"metadata is a {type(meta).__name__}, not an object")
        if meta.get("format") != cls.format_id:
            raise ValueError(f"format {meta.get('format')!r} is not {cls.format_id!r}")
        version = meta.get("format_version", 1)
        if not _is_int(version) or not 1 <= version <= cls.format_version:
            raise ValueError(f"{cls.format_id} format_version {version!r} is not supported (1..{cls.format_version})")
        shape = meta.get("shape")
        if not isinstance(shape, list) or len(shape) < 2 or not all(_is_int(s) and s > 0 for s in shape):
            raise ValueError(f"shape {shape!r} is not a list of at least 2 positive ints")
        attrs = {n: meta[n] for n in cls.attr_names if n in meta}
        cls.check_attrs(attrs)
        return tuple(shape), attrs

    @classmethod
    def check_attrs(cls, attrs: dict[str, Any]) -> None:
        """Attributes named like ``config_type``'s fields are present, have that field's type and pass its
        ``validate``. (Other attributes, e.g. one an older format version did not write, are the
        class's ``from_state_dict``'s to default and check.)"""
        fields = {f.name: f for f in dataclasses.fields(cls.config_type)}
        missing = [n for n in cls.attr_names if n in fields and n not in attrs]
        if missing:
            raise ValueError(f"missing attributes {missing}")
        given = {n: v for n, v in attrs.items() if n in fields}
        for n, v in given.items():
            want = type(fields[n].default)
            ok = (isinstance(v, bool) if want is bool else _is_int(v) if want is int
                  else isinstance(v, (int, float)) and not isinstance(v, bool) if want is float else isinstance(v, want))
            if not ok:
                raise ValueError(f"attribute {n}={v!r} is not a {want.__name__}")
        try:
            cls.config_type(**given)
        except (TypeError, ValueError) as e:
            raise ValueError(f"attributes {given}: {e}") from None

    def gguf_blocks(self) -> tuple[int, torch.Tensor]:
        """This tensor as ggml blocks, repacked without rounding: (ggml type id, uint8 ``[*lead, N,
        row_bytes]``, each row the blocks of one output row in llama.cpp's byte layout), such that
        ``gguf.quants.dequantize`` gives exactly ``dequantize()``. Formats with a GGUF equivalent
        override it; the default refuses, naming the format and what would export."""
        from moequant.errors import MoequantError

        raise MoequantError(f"{self.format_id} ({self.attrs}) has no GGUF equivalent: quantize with a GGUF-native "
                            f"method (--method q4_k / q3_k / q2_k / q4_0 ..., or --method int --sym --group-size 32 "
                            f"at 4, 5 or 8 bits), or export the float model with --types q8_0")

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

    def prepare_runtime(self) -> None:
        """Build, eagerly, what the run-time path needs that a ``torch.compile`` trace should find ready
        (``nn.packed.register_packed`` calls it when a module takes the tensor). Nothing for most formats."""
        return None

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

    def check_data(self) -> None:
        """Every data tensor has the shape and dtype ``data_spec`` implies (``ValueError`` otherwise)."""
        check_data(type(self), self.shape, self.attrs, {n: (tuple(t.shape), t.dtype) for n, t in self.data.items()})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, {self.attrs}, {self.bits_per_weight():.3f} bpw)"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_data(cls: type[QuantizedTensor], shape: tuple[int, ...], attrs: dict[str, Any],
               found: dict[str, tuple[tuple[int, ...], torch.dtype | None]]) -> None:
    """``found`` ``{data_name: (shape, dtype)}`` (dtype None: not a torch dtype) against ``cls.data_spec``;
    ``ValueError`` naming the first data tensor that differs, with expected vs found."""
    for name, (want_shape, want_dtype) in cls.data_spec(shape, attrs).items():
        if name not in found:
            raise ValueError(f"data tensor {name!r} is missing")
        got_shape, got_dtype = found[name]
        if tuple(got_shape) != tuple(want_shape) or got_dtype != want_dtype:
            raise ValueError(f"data tensor {name!r} is {list(got_shape)} {got_dtype}, the metadata implies "
                             f"{list(want_shape)} {want_dtype}")
