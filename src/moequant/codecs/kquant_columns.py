"""The GGUF block types driven column by column (GPTQ / LDLQ, see ``codecs.columns``).

When the solver reaches the first column of a block (a k-quant super-block of 256, or a block of 32),
``fit`` chooses that block's parameters — fp16 ``d``/``dmin`` and the integer sub-block scales and mins —
from the block's *current* columns (the original weights plus the error feedback so far), weighted by
the Hessian diagonal; ``round`` then puts each column on that fixed grid, and the solver feeds the
rounding error forward. The parts assemble into ``formats.kquant``'s tensor of the stored type
(llama.cpp's fallback type when the row width is not a multiple of the requested type's block).
"""

from __future__ import annotations

import torch

from moequant.codecs.columns import ColumnQuantizer
from moequant.codecs.kquant import BlockParams, choose_params, effective, grid_decode, grid_round, stored_type
from moequant.codecs.config import GgufConfig


class GgufColumns(ColumnQuantizer):
    """One ``[R, K]`` matrix on the grid of ``stored_type(config.qtype, K)``; ``hdiag [K]`` weights the
    parameter search. F16 (the fallback when 32 does not divide ``K``) rounds each column to float16."""

    def __init__(self, rows: int, cols: int, config: GgufConfig, hdiag: torch.Tensor | None = None) -> None:
        super().__init__(rows, cols)
        self.t = t = stored_type(config.qtype, cols)
        self.steps = config.search_steps
        self.hdiag = None if hdiag is None else hdiag.detach().to(torch.float32)  # [K]
        if t.kind == "float":
            self.values = torch.zeros(rows, cols, dtype=torch.float16)  # [R, K]
            return
        self.group = t.block
        nb, ns = cols // t.block, t.n_sub
        self.params = BlockParams(torch.zeros(rows, nb, dtype=torch.float16))  # d [R, B]
        if t.kind in ("min", "affine"):
            self.params.dmin = torch.zeros(rows, nb, dtype=torch.float16)  # [R, B]
        if t.two_level:
            self.params.scales = torch.zeros(rows, nb, ns, dtype=torch.int16)  # [R, B, S]
            if t.kind == "min":
                self.params.mins = torch.zeros(rows, nb, ns, dtype=torch.int16)  # [R, B, S]
        self.scale = torch.zeros(rows, cols // t.sub)  # [R, K / sub] effective sub-block scales
        self.offset = torch.zeros(rows, cols // t.sub) if t.kind in ("min", "affine") else None

    def fit(self, c0: int, w: torch.Tensor) -> None:
        t = self.t
        if t.kind == "float":
            return
        imp = None if self.hdiag is None else self.hdiag[c0:c0 + t.block]  # [block]
        p = choose_params(t, w, imp, self.steps)  # fields [R, 1] / [R, 1, S]
        b = c0 // t.block
        for name, v in p.parts().items():
            getattr(self.params, name)[:, b] = v[:, 0]
        s, m = effective(t, p)  # [R, S]
        g0 = c0 // t.sub
        self.scale[:, g0:g0 + t.n_sub] = s
        if self.offset is not None:
            self.offset[:, g0:g0 + t.n_sub] = m

    def round(self, c0: int, w: torch.Tensor) -> torch.Tensor:
        t = self.t
        if t.kind == "float":
            v = w.to(torch.float16)  # [R, 1]
            self.values[:, c0:c0 + v.shape[1]] = v
            return v.to(torch.float32)
        g = c0 // t.sub
        s = self.scale[:, g:g + 1]  # [R, 1]
        m = None if self.offset is None else self.offset[:, g:g + 1]
        u = grid_round(t, w, s, m)  # [R, 1]
        self.codes[:, c0:c0 + u.shape[1]] = u
        return grid_decode(t, u, s, m)

    def parts(self) -> dict[str, torch.Tensor]:
        if self.t.kind == "float":
            return {"values": self.values}
        return {"codes": self.codes, **self.params.parts()}


def gguf_columns(config: GgufConfig, w: torch.Tensor, hdiag: torch.Tensor | None = None) -> GgufColumns:
    """The GGUF column quantizer for ``w [R, K]`` (``hdiag [K]``: the Hessian diagonal)."""
    return GgufColumns(w.shape[0], w.shape[1], config, hdiag)
