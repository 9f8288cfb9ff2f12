"""Bit-packed uniform integer tensors: ``UniformTensor`` (symmetric) and ``UniformAsymTensor`` (asymmetric).

Layout (``uniform-packed`` v2 and ``uniform-asym-packed`` v2), for a logical weight ``[..., N, K]`` with
``G = ceil(K / group_size)`` groups per row (``group_size = -1``: one group of the whole row; when the
group size does not divide ``K`` the last group is partial and has its own scale and zero point):

- ``codes``: uint8 ``[..., N, packed_len(K, bits)]``, each row's ``K`` codes packed by ``bitpack`` at
  ``bits`` bits (little-endian, rows padded to whole chunks);
- ``scale``: ``[..., N, G]`` in ``scale_dtype`` (float16 / bfloat16 / float32);
- ``zero`` (asymmetric only): uint8 ``[..., N, packed_len(G, bits)]``, each row's ``G`` integer zero
  points packed at ``bits`` bits.

Decoding: symmetric ``w = (q - 2^(bits-1)) * scale`` (midtread: zero is a level); asymmetric
``w = (q - zero) * scale``. Attributes: ``bits``, ``group_size`` (as configured, ``-1`` allowed),
``symmetric``, ``scale_dtype``, and for the symmetric format ``grid``.

Versions: v1 required ``group_size`` to divide ``K`` and its symmetric grid was *midrise*
``(q - (2^bits - 1) / 2) * scale`` (no zero level). v1 checkpoints still load and decode exactly as
before: their metadata has no ``grid``, which then reads as ``"midrise"``. v2 writes ``grid = "midtread"``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import torch

from moequant.codecs.config import MethodConfig, UniformConfig
from moequant.codecs.uniform import (SCALE_DTYPES, num_groups, resolve_group_size, subnormal_scales,
                                     uniform_dequantize, uniform_quantize)
from moequant.formats.base import QuantizedTensor
from moequant.formats.bitpack import pack, packed_len, unpack

log = logging.getLogger(__name__)

# moequant.kernels.uniform, imported at the first linear(): an import statement there costs ~1 µs a call
_KERNELS: Any = None


def _kernels() -> Any:
    global _KERNELS
    from moequant.kernels import uniform as kernels

    _KERNELS = kernels
    return kernels


def hessian_diag(hessian: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor | None:
    """``hessian`` with as many dims as ``w`` is a full ``[..., K, K]`` matrix (its diagonal is taken);
    with one dim fewer it already is the diagonal ``[..., K]``. -> ``[..., K]`` or None."""
    if hessian is None:
        return None
    k = w.shape[-1]
    if hessian.dim() == w.dim() and tuple(hessian.shape[-2:]) == (k, k):
        return torch.diagonal(hessian, dim1=-2, dim2=-1)  # [..., K]
    if hessian.dim() == w.dim() - 1 and hessian.shape[-1] == k:
        return hessian
    raise ValueError(f"hessian {tuple(hessian.shape)} fits neither [..., K, K] nor [..., K] for weight {tuple(w.shape)}")


def _check_config(cls_name: str, config: MethodConfig, symmetric: bool) -> UniformConfig:
    if not isinstance(config, UniformConfig):
        raise TypeError(f"{cls_name} needs a UniformConfig, got {type(config).__name__}")
    if config.symmetric != symmetric:
        raise ValueError(f"{cls_name} stores {'symmetric' if symmetric else 'asymmetric'} grids; "
                         f"config has symmetric={config.symmetric} (use formats.registry.tensor_class_for)")
    return config


class _UniformBase(QuantizedTensor):
    """Shared encode / decode / size accounting of the two uniform formats."""

    config_type: ClassVar[type[MethodConfig]] = UniformConfig
    attr_names: ClassVar[tuple[str, ...]] = ("bits", "group_size", "symmetric", "scale_dtype")
    symmetric: ClassVar[bool] = True

    @classmethod
    def encode(cls, w: torch.Tensor, config: MethodConfig, hessian: torch.Tensor | None = None) -> "QuantizedTensor":
        cfg = _check_config(cls.__name__, config, cls.symmetric)
        codes, scale, zero = uniform_quantize(
            w, cfg.bits, cfg.group_size, cfg.symmetric, cfg.clip_search, cfg.clip_steps, cfg.clip_min,
            hdiag=hessian_diag(hessian, w), scale_dtype=SCALE_DTYPES[cfg.scale_dtype])
        parts = {"codes": codes, "scale": scale} if zero is None else {"codes": codes, "scale": scale, "zero": zero}
        return cls.from_parts(tuple(w.shape), parts, cfg)

    @classmethod
    def from_parts(cls, shape: tuple[int, ...], parts: dict[str, torch.Tensor], config: MethodConfig
                   ) -> "QuantizedTensor":
        """Pack unpacked ``codes`` uint8 ``[..., N, K]``, ``scale`` ``[..., N, G]`` (values exact in the
        scale dtype) and, when asymmetric, ``zero`` uint8 ``[..., N, G]``."""
        cfg = _check_config(cls.__name__, config, cls.symmetric)
        scale_dtype = SCALE_DTYPES[cfg.scale_dtype]
        data = {"codes": pack(parts["codes"], cfg.bits),  # [..., N, packed_len(K, bits)]
                "scale": parts["scale"].to(scale_dtype)}  # [..., N, G]
        if not cfg.symmetric:
            data["zero"] = pack(parts["zero"], cfg.bits)  # [..., N, packed_len(G, bits)]
        attrs: dict[str, Any] = {"bits": cfg.bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric,
                                 "scale_dtype": cfg.scale_dtype}
        if cfg.symmetric:
            attrs["grid"] = "midtread"
        tiny = subnormal_scales(data["scale"], scale_dtype)
        if tiny and scale_dtype != torch.float32:
            log.warning("%d of %d group scales of a %s tensor are below %s's normal range (tiny weights: fewer "
                        "significant bits in their scales; --scale-dtype float32 avoids it)", tiny,
                        data["scale"].numel(), tuple(shape), cfg.scale_dtype)
        return cls(tuple(shape), data, attrs)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        bits, k = self.attrs["bits"], self.shape[-1]
        gs = resolve_group_size(k, self.attrs["group_size"])
        codes = unpack(self.data["codes"], bits, k)  # [..., N, K]
        zero = None
        if "zero" in self.data:
            zero = unpack(self.data["zero"], bits, num_groups(k, gs))  # [..., N, G]
        grid = self.attrs.get("grid", "midtread")
        return uniform_dequantize(codes, self.data["scale"], zero, gs, bits, grid).to(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K] -> x Ŵᵀ + b [..., N]`` (2-D tensors) through ``kernels.uniform``: the C++ GEMV /
        decode + GEMM on CPU (torch's int4pack kernel for 4 bits), the reference decode elsewhere."""
        return (_KERNELS or _kernels()).linear(self, x, bias)

    @classmethod
    def expected_bits_per_weight(cls, shape: tuple[int, ...], config: MethodConfig) -> float:
        cfg = _check_config(cls.__name__, config, cls.symmetric)
        *lead, n, k = shape
        g = num_groups(k, cfg.group_size)
        scale_bits = torch.finfo(SCALE_DTYPES[cfg.scale_dtype]).bits
        row_bits = 8 * packed_len(k, cfg.bits) + g * scale_bits
        if not cfg.symmetric:
            row_bits += 8 * packed_len(g, cfg.bits)
        return math.prod(lead) * n * row_bits / math.prod(shape)

    @classmethod
    def data_spec(cls, shape: tuple[int, ...], attrs: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """codes uint8 ``[..., N, packed_len(K, bits)]``, scale ``[..., N, G]`` in ``scale_dtype``, zero uint8
        ``[..., N, packed_len(G, bits)]`` (asymmetric), ``G = ceil(K / group_size)`` (1 for ``-1``)."""
        if attrs["symmetric"] != cls.symmetric:
            raise ValueError(f"{cls.format_id} stores symmetric={cls.symmetric}, metadata says {attrs['symmetric']}")
        *lead, n, k = shape
        bits, gs = attrs["bits"], attrs["group_size"]
        g = 1 if gs == -1 else -(-k // gs)
        spec = {"codes": ((*lead, n, packed_len(k, bits)), torch.uint8),
                "scale": ((*lead, n, g), SCALE_DTYPES[attrs["scale_dtype"]])}
        if not cls.symmetric:
            spec["zero"] = ((*lead, n, packed_len(g, bits)), torch.uint8)
        return spec


class UniformTensor(_UniformBase):
    """Symmetric int-k: packed ``codes`` + ``scale``; midtread grid (v2), midrise when read from v1
    (see the module docstring)."""

    format_id: ClassVar[str] = "uniform-packed"
    format_version: ClassVar[int] = 2
    data_names: ClassVar[tuple[str, ...]] = ("codes", "scale")
    attr_names: ClassVar[tuple[str, ...]] = ("bits", "group_size", "symmetric", "scale_dtype", "grid")
    symmetric: ClassVar[bool] = True

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str, meta: dict[str, Any]) -> "QuantizedTensor":
        if "grid" not in meta:
            if int(meta.get("format_version", 1)) >= 2:
                raise ValueError(f"{prefix}: {cls.format_id} v2 metadata lacks 'grid'")
            meta = {**meta, "grid": "midrise"}  # v1: the midrise grid
        elif meta["grid"] not in ("midtread", "midrise"):
            raise ValueError(f"{prefix}: unknown symmetric grid {meta['grid']!r}")
        return super().from_state_dict(tensors, prefix, meta)

    def gguf_blocks(self) -> tuple[int, torch.Tensor]:
        """The midtread grid ``(q - 2^(b-1)) * s`` in groups of 32 with scales exact in float16 is ggml's
        Q4_0 / Q5_0 / Q8_0 at 4 / 5 / 8 bits: block = fp16 ``d`` then the codes (Q4_0: byte j holds
        ``q[j] | q[j+16] << 4``; Q5_0: a uint32 of the 32 fifth bits, then those nibbles; Q8_0: int8
        ``q - 128``); little-endian. -> (type id, uint8 ``[..., N, K/32 * block_bytes]``)."""
        from gguf import GGMLQuantizationType as T

        from moequant.errors import MoequantError

        bits, k = self.attrs["bits"], self.shape[-1]
        qtype = {4: T.Q4_0, 5: T.Q5_0, 8: T.Q8_0}.get(bits)
        why = ("its grid is midrise (format v1), not llama.cpp's midtread" if self.attrs["grid"] != "midtread"
               else f"{bits}-bit codes (ggml's symmetric grids are 4, 5 and 8 bits)" if qtype is None
               else f"group size {self.attrs['group_size']} over rows of {k} (ggml blocks are 32 wide)"
               if k % 32 or resolve_group_size(k, self.attrs["group_size"]) != 32 else None)
        scale = self.data["scale"]  # [..., N, K/32]
        d = scale.to(torch.float16)
        if why is None and not torch.equal(d.to(scale.dtype), scale):
            why = f"{self.attrs['scale_dtype']} scales that float16 cannot hold exactly"
        if why is not None:
            raise MoequantError(f"{self.format_id} {bits}-bit symmetric tensor {list(self.shape)}: {why}; quantize "
                                f"with a GGUF-native method (--method q4_0 / q5_0 / q8_0 / q4_k ...) or --sym "
                                f"--group-size 32 at 4, 5 or 8 bits, or export the float model with --types q8_0")
        *lead, n, _ = self.shape
        q = unpack(self.data["codes"], bits, k).reshape(*lead, n, k // 32, 32)  # [..., N, B, 32] in 0..2^b-1
        d_bytes = d.contiguous().view(torch.uint8).reshape(*lead, n, k // 32, 2)  # [..., N, B, 2]
        if bits == 8:
            body = (q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)  # [..., N, B, 32]
        else:
            low = q & 15
            body = low[..., :16] | (low[..., 16:] << 4)  # [..., N, B, 16]
            if bits == 5:
                high = ((q >> 4) & 1).to(torch.int64) << torch.arange(32)  # [..., N, B, 32]
                qh = high.sum(-1, keepdim=True) >> torch.arange(0, 32, 8)  # [..., N, B, 4] little-endian
                body = torch.cat([(qh & 255).to(torch.uint8), body], dim=-1)
        blocks = torch.cat([d_bytes, body], dim=-1)  # [..., N, B, block_bytes]
        return int(qtype), blocks.reshape(*lead, n, -1)


class UniformAsymTensor(_UniformBase):
    """Asymmetric int-k: packed ``codes`` + ``scale`` + packed integer ``zero`` (see the module docstring)."""

    format_id: ClassVar[str] = "uniform-asym-packed"
    format_version: ClassVar[int] = 2  # v2: the last group may be partial (same layout when gs divides K)
    data_names: ClassVar[tuple[str, ...]] = ("codes", "scale", "zero")
    symmetric: ClassVar[bool] = False
