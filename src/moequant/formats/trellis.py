"""QTIP bitshift-trellis tensors: ``TrellisTensor`` (format ``trellis-packed`` v1).

Layout, for a logical weight ``[..., N, K]`` (leading dims are experts; ``N`` and ``K`` multiples of
``tile``; ``S = tile² / V`` steps per tile; the math and bit layout are in ``codecs.trellis``):

- ``words``: uint16 ``[..., N/tile, K/tile, W]``: tile ``(i, j)`` covers rows ``[i·tile, (i+1)·tile)``
  and columns ``[j·tile, (j+1)·tile)``, its weights read row-major; its ``W = ceil(bits_per_tile / 16)``
  words hold the tile's bitstream MSB first (``K·T`` bits with tail-biting, ``K·T + L − K·V`` without);
- ``scale``: float16 ``[..., N]``, one per row;
- ``lut`` (``hyb`` only): float16 ``[..., 2^Q, 2]``, the HYB lookup table, one per matrix (the
  encoder starts every matrix from ``hyb_lut_init(Q, seed=0)``; fine-tuning may change it).

Decoding: ``w[r, c] = code(s)[v] · scale[r]`` where ``s`` is the state of the step covering ``(r, c)``
(``codecs.trellis.reconstruct``), computed in float32 from the fp16 LUT and scale, so it equals the
encoder's reconstruction bit for bit. Attributes: ``bits``, ``L``, ``V``, ``tile``, ``code``, ``Q``,
``tail_biting`` (the fields of ``TrellisConfig``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from moequant.codecs.config import MethodConfig, TrellisConfig
from moequant.codecs.trellis import check_geometry, initial_lut, quantize_matrix, words_per_tile
from moequant.formats.base import QuantizedTensor
from moequant.formats.trellis_bits import pack_tile_bits, unpack_tile_states
from moequant.formats.uniform import hessian_diag
from moequant.kernels import viterbi as _viterbi  # noqa: F401  (installs the C++ Viterbi the encoder tries first)

_ATTRS = ("bits", "L", "V", "tile", "code", "Q", "tail_biting")

# moequant.kernels.trellis, imported at the first linear(): an import statement there costs ~1 µs a call
_KERNELS: Any = None


def _kernels() -> Any:
    global _KERNELS
    from moequant.kernels import trellis as kernels

    _KERNELS = kernels
    return kernels


def _check_config(config: MethodConfig) -> TrellisConfig:
    if not isinstance(config, TrellisConfig):
        raise TypeError(f"TrellisTensor needs a TrellisConfig, got {type(config).__name__}")
    return config


class TrellisTensor(QuantizedTensor):
    """Packed trellis ``words`` + per-row fp16 ``scale`` (+ fp16 ``lut`` for hyb); see the module docstring."""

    format_id: ClassVar[str] = "trellis-packed"
    format_version: ClassVar[int] = 1
    config_type: ClassVar[type[MethodConfig]] = TrellisConfig
    data_names: ClassVar[tuple[str, ...]] = ("words", "scale", "lut")
    attr_names: ClassVar[tuple[str, ...]] = _ATTRS

    @classmethod
    def names_for(cls, attrs: dict[str, Any]) -> tuple[str, ...]:
        return cls.data_names if attrs["code"] == "hyb" else ("words", "scale")

    @property
    def config(self) -> TrellisConfig:
        return TrellisConfig(**self.attrs)

    @classmethod
    def encode(cls, w: torch.Tensor, config: MethodConfig, hessian: torch.Tensor | None = None) -> "QuantizedTensor":
        """RTN-style: per-row scale to the code's RMS, then Viterbi per tile; a Hessian (``[..., K, K]`` or
        its diagonal ``[..., K]``) weights each column's squared error by its diagonal."""
        cfg = _check_config(config)
        lut = initial_lut(cfg)
        states, scale, _ = quantize_matrix(w, cfg, lut, hessian_diag(hessian, w))
        parts = {"states": states, "scale": scale}
        if lut is not None:
            parts["lut"] = lut
        return cls.from_parts(tuple(w.shape), parts, cfg)

    @classmethod
    def from_parts(cls, shape: tuple[int, ...], parts: dict[str, torch.Tensor], config: MethodConfig
                   ) -> "QuantizedTensor":
        """Pack the parts a trellis encoder produces:

        - ``states``: integer ``[..., N/tile, K/tile, S]`` (each tile's walk; a solver fills it tile column
          by tile column), or already packed ``words`` uint16 ``[..., N/tile, K/tile, W]``;
        - ``scale``: ``[..., N]``, fp16-exact;
        - ``lut`` (hyb): ``[2^Q, 2]`` shared by every matrix, or ``[..., 2^Q, 2]``; fp16-exact.
        """
        cfg = _check_config(config)
        *lead, n, k = shape
        tiles = (*lead, n // cfg.tile, k // cfg.tile)
        if n % cfg.tile or k % cfg.tile:
            raise ValueError(f"trellis tiles of {cfg.tile}x{cfg.tile} need N and K multiples of {cfg.tile}, "
                             f"got {n}x{k}")
        if "words" in parts:
            words = parts["words"].to(torch.uint16)
        else:
            states = parts["states"]
            words = pack_tile_bits(states.reshape(-1, states.shape[-1]), cfg)
        data = {"words": words.reshape(*tiles, words_per_tile(cfg)),  # [..., N/t, K/t, W]
                "scale": parts["scale"].to(torch.float16).reshape(*lead, n)}  # [..., N]
        if cfg.code == "hyb":
            lut = parts["lut"].to(torch.float16)
            data["lut"] = lut.expand(*lead, *lut.shape[-2:]).clone()  # [..., 2^Q, 2]
        attrs = {name: getattr(cfg, name) for name in _ATTRS}
        return cls(tuple(shape), data, attrs)

    def states(self) -> torch.Tensor:
        """Every tile's walk, int64 ``[..., N/tile, K/tile, S]``."""
        words = self.data["words"]
        flat = unpack_tile_states(words.reshape(-1, words.shape[-1]), self.config)  # [B, S]
        return flat.reshape(*words.shape[:-1], flat.shape[-1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decoded through the ``moequant::trellis_dequant`` op (``kernels.trellis``), one matrix at a time."""
        from moequant.kernels.trellis import dequant

        cfg = self.config
        words, scale = self.data["words"], self.data["scale"]
        lead = self.shape[:-2]
        if not lead:
            return dequant(words, scale, self.data.get("lut"), cfg).to(dtype)
        words = words.reshape(-1, *words.shape[len(lead):])  # [E, N/t, K/t, W]
        scale = scale.reshape(-1, scale.shape[-1])  # [E, N]
        luts = self.data.get("lut")
        luts = None if luts is None else luts.reshape(-1, *luts.shape[-2:])  # [E, 2^Q, 2]
        out = [dequant(words[e], scale[e], None if luts is None else luts[e], cfg) for e in range(words.shape[0])]
        return torch.stack(out).reshape(self.shape).to(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K] -> x Ŵᵀ + b [..., N]`` through ``kernels.trellis.linear`` (fused C++ GEMV for a few rows
        on CPU, the C++ decode + ``F.linear`` for more, the torch reference elsewhere)."""
        if len(self.shape) != 2:
            raise ValueError(f"{self.format_id}: linear() needs a 2-D tensor, shape is {self.shape}")
        return (_KERNELS or _kernels()).linear(self, x, bias)

    @classmethod
    def expected_bits_per_weight(cls, shape: tuple[int, ...], config: MethodConfig) -> float:
        cfg = _check_config(config)
        *lead, n, k = shape
        matrix_bits = (n // cfg.tile) * (k // cfg.tile) * words_per_tile(cfg) * 16 + n * 16
        if cfg.code == "hyb":
            matrix_bits += (1 << cfg.Q) * 2 * 16
        return math.prod(lead) * matrix_bits / math.prod(shape)

    @classmethod
    def data_spec(cls, shape: tuple[int, ...], attrs: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """words uint16 ``[..., N/tile, K/tile, W]``, scale float16 ``[..., N]``, lut float16 ``[..., 2^Q, 2]`` (hyb)."""
        cfg = TrellisConfig(**{a: attrs[a] for a in _ATTRS})
        check_geometry(cfg)
        *lead, n, k = shape
        if n % cfg.tile or k % cfg.tile:
            raise ValueError(f"trellis tiles of {cfg.tile}x{cfg.tile} need N and K multiples of {cfg.tile}, got {n}x{k}")
        spec = {"words": ((*lead, n // cfg.tile, k // cfg.tile, words_per_tile(cfg)), torch.uint16),
                "scale": ((*lead, n), torch.float16)}
        if cfg.code == "hyb":
            spec["lut"] = ((*lead, 1 << cfg.Q, 2), torch.float16)
        return spec
