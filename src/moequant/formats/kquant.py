"""GGUF block tensors: one packed class per llama.cpp block type asked for, storing the exact GGUF bytes.

Layout (``gguf-<type>`` v1, e.g. ``gguf-q4_k``), for a logical weight ``[..., N, K]`` (leading dims are
experts): one data tensor ``blocks``, uint8 ``[..., N, K / block * block_bytes]``: each row's blocks
back to back, every block exactly ggml's ``block_<type>`` struct (``codecs.kquant_pack``), so a GGUF
writer copies the bytes as they are (``gguf_blocks``). Attribute: ``qtype``, the type asked for.

The bytes are those of the *stored* type, ``stored_type(qtype, K)``: the type asked for when its block
divides ``K``, otherwise llama.cpp's fallback (a ``gguf-q4_k`` tensor with rows of 896 weights holds
Q5_0 blocks, one with rows of 40 holds float16), exactly as llama-quantize would write that tensor.
``stored`` names it and ``gguf_blocks`` returns its ggml type id. Decoding is ggml's arithmetic, bit
for bit (``codecs.kquant.decode``); bits per weight are the stored type's exactly (Q4_K 4.5, Q3_K
3.4375, Q2_K 2.625, Q6_K 6.5625, Q5_K 5.5, Q4_0 / IQ4_NL 4.5, Q5_0 5.5, Q5_1 6.0, Q8_0 8.5, F16 16).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from moequant.codecs.config import GgufConfig, MethodConfig
from moequant.codecs.kquant import TYPES, BlockParams, GgmlType, dequantize, quantize, stored_type
from moequant.codecs.kquant_pack import pack_blocks, pack_f16, unpack_blocks, unpack_f16
from moequant.formats.base import QuantizedTensor
from moequant.formats.uniform import hessian_diag

# Row bytes decoded at a time (bounds the int32 temporaries of unpacking to ~64 MiB).
_DECODE_BYTES = 1 << 24

_KERNELS: Any = None


def _kernels() -> Any:
    """``kernels.gguf``, imported at first use (formats must not import the kernels at import time)."""
    global _KERNELS
    from moequant.kernels import gguf as kernels

    _KERNELS = kernels
    return kernels


class GgufTensor(QuantizedTensor):
    """Shared by every GGUF block class; ``ggml`` is the type the class is asked for."""

    config_type: ClassVar[type[MethodConfig]] = GgufConfig
    data_names: ClassVar[tuple[str, ...]] = ("blocks",)
    attr_names: ClassVar[tuple[str, ...]] = ("qtype",)
    ggml: ClassVar[GgmlType]

    def __init__(self, shape: tuple[int, ...], data: dict[str, torch.Tensor], attrs: dict[str, Any]) -> None:
        if attrs.get("qtype") != self.ggml.name:
            raise ValueError(f"{self.format_id} holds {self.ggml.name}, attributes say qtype={attrs.get('qtype')!r}")
        super().__init__(shape, data, attrs)

    @classmethod
    def _config(cls, config: MethodConfig) -> GgufConfig:
        if not isinstance(config, GgufConfig):
            raise TypeError(f"{cls.__name__} needs a GgufConfig, got {type(config).__name__}")
        if config.qtype != cls.ggml.name:
            raise ValueError(f"{cls.__name__} holds {cls.ggml.name}, config asks for {config.qtype} "
                             f"(use formats.registry.tensor_class_for)")
        return config

    @classmethod
    def encode(cls, w: torch.Tensor, config: MethodConfig, hessian: torch.Tensor | None = None) -> "QuantizedTensor":
        """w ``[..., N, K]`` -> blocks of ``stored_type(qtype, K)``; ``hessian`` (``[..., K, K]`` or its
        diagonal ``[..., K]``) weights the parameter search by its diagonal."""
        cfg = cls._config(config)
        t = stored_type(cfg.qtype, w.shape[-1])
        if t.kind == "float":
            raw = pack_f16(w.detach())
        else:
            codes, p = quantize(t, w, hessian_diag(hessian, w), cfg.search_steps)
            raw = pack_blocks(t, codes, p)
        return cls(tuple(w.shape), {"blocks": raw}, {"qtype": cfg.qtype})

    @classmethod
    def from_parts(cls, shape: tuple[int, ...], parts: dict[str, torch.Tensor], config: MethodConfig
                   ) -> "QuantizedTensor":
        """Pack ``codecs.kquant_columns.GgufColumns.parts()``: codes uint8 ``[..., N, K]`` with ``d`` (and
        ``dmin``, ``scales``, ``mins`` as the stored type has them), or float16 ``values`` for F16."""
        cfg = cls._config(config)
        t = stored_type(cfg.qtype, shape[-1])
        if t.kind == "float":
            raw = pack_f16(parts["values"])
        else:
            raw = pack_blocks(t, parts["codes"], BlockParams.from_parts(parts))
        return cls(tuple(shape), {"blocks": raw}, {"qtype": cfg.qtype})

    @property
    def stored(self) -> GgmlType:
        """The block type the bytes are in (the fallback when the asked type's block does not divide ``K``)."""
        return stored_type(self.ggml.name, self.shape[-1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        fast = (_KERNELS or _kernels()).dequantize(self)  # the C++ decode, bit-identical; None where it is absent
        if fast is not None:
            return fast if fast.dtype == dtype else fast.to(dtype)
        t, raw = self.stored, self.data["blocks"]
        rows = raw.reshape(-1, raw.shape[-1])  # [R, bytes]
        step = max(1, _DECODE_BYTES // max(1, raw.shape[-1]))
        out = torch.empty(rows.shape[0], self.shape[-1], dtype=dtype, device=raw.device)  # [R, K]
        for r0 in range(0, rows.shape[0], step):
            chunk = rows[r0:r0 + step]
            if t.kind == "float":
                out[r0:r0 + step] = unpack_f16(chunk).to(dtype)
            else:
                codes, p = unpack_blocks(t, chunk)
                out[r0:r0 + step] = dequantize(t, codes, p).to(dtype)
        return out.reshape(self.shape)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K] -> x Ŵᵀ + b [..., N]`` (2-D tensors) through ``kernels.gguf``: the C++ GEMV / decode +
        GEMM from the block bytes on CPU, the reference decode elsewhere."""
        return (_KERNELS or _kernels()).linear(self, x, bias)

    def gguf_blocks(self) -> tuple[int, torch.Tensor]:
        """(ggml type id of ``stored``, the uint8 bytes ``[..., N, K / block * block_bytes]``) for a GGUF writer."""
        return self.stored.type_id, self.data["blocks"]

    @classmethod
    def expected_bits_per_weight(cls, shape: tuple[int, ...], config: MethodConfig) -> float:
        return stored_type(cls._config(config).qtype, shape[-1]).bits_per_weight

    @classmethod
    def data_spec(cls, shape: tuple[int, ...], attrs: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """blocks uint8 ``[..., N, K / block * block_bytes]`` of the stored type."""
        if attrs["qtype"] != cls.ggml.name:
            raise ValueError(f"{cls.format_id} holds {cls.ggml.name}, metadata says qtype={attrs['qtype']!r}")
        *lead, n, k = shape
        t = stored_type(cls.ggml.name, k)
        return {"blocks": ((*lead, n, k // t.block * t.block_bytes), torch.uint8)}


class GgufQ2KTensor(GgufTensor):
    """Q2_K: 2.625 bits per weight (Q4_0 rows when 256 does not divide K)."""
    format_id: ClassVar[str] = "gguf-q2_k"
    ggml: ClassVar[GgmlType] = TYPES["q2_k"]


class GgufQ3KTensor(GgufTensor):
    """Q3_K: 3.4375 bits per weight (Q4_0 rows when 256 does not divide K)."""
    format_id: ClassVar[str] = "gguf-q3_k"
    ggml: ClassVar[GgmlType] = TYPES["q3_k"]


class GgufQ4KTensor(GgufTensor):
    """Q4_K: 4.5 bits per weight (Q5_0 rows when 256 does not divide K)."""
    format_id: ClassVar[str] = "gguf-q4_k"
    ggml: ClassVar[GgmlType] = TYPES["q4_k"]


class GgufQ5KTensor(GgufTensor):
    """Q5_K: 5.5 bits per weight (Q5_1 rows when 256 does not divide K)."""
    format_id: ClassVar[str] = "gguf-q5_k"
    ggml: ClassVar[GgmlType] = TYPES["q5_k"]


class GgufQ6KTensor(GgufTensor):
    """Q6_K: 6.5625 bits per weight (Q8_0 rows when 256 does not divide K)."""
    format_id: ClassVar[str] = "gguf-q6_k"
    ggml: ClassVar[GgmlType] = TYPES["q6_k"]


class GgufQ4_0Tensor(GgufTensor):
    """Q4_0: 4.5 bits per weight."""
    format_id: ClassVar[str] = "gguf-q4_0"
    ggml: ClassVar[GgmlType] = TYPES["q4_0"]


class GgufQ5_0Tensor(GgufTensor):
    """Q5_0: 5.5 bits per weight."""
    format_id: ClassVar[str] = "gguf-q5_0"
    ggml: ClassVar[GgmlType] = TYPES["q5_0"]


class GgufQ5_1Tensor(GgufTensor):
    """Q5_1: 6 bits per weight."""
    format_id: ClassVar[str] = "gguf-q5_1"
    ggml: ClassVar[GgmlType] = TYPES["q5_1"]


class GgufQ8_0Tensor(GgufTensor):
    """Q8_0: 8.5 bits per weight."""
    format_id: ClassVar[str] = "gguf-q8_0"
    ggml: ClassVar[GgmlType] = TYPES["q8_0"]


class GgufIQ4NLTensor(GgufTensor):
    """IQ4_NL: 4.5 bits per weight (a fixed non-uniform 4-bit table)."""
    format_id: ClassVar[str] = "gguf-iq4_nl"
    ggml: ClassVar[GgmlType] = TYPES["iq4_nl"]


# The class of every type a GgufConfig can ask for, by type name.
GGUF_CLASSES: dict[str, type[GgufTensor]] = {c.ggml.name: c for c in (
    GgufQ2KTensor, GgufQ3KTensor, GgufQ4KTensor, GgufQ5KTensor, GgufQ6KTensor, GgufQ4_0Tensor, GgufQ5_0Tensor,
    GgufQ5_1Tensor, GgufQ8_0Tensor, GgufIQ4NLTensor)}
