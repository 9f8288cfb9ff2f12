"""Column-by-column quantizers: how a codec is driven by an error-feedback solver (GPTQ / BlockLDLQ).

A solver walks the input columns of one matrix ``w [R, K]`` from left to right and, before each
column block, has already added to it the feedback of the errors made so far. It asks the codec:

- ``fit(c0, w)``: the columns ``[c0, c0 + group)`` start a parameter group (a scale, a zero point, a
  block absmax); fix its parameters from their *current* values ``w [R, group]``;
- ``round(c0, w)``: quantize the columns ``[c0, c0 + block)`` jointly and return their reconstruction
  ``[R, block]`` (the solver feeds ``w - w_hat`` forward);
- ``parts()``: the unpacked parts the packed format stores (``formats.*.from_parts``).

``block`` is the number of columns quantized jointly: 1 for scalar codes (int, NF4/FP4 — GPTQ's
column-wise feedback), 16 for trellis tiles (BlockLDLQ). ``group`` is a multiple of ``block``.
Parameters that need the whole matrix (double-quantized absmax) are fixed once from the weight the
quantizer is built with, and ``fit`` leaves them alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from moequant.codecs.config import LutConfig, TrellisConfig, UniformConfig
from moequant.codecs.trellis import (check_geometry, code_rms, code_values, fp16_row_scale, initial_lut,
                                     quantize_matrix, steps_per_tile)
from moequant.codecs.lut import block_absmax, dq_dequantize, dq_quantize, lut_assign, lut_dequantize, lut_values
from moequant.codecs.uniform import (SCALE_DTYPES, decode_grid, fit_groups, num_groups, resolve_group_size,
                                     round_to_grid, shrink_factors)


class ColumnQuantizer(ABC):
    """Quantizes one ``[R, K]`` matrix column block by column block (see the module docstring)."""

    block: int = 1
    group: int = 1

    def __init__(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8)  # [R, K]

    @abstractmethod
    def fit(self, c0: int, w: torch.Tensor) -> None:
        """Fix the parameters of the group starting at column ``c0`` from ``w [R, group]``."""

    @abstractmethod
    def round(self, c0: int, w: torch.Tensor) -> torch.Tensor:
        """Quantize ``w [R, block]`` (columns ``c0 ...``), record the codes, return the reconstruction."""

    @abstractmethod
    def parts(self) -> dict[str, torch.Tensor]:
        """The unpacked parts of the packed format (``from_parts``)."""


class UniformColumns(ColumnQuantizer):
    """Uniform int-k: one scale (and zero point) per group, MSE clip search on the updated weights
    (``hdiag`` ``[K]`` weights the search's error by the Hessian diagonal, as in ``uniform_quantize``)."""

    def __init__(self, rows: int, cols: int, config: UniformConfig, hdiag: torch.Tensor | None = None) -> None:
        super().__init__(rows, cols)
        self.cfg = config
        self.group = resolve_group_size(cols, config.group_size)
        g = num_groups(cols, self.group)  # the last group may be partial
        self.scale = torch.zeros(rows, g)  # [R, G]
        self.zero = None if config.symmetric else torch.zeros(rows, g)  # [R, G]
        self.hdiag = None if hdiag is None else hdiag.detach().to(torch.float32)  # [K]
        self.shrinks = shrink_factors(config.clip_search, config.clip_steps, config.clip_min)

    def fit(self, c0: int, w: torch.Tensor) -> None:
        wg = w.to(torch.float32).unsqueeze(1)  # [R, 1, g]
        hg = None
        if self.hdiag is not None:
            hg = self.hdiag[c0:c0 + self.group].expand_as(w).unsqueeze(1)  # [R, 1, g]
        _, s, z = fit_groups(wg, hg, self.cfg.bits, self.cfg.symmetric, self.shrinks,
                             SCALE_DTYPES[self.cfg.scale_dtype])
        gi = c0 // self.group
        self.scale[:, gi] = s[:, 0, 0]
        if self.zero is not None:
            self.zero[:, gi] = z[:, 0, 0]

    def round(self, c0: int, w: torch.Tensor) -> torch.Tensor:
        gi = c0 // self.group
        s = self.scale[:, gi:gi + 1]  # [R, 1]
        z = None if self.zero is None else self.zero[:, gi:gi + 1]  # [R, 1]
        q = round_to_grid(w.to(torch.float32), s, z, self.cfg.bits)  # [R, block]
        self.codes[:, c0:c0 + w.shape[1]] = q.to(torch.uint8)
        return decode_grid(q, s, z, self.cfg.bits)

    def parts(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "scale": self.scale}
        if self.zero is not None:
            out["zero"] = self.zero.to(torch.uint8)
        return out


class LutColumns(ColumnQuantizer):
    """NF4 / FP4 with blockwise absmax. Without double quant the absmax of each block is taken from the
    updated weights when the block is reached; with double quant all absmax values are fixed up front
    from the original weight (they are quantized together), and ``fit`` is a no-op."""

    def __init__(self, rows: int, cols: int, config: LutConfig, w0: torch.Tensor) -> None:
        super().__init__(rows, cols)
        self.cfg = config
        self.group = config.block_size
        self.lut = lut_values(config.lut)  # [16]
        self.dq: dict[str, torch.Tensor] | None = None
        if config.double_quant:
            a_codes, a_scale, a_offset = dq_quantize(block_absmax(w0, config.block_size), config.dq_block_size)
            self.dq = {"absmax_codes": a_codes, "absmax_scale": a_scale, "absmax_offset": a_offset}
            self.absmax = dq_dequantize(a_codes, a_scale, a_offset, config.dq_block_size)  # [R, NB]
        else:
            self.absmax = torch.zeros(rows, cols // config.block_size)  # [R, NB]

    def fit(self, c0: int, w: torch.Tensor) -> None:
        if self.dq is None:
            b = c0 // self.group
            self.absmax[:, b] = w.abs().amax(-1).to(torch.float16).to(torch.float32)

    def round(self, c0: int, w: torch.Tensor) -> torch.Tensor:
        b = c0 // self.group
        a = self.absmax[:, b:b + 1]  # [R, 1]
        n = w.shape[1]
        codes = lut_assign(w, self.lut, a, n)  # [R, n]: one "block" of n columns sharing absmax a
        self.codes[:, c0:c0 + n] = codes
        return lut_dequantize(codes, a, self.lut, n)

    def parts(self) -> dict[str, torch.Tensor]:
        if self.dq is not None:
            return {"codes": self.codes, **self.dq}
        return {"codes": self.codes, "absmax": self.absmax}


class TrellisColumns(ColumnQuantizer):
    """QTIP trellis tiles, ``tile`` columns at a time (BlockLDLQ): each call encodes the ``N/tile`` tiles
    of one tile column jointly (Viterbi per tile, error weighted by the Hessian diagonal); the error of
    the whole block is fed forward by the solver. Row scales (and the HYB LUT) are fixed up front from
    the weight the quantizer is built with, so ``fit`` is a no-op."""

    def __init__(self, rows: int, cols: int, config: TrellisConfig, w0: torch.Tensor,
                 hdiag: torch.Tensor | None = None) -> None:
        super().__init__(rows, cols)
        check_geometry(config)
        if rows % config.tile or cols % config.tile:
            raise ValueError(f"trellis tiles of {config.tile}x{config.tile} need both dims divisible by "
                             f"{config.tile}, got [{rows}, {cols}]")
        self.cfg = config
        self.block = self.group = config.tile
        self.lut = initial_lut(config)  # [2^Q, 2] fp16-exact, or None
        self.scale = fp16_row_scale(w0.to(torch.float32), code_rms(code_values(config, self.lut)))  # [R]
        self.hdiag = None if hdiag is None else hdiag.detach().to(torch.float32)  # [K]
        self.states = torch.zeros(rows // config.tile, cols // config.tile, steps_per_tile(config),
                                  dtype=torch.int64)  # [R/t, K/t, S]

    def fit(self, c0: int, w: torch.Tensor) -> None:
        pass

    def round(self, c0: int, w: torch.Tensor) -> torch.Tensor:
        t = self.cfg.tile
        hd = None if self.hdiag is None else self.hdiag[c0:c0 + t]
        states, _, w_hat = quantize_matrix(w, self.cfg, self.lut, hdiag=hd, scale=self.scale)  # [R/t, 1, S]
        self.states[:, c0 // t] = states[:, 0]
        return w_hat

    def parts(self) -> dict[str, torch.Tensor]:
        out = {"states": self.states, "scale": self.scale}
        if self.lut is not None:
            out["lut"] = self.lut
        return out


def uniform_columns(config: UniformConfig, w: torch.Tensor, hdiag: torch.Tensor | None = None) -> UniformColumns:
    """The int-k column quantizer for ``w [R, K]``."""
    return UniformColumns(w.shape[0], w.shape[1], config, hdiag)


def lut_columns(config: LutConfig, w: torch.Tensor, hdiag: torch.Tensor | None = None) -> LutColumns:
    """The NF4 / FP4 column quantizer for ``w [R, K]`` (the absmax blocks ignore ``hdiag``)."""
    if w.shape[1] % config.block_size:
        raise ValueError(f"block size {config.block_size} does not divide the input dim K={w.shape[1]}")
    return LutColumns(w.shape[0], w.shape[1], config, w)


def trellis_columns(config: TrellisConfig, w: torch.Tensor, hdiag: torch.Tensor | None = None) -> TrellisColumns:
    """The trellis column quantizer for ``w [R, K]``."""
    return TrellisColumns(w.shape[0], w.shape[1], config, w, hdiag)
