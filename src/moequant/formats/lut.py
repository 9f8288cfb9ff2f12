"""4-bit lookup-table tensors (NF4 / FP4) with blockwise absmax: ``LutTensor`` and ``LutDqTensor``.

Layout, for a logical weight ``[..., N, K]`` with ``NB = K / block_size`` blocks per row:

- ``codes``: uint8 ``[..., N, packed_len(K, 4)]``, each row's 4-bit codes packed by ``bitpack``
  (two per byte, the even column in the low nibble);
- ``lut4-packed`` v1 (``LutTensor``, no double quant): ``absmax`` float16 ``[..., N, NB]``;
- ``lut4-dq-packed`` v1 (``LutDqTensor``, double quant): ``absmax_codes`` uint8 ``[..., N, NB]``,
  ``absmax_scale`` fp32 ``[..., D]`` with ``D = ceil(N * NB / dq_block_size)``, ``absmax_offset`` fp32
  ``[..., 1]``; see ``codecs.lut`` for the linear int8 rule.

Decoding: ``w = LUT[code] * absmax``. The 16-entry table is fixed by the ``lut`` attribute (``nf4`` or
``fp4``, values in ``codecs.lut.LUTS``) and is part of this format's spec, like the meaning of a code, so
it is not stored per tensor and ``bits_per_weight`` does not count it. Attributes: ``lut``,
``block_size``, ``double_quant``, ``dq_block_size``.

Each weight independently takes the nearest table value given its block's absmax, so a Hessian does not
change the result and ``encode`` ignores it.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, ClassVar

import torch

from moequant.codecs.config import LutConfig, MethodConfig
from moequant.codecs.lut import (block_absmax, dq_dequantize, dq_num_blocks, dq_quantize, lut_assign, lut_dequantize,
                                 lut_quantize, lut_values)
from moequant.formats.base import QuantizedTensor
from moequant.formats.bitpack import pack, packed_len, unpack

CODE_BITS = 4

# moequant.kernels.lut, imported at the first linear(): an import statement there costs ~1 µs a call
_KERNELS: Any = None


def _kernels() -> Any:
    global _KERNELS
    from moequant.kernels import lut as kernels

    _KERNELS = kernels
    return kernels


def _check_config(cls_name: str, config: MethodConfig, double_quant: bool) -> LutConfig:
    if not isinstance(config, LutConfig):
        raise TypeError(f"{cls_name} needs a LutConfig, got {type(config).__name__}")
    if config.double_quant != double_quant:
        raise ValueError(f"{cls_name} is for double_quant={double_quant}; config has double_quant={config.double_quant}"
                         " (use formats.registry.tensor_class_for)")
    return config


def _blocks(k: int, block_size: int) -> int:
    if k % block_size:
        raise ValueError(f"block size {block_size} does not divide the input dim K={k}")
    return k // block_size


def _check_dq(cls: type, attrs: dict[str, Any], double_quant: bool) -> None:
    if attrs["double_quant"] != double_quant:
        raise ValueError(f"{cls.format_id} is for double_quant={double_quant}, metadata says {attrs['double_quant']}")


def _attrs(cfg: LutConfig) -> dict[str, object]:
    return {"lut": cfg.lut, "block_size": cfg.block_size, "double_quant": cfg.double_quant,
            "dq_block_size": cfg.dq_block_size}


class _LutBase(QuantizedTensor):
    config_type: ClassVar[type[MethodConfig]] = LutConfig
    attr_names: ClassVar[tuple[str, ...]] = ("lut", "block_size", "double_quant", "dq_block_size")

    def _codes(self) -> torch.Tensor:
        return unpack(self.data["codes"], CODE_BITS, self.shape[-1])  # [..., N, K]

    @abstractmethod
    def _absmax(self) -> torch.Tensor:
        """Decoded per-block absmax, fp32 ``[..., N, NB]``."""

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        lut = lut_values(self.attrs["lut"])
        return lut_dequantize(self._codes(), self._absmax(), lut, self.attrs["block_size"]).to(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K] -> x Ŵᵀ + b [..., N]`` (2-D tensors) through ``kernels.lut``: the C++ GEMV / decode +
        GEMM on CPU (double-quantized scales decoded in the kernel), the reference decode elsewhere."""
        return (_KERNELS or _kernels()).linear(self, x, bias)


class LutTensor(_LutBase):
    """Packed 4-bit LUT codes + float16 absmax per block."""

    format_id: ClassVar[str] = "lut4-packed"
    format_version: ClassVar[int] = 1
    data_names: ClassVar[tuple[str, ...]] = ("codes", "absmax")

    @classmethod
    def encode(cls, w: torch.Tensor, config: MethodConfig, hessian: torch.Tensor | None = None) -> "QuantizedTensor":
        cfg = _check_config(cls.__name__, config, False)
        codes, absmax = lut_quantize(w, lut_values(cfg.lut), cfg.block_size, torch.float16)
        return cls.from_parts(tuple(w.shape), {"codes": codes, "absmax": absmax}, cfg)

    @classmethod
    def from_parts(cls, shape: tuple[int, ...], parts: dict[str, torch.Tensor], config: MethodConfig
                   ) -> "QuantizedTensor":
        """Pack ``codes`` uint8 ``[..., N, K]`` and ``absmax`` ``[..., N, NB]`` (values exact in float16)."""
        cfg = _check_config(cls.__name__, config, False)
        data = {"codes": pack(parts["codes"], CODE_BITS),  # [..., N, K/2]
                "absmax": parts["absmax"].to(torch.float16)}  # [..., N, NB]
        return cls(tuple(shape), data, _attrs(cfg))

    def _absmax(self) -> torch.Tensor:
        return self.data["absmax"].to(torch.float32)

    @classmethod
    def expected_bits_per_weight(cls, shape: tuple[int, ...], config: MethodConfig) -> float:
        cfg = _check_config(cls.__name__, config, False)
        *lead, n, k = shape
        row_bits = 8 * packed_len(k, CODE_BITS) + 16 * _blocks(k, cfg.block_size)
        return math.prod(lead) * n * row_bits / math.prod(shape)

    @classmethod
    def data_spec(cls, shape: tuple[int, ...], attrs: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """codes uint8 ``[..., N, packed_len(K, 4)]``, absmax float16 ``[..., N, NB]``."""
        _check_dq(cls, attrs, False)
        *lead, n, k = shape
        return {"codes": ((*lead, n, packed_len(k, CODE_BITS)), torch.uint8),
                "absmax": ((*lead, n, _blocks(k, attrs["block_size"])), torch.float16)}


class LutDqTensor(_LutBase):
    """Packed 4-bit LUT codes + double-quantized absmax (int8 codes, fp32 block scales, fp32 mean)."""

    format_id: ClassVar[str] = "lut4-dq-packed"
    format_version: ClassVar[int] = 1
    data_names: ClassVar[tuple[str, ...]] = ("codes", "absmax_codes", "absmax_scale", "absmax_offset")

    @classmethod
    def encode(cls, w: torch.Tensor, config: MethodConfig, hessian: torch.Tensor | None = None) -> "QuantizedTensor":
        cfg = _check_config(cls.__name__, config, True)
        a_codes, a_scale, a_offset = dq_quantize(block_absmax(w, cfg.block_size), cfg.dq_block_size)
        absmax = dq_dequantize(a_codes, a_scale, a_offset, cfg.dq_block_size)  # [..., N, NB] as decoded
        codes = lut_assign(w, lut_values(cfg.lut), absmax, cfg.block_size)  # [..., N, K]
        parts = {"codes": codes, "absmax_codes": a_codes, "absmax_scale": a_scale, "absmax_offset": a_offset}
        return cls.from_parts(tuple(w.shape), parts, cfg)

    @classmethod
    def from_parts(cls, shape: tuple[int, ...], parts: dict[str, torch.Tensor], config: MethodConfig
                   ) -> "QuantizedTensor":
        """Pack ``codes`` uint8 ``[..., N, K]``; the double-quantized absmax parts are stored as given:
        ``absmax_codes`` uint8 ``[..., N, NB]``, ``absmax_scale`` fp32 ``[..., D]``, ``absmax_offset`` ``[..., 1]``."""
        cfg = _check_config(cls.__name__, config, True)
        data = {"codes": pack(parts["codes"], CODE_BITS),  # [..., N, K/2]
                "absmax_codes": parts["absmax_codes"], "absmax_scale": parts["absmax_scale"],
                "absmax_offset": parts["absmax_offset"]}
        return cls(tuple(shape), data, _attrs(cfg))

    def _absmax(self) -> torch.Tensor:
        return dq_dequantize(self.data["absmax_codes"], self.data["absmax_scale"], self.data["absmax_offset"],
                             self.attrs["dq_block_size"])

    @classmethod
    def expected_bits_per_weight(cls, shape: tuple[int, ...], config: MethodConfig) -> float:
        cfg = _check_config(cls.__name__, config, True)
        *lead, n, k = shape
        nb = _blocks(k, cfg.block_size)
        per_expert = n * (8 * packed_len(k, CODE_BITS) + 8 * nb) + 32 * dq_num_blocks(n * nb, cfg.dq_block_size) + 32
        return math.prod(lead) * per_expert / math.prod(shape)

    @classmethod
    def data_spec(cls, shape: tuple[int, ...], attrs: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """codes uint8 ``[..., N, packed_len(K, 4)]``, absmax_codes uint8 ``[..., N, NB]``, absmax_scale fp32
        ``[..., D]``, absmax_offset fp32 ``[..., 1]``."""
        _check_dq(cls, attrs, True)
        *lead, n, k = shape
        nb = _blocks(k, attrs["block_size"])
        return {"codes": ((*lead, n, packed_len(k, CODE_BITS)), torch.uint8),
                "absmax_codes": ((*lead, n, nb), torch.uint8),
                "absmax_scale": ((*lead, dq_num_blocks(n * nb, attrs["dq_block_size"])), torch.float32),
                "absmax_offset": ((*lead, 1), torch.float32)}
