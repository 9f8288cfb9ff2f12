"""AQLM additive-codebook tensors: ``AdditiveTensor`` (format ``additive-packed`` v1).

Layout, for a logical weight ``[..., N, K]`` (leading dims are experts) with ``G = K/g`` groups per row and
``M`` codebooks of ``2^B`` codewords of length ``g`` (the math is ``codecs.additive``):

- ``codes``: uint8 ``[..., N, R]``: each row's ``G·M`` codes in the order (group, codebook), their low
  ``min(B, 8)`` bits packed by ``bitpack`` at that width, then, when ``B > 8``, their high ``B − 8`` bits
  packed at ``B − 8`` bits; ``R = packed_len(G·M, min(B, 8)) + packed_len(G·M, B − 8)`` (second term only when
  ``B > 8``), so a code costs exactly ``B`` bits up to the padding of a row to whole chunks;
- ``scale``: float16 ``[..., N]``, one per row;
- ``codebooks``: ``[..., M, 2^B, g]`` with ``share = "expert"`` (one set per matrix), or ``[M, 2^B, g]`` with
  ``share = "layer"``: one set for every expert of the tensor, stored once and not indexed by expert
  (``select(e)`` hands each expert the same set); float16 with ``codebook_bits = 16``, int8 with
  ``codebook_bits = 8``, then with
- ``codebook_scale``: float16 ``[..., M]`` (shared: ``[M]``), each codebook's step: its values are
  ``int8 · step`` (``codecs.additive.codebook_values``).

Decoding: ``Ŵ[r, jg:(j+1)g] = scale[r] · Σ_m codebooks[m, code[r, j, m]]`` in float32, codewords added in the
order ``m = 0 .. M−1`` (``codecs.additive.reconstruct``), which is the encoder's reconstruction bit for bit.
Bits per weight count every stored bit: codes, scales and the codebooks (once when shared), their steps too.
Attributes: ``M``, ``B``, ``g``, ``share``, ``codebook_bits`` (the fields of ``AdditiveConfig``). Version 2 added
``codebook_bits``; a version-1 tensor has none and is read as ``codebook_bits = 16`` (its float16 codebooks).

Run time (``linear``): the op ``moequant::additive_linear`` of ``kernels.additive`` — on the CPU a C++ GEMV from
a lookup table of every input group against every codeword (or each row's codewords summed in registers) for a
few input rows, tiles of decoded rows and a GEMM for more, never the whole matrix; the reference decode +
``F.linear`` elsewhere.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from moequant.codecs.additive import codebook_grid, codebook_values, num_groups, reconstruct
from moequant.codecs.additive_search import quantize
from moequant.codecs.config import AdditiveConfig, MethodConfig
from moequant.formats.base import QuantizedTensor
from moequant.formats.bitpack import pack, packed_len, unpack
from moequant.kernels import additive_encode as _additive_encode  # noqa: F401  (installs the C++ assign and beam search)

_ATTRS = ("M", "B", "g", "share", "codebook_bits")
_BOOKS = ("codebooks", "codebook_scale")  # the tensors a shared set stores once

def _check_config(config: MethodConfig) -> AdditiveConfig:
    if not isinstance(config, AdditiveConfig):
        raise TypeError(f"AdditiveTensor needs an AdditiveConfig, got {type(config).__name__}")
    return config


def code_bytes(n_codes: int, bits: int) -> int:
    """Bytes of one row of ``n_codes`` codes of ``bits`` bits (low byte part, then the high part)."""
    low = packed_len(n_codes, min(bits, 8))
    return low + (packed_len(n_codes, bits - 8) if bits > 8 else 0)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes ``[..., n]`` (integers < 2^bits) -> uint8 ``[..., code_bytes(n, bits)]``."""
    c = codes.to(torch.int64)
    if bits <= 8:
        return pack(c, bits)
    return torch.cat([pack(c & 0xFF, 8), pack(c >> 8, bits - 8)], dim=-1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 ``[..., code_bytes(n, bits)]`` -> int64 ``[..., n]``."""
    if bits <= 8:
        return unpack(packed, bits, n).to(torch.int64)
    low = packed_len(n, 8)
    return unpack(packed[..., :low], 8, n).to(torch.int64) | (
        unpack(packed[..., low:], bits - 8, n).to(torch.int64) << 8)


def _shared(shape: tuple[int, ...], attrs: dict[str, Any]) -> bool:
    """Does a tensor of ``shape`` store one codebook set for all its matrices?"""
    return attrs.get("share") == "layer" and len(shape) > 2


def _upgrade(meta: Any) -> Any:
    """Version-1 metadata read as the current version: no ``codebook_bits`` meant float16 codebooks."""
    if not isinstance(meta, dict) or int(meta.get("format_version", 1)) >= 2:
        return meta
    if "codebook_bits" in meta:
        raise ValueError(f"additive-packed version 1 has no 'codebook_bits' attribute (found {meta['codebook_bits']!r})")
    return {**meta, "codebook_bits": 16}


class AdditiveTensor(QuantizedTensor):
    """Packed additive codes + fp16 row scales + fp16 (or int8 + a step each) codebooks; see the module docstring."""

    format_id: ClassVar[str] = "additive-packed"
    format_version: ClassVar[int] = 2  # v2: ``codebook_bits`` (v1: always 16, float16 codebooks)
    config_type: ClassVar[type[MethodConfig]] = AdditiveConfig
    data_names: ClassVar[tuple[str, ...]] = ("codes", "scale", "codebooks", "codebook_scale")
    attr_names: ClassVar[tuple[str, ...]] = _ATTRS

    def __init__(self, shape: tuple[int, ...], data: dict[str, torch.Tensor], attrs: dict[str, Any]) -> None:
        if not _shared(tuple(shape), attrs) or "codebooks" not in data:
            super().__init__(shape, data, attrs)
            return
        # shared: [M, 2^B, g] and [M], not indexed by expert, so the leading-dims rule does not apply to them
        books = {n: data[n] for n in _BOOKS if n in data}
        if books["codebooks"].dim() != 3:
            raise ValueError(f"{self.format_id}: shared codebooks {tuple(books['codebooks'].shape)} are not "
                             f"[M, 2^B, g]")
        super().__init__(shape, {**data, **{n: t.expand(*shape[:-2], *t.shape) for n, t in books.items()}}, attrs)
        for n, t in books.items():
            if n in self.data:
                self.data[n] = t

    @classmethod
    def names_for(cls, attrs: dict[str, Any]) -> tuple[str, ...]:
        return cls.data_names if attrs.get("codebook_bits", 16) == 8 else cls.data_names[:3]

    @classmethod
    def check_meta(cls, meta: Any) -> tuple[tuple[int, ...], dict[str, Any]]:
        return super().check_meta(_upgrade(meta))

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str, meta: dict[str, Any]) -> "QuantizedTensor":
        try:
            meta = _upgrade(meta)
        except ValueError as e:
            raise ValueError(f"{prefix}: {e}") from None
        return super().from_state_dict(tensors, prefix, meta)

    @property
    def config(self) -> AdditiveConfig:
        return AdditiveConfig(**self.attrs)

    @classmethod
    def encode(cls, w: torch.Tensor, config: MethodConfig, hessian: torch.Tensor | None = None) -> "QuantizedTensor":
        """``codecs.additive_search.quantize`` under ``hessian`` (``[..., K, K]``, ``[K, K]`` shared, a diagonal
        ``[..., K]``, or None for plain squared error); pass it damped."""
        cfg = _check_config(config)
        codes, codebooks, scale = quantize(w, hessian, cfg)
        return cls.from_parts(tuple(w.shape), {"codes": codes, "codebooks": codebooks, "scale": scale}, cfg)

    @classmethod
    def from_parts(cls, shape: tuple[int, ...], parts: dict[str, torch.Tensor], config: MethodConfig
                   ) -> "QuantizedTensor":
        """Pack ``codes`` integer ``[..., N, G, M]``, ``scale`` ``[..., N]`` (float16-exact) and ``codebooks``
        ``[..., M, 2^B, g]`` (``[M, 2^B, g]`` when shared or 2-D), rounded to ``codebook_bits`` storage
        (``codecs.additive.codebook_grid``: exact for codebooks the encoder left on that grid)."""
        cfg = _check_config(config)
        *lead, n, k = shape
        G = num_groups(k, cfg.g)
        codes = parts["codes"].reshape(*lead, n, G * cfg.M)  # [..., N, G·M]
        if codes.numel() and int(codes.max()) >= 1 << cfg.B:
            raise ValueError(f"codes out of range for {cfg.B}-bit codebooks")
        attrs = {name: getattr(cfg, name) for name in _ATTRS}
        books, step = codebook_grid(parts["codebooks"], cfg.codebook_bits)  # [..., M, 2^B, g], [..., M] or None
        data = {"codes": pack_codes(codes, cfg.B),  # [..., N, R]
                "scale": parts["scale"].to(torch.float16).reshape(*lead, n),  # [..., N]
                "codebooks": books}  # [..., M, 2^B, g] or [M, 2^B, g]: float16, or int8 with its steps
        if step is not None:
            data["codebook_scale"] = step  # [..., M] or [M]
        return cls(tuple(shape), data, attrs)

    def codebook_values(self) -> torch.Tensor:
        """The codebooks' values: float16 ``[..., M, 2^B, g]`` as stored (``[M, 2^B, g]`` when shared), or float32
        ``int8 · step`` for ``codebook_bits = 8``."""
        if self.attrs["codebook_bits"] == 16:
            return self.data["codebooks"]
        return codebook_values(self.data["codebooks"], self.data["codebook_scale"])

    def codes(self) -> torch.Tensor:
        """Every group's codes, int64 ``[..., N, G, M]``."""
        cfg = self.config
        *lead, n, k = self.shape
        G = num_groups(k, cfg.g)
        return unpack_codes(self.data["codes"], cfg.B, G * cfg.M).reshape(*lead, n, G, cfg.M)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``codecs.additive.reconstruct`` of the stored codes, codebooks and scales -> ``[*shape]``."""
        *lead, n, k = self.shape
        codes = self.codes().reshape(-1, n, k // self.attrs["g"], self.attrs["M"])  # [E, N, G, M]
        books = self.codebook_values()
        if books.dim() > 3:
            books = books.reshape(-1, *books.shape[-3:])  # [E, M, 2^B, g]
        w = reconstruct(codes, books, self.data["scale"].reshape(-1, n))  # [E, N, K]
        return w.reshape(self.shape).to(dtype)

    def select(self, index: int) -> "QuantizedTensor":
        """Expert ``index``: its codes and scales, and its own codebooks or the shared set."""
        if len(self.shape) < 3:
            raise ValueError(f"{self.format_id}: select() needs a leading expert dim, shape is {self.shape}")
        shared = _shared(self.shape, self.attrs)
        data = {n: t if n in _BOOKS and shared else t[index] for n, t in self.data.items()}
        return type(self)(self.shape[1:], data, dict(self.attrs))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K] -> x Ŵᵀ + b [..., N]`` for a 2-D tensor (an expert's view included) through
        ``kernels.additive`` (op ``moequant::additive_linear``): on the CPU the C++ lookup-table / codeword GEMV,
        or tiles of decoded rows and a GEMM, never the whole matrix; the reference decode + ``F.linear``
        elsewhere, under autograd and in reference mode."""
        from moequant.kernels import additive as kernels

        return kernels.linear(self, x, bias)

    @classmethod
    def expected_bits_per_weight(cls, shape: tuple[int, ...], config: MethodConfig) -> float:
        cfg = _check_config(config)
        *lead, n, k = shape
        matrices = math.prod(lead)
        book_sets = 1 if _shared(tuple(shape), {"share": cfg.share}) else matrices
        bits = matrices * n * (8 * code_bytes(num_groups(k, cfg.g) * cfg.M, cfg.B) + 16)
        bits += book_sets * cfg.M * ((1 << cfg.B) * cfg.g * cfg.codebook_bits + (16 if cfg.codebook_bits == 8 else 0))
        return bits / math.prod(shape)

    @classmethod
    def data_spec(cls, shape: tuple[int, ...], attrs: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """codes uint8 ``[..., N, R]``, scale float16 ``[..., N]``, codebooks ``[..., M, 2^B, g]`` (shared:
        ``[M, 2^B, g]``) float16, or int8 with codebook_scale float16 ``[..., M]`` (shared: ``[M]``)."""
        *lead, n, k = shape
        m, b, g = attrs["M"], attrs["B"], attrs["g"]
        G = num_groups(k, g)
        books = (m, 1 << b, g) if _shared(tuple(shape), attrs) else (*lead, m, 1 << b, g)
        spec = {"codes": ((*lead, n, code_bytes(G * m, b)), torch.uint8),
                "scale": ((*lead, n), torch.float16)}
        if attrs.get("codebook_bits", 16) == 8:
            spec.update(codebooks=(books, torch.int8), codebook_scale=(books[:-2], torch.float16))
        else:
            spec["codebooks"] = (books, torch.float16)
        return spec
