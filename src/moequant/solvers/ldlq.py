"""GPTQ / BlockLDLQ: round the columns of ``W [R, K]`` one block at a time and feed each block's error
forward onto the columns not yet quantized, so that the layer's output error ``tr(Δ H Δᵀ)`` (``H`` the
input second moment, ``Δ = W - Ŵ``) is what gets minimised rather than ``‖Δ‖²``.

The math, in the GPTQ convention (left to right; QuIP#'s back-to-front LDL form is the same algorithm
on reversed columns). Let ``U`` be the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``). For the
trailing columns ``T = [c, K)`` it holds that ``(H_TT)⁻¹ = U_TTᵀ U_TT``, so once the columns before ``c``
are fixed, the best compensation of an error ``e_B = W_B - Ŵ_B`` made on a block ``B = [c, c + b)`` is

    W_rest ← W_rest − (e_B U_BB⁻¹) U_B,rest

For ``b = 1`` this is GPTQ's column update ``w_j ← w_j − (e / U_cc) U_c,j``; for ``b = 16`` it is
BlockLDLQ, where a vector codec (trellis tiles) quantizes 16 columns jointly. Updates are lazy: the
feedback within a batch of ``lazy`` columns is applied at once to everything after the batch (GPTQ's
trick; exact, only the order of additions changes).

act-order (scalar codecs only) processes the columns by decreasing ``diag(H)``; group parameters are
then fixed up front from the original weight ("static groups") so that groups stay contiguous in
the stored layout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from moequant.codecs.columns import ColumnQuantizer
from moequant.errors import MoequantError

log = logging.getLogger(__name__)


@dataclass
class LdlqResult:
    w_hat: torch.Tensor  # [R, K] reconstruction (fp32)
    proxy: float  # tr(ΔHΔᵀ) / tr(WHWᵀ) with the undamped H


def proxy_loss(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(Δ H Δᵀ) / tr(W H Wᵀ)`` in float64 for ``w, w_hat [R, K]`` and ``h [K, K]``."""
    w64, h64 = w.to(torch.float64), h.to(torch.float64)
    d = w64 - w_hat.to(torch.float64)  # [R, K]
    num = float(((d @ h64) * d).sum())
    den = float(((w64 @ h64) * w64).sum())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def inverse_cholesky_upper(h: torch.Tensor, where: str = "") -> torch.Tensor:
    """Upper ``U`` with ``H⁻¹ = UᵀU`` (float64). ``h`` must already be damped; if it is still not
    positive definite (rounding), the diagonal is raised by 10× steps of 1e-6·mean(diag) and a warning
    is logged; after 8 tries it is an error naming ``where``."""
    h = h.to(torch.float64)
    bump = 0.0
    base = float(torch.diagonal(h).mean()) or 1.0
    for attempt in range(9):
        # K x K float64 each (180 MiB at K = 4864): no identity matrix, no copy of h unless bumped
        chol, info = torch.linalg.cholesky_ex(h + bump * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
                                              if bump else h)
        if int(info) == 0:
            # one K x K buffer from here on: H⁻¹ overwrites the factor, then U overwrites H⁻¹
            u = torch.cholesky_inverse(chol, out=chol)
            info = torch.empty((), dtype=torch.int32, device=h.device)
            torch.linalg.cholesky_ex(u, upper=True, out=(u, info))
            if int(info) == 0:
                if bump:
                    log.warning("%s: Hessian needed extra damping %.3g to factorise", where or "tensor", bump)
                return u
        bump = base * 1e-6 * (10 ** attempt)
    raise MoequantError(f"{where or 'tensor'}: Hessian is not positive definite even after extra damping")


def ldlq(w: torch.Tensor, h_damped: torch.Tensor, quantizer: ColumnQuantizer, *, lazy: int = 128,
         act_order: bool = False, h_proxy: torch.Tensor | None = None, where: str = "") -> LdlqResult:
    """Quantize ``w [R, K]`` with error feedback under the damped Hessian ``h_damped [K, K]``.

    ``quantizer`` records the codes (read them with ``quantizer.parts()``); ``h_proxy`` (default
    ``h_damped``) is the Hessian the reported proxy loss uses.
    """
    r, k = w.shape
    b = quantizer.block
    if k % b or quantizer.group % b:
        raise ValueError(f"{where}: codec block {b} must divide K={k} and the group {quantizer.group}")
    lazy = max(b, (lazy // b) * b)
    w0 = w.detach().to(torch.float32)
    work = w0.clone()  # [R, K] updated in place
    h = h_damped.to(torch.float64)
    perm = None
    if act_order:
        if b != 1:
            raise ValueError(f"{where}: act-order needs a scalar codec (block 1), got block {b}")
        for c0 in range(0, k, quantizer.group):
            quantizer.fit(c0, work[:, c0:c0 + quantizer.group])
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)  # [K]
        work = work[:, perm]
        h = h[perm][:, perm]
    u = inverse_cholesky_upper(h, where).to(torch.float32)  # [K, K]
    del h
    w_hat = torch.zeros_like(work)  # [R, K] in processing order
    for b0 in range(0, k, lazy):
        b1 = min(k, b0 + lazy)
        cur = work[:, b0:b1]  # [R, L] view: updated within the batch
        err = torch.zeros_like(cur)  # [R, L] scaled errors of the batch
        for c in range(b0, b1, b):
            j = c - b0
            if perm is None and c % quantizer.group == 0:
                quantizer.fit(c, work[:, c:c + quantizer.group])
            col = c if perm is None else int(perm[c])
            wb = cur[:, j:j + b]  # [R, b]
            qb = quantizer.round(col, wb)  # [R, b]
            w_hat[:, c:c + b] = qb
            if b == 1:
                e = (wb - qb) / u[c, c]  # [R, 1]
            else:
                e = torch.linalg.solve_triangular(u[c:c + b, c:c + b], wb - qb, upper=True, left=False)  # [R, b]
            cur[:, j + b:] -= e @ u[c:c + b, c + b:b1]
            err[:, j:j + b] = e
        if b1 < k:
            work[:, b1:] -= err @ u[b0:b1, b1:]
    if perm is not None:
        w_hat = w_hat[:, torch.argsort(perm)]
    hp = h_damped if h_proxy is None else h_proxy
    return LdlqResult(w_hat, proxy_loss(w0, w_hat, hp))
