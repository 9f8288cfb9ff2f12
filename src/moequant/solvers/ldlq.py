"""GPTQ / BlockLDLQ: round the columns of ``W [R, K]`` one block at a time and feed each block's error
forward onto the columns not yet quantized, so that the layer's output error ``tr(Δ H Δᵀ)`` (``H`` the
input second moment, ``Δ = W - Ŵ``) is what gets minimised rather than ``‖Δ‖²``.

The math, in QuIP's LDL form (left to right). Factor the damped Hessian as

    H = (I + A) D (I + A)ᵀ,    A strictly upper (zero on and below the b × b diagonal blocks), D block-diagonal

(``b`` the codec's block: 1 for scalar codes, 16 for trellis tiles). Column block ``B = [c, c + b)`` is
rounded at the target

    X_B = W_B + (W − Ŵ)_{<c} A_{<c,B},    Ŵ_B = Q(X_B)

— the errors already made, each weighted by how the Hessian ties its column to ``B``. For ``b = 1`` this
is LDLQ, which QuIP proves equal to GPTQ's column update ``w_j ← w_j − (e / U_cc) U_c,j`` (``U`` the upper
Cholesky factor of ``H⁻¹``); for ``b = 16`` it is QuIP#'s BlockLDLQ. ``A`` comes from one Cholesky factor
of the column-reversed matrix (``J H J = L Lᵀ`` gives ``H = Ũ Ũᵀ`` with ``Ũ = J L J`` upper, and
``I + A = Ũ · blockdiag(Ũ_BB)⁻¹``): one factorisation, where GPTQ's ``U`` takes a factorisation, an inverse
and a second factorisation (~4x the float64 work; K = 8,960: 4.2 s instead of 15.7 s, BENCHMARKS.md). Feedback is
applied lazily: the errors of a batch of ``lazy`` columns reach the columns after it at once (GPTQ's
trick; exact, only the order of additions changes).

A codec's group parameters (a scale, a k-quant super-block) are fitted when the solver reaches the
group's first column, from the group's columns *as GPTQ holds them at that moment*: each carries the best
compensation for the errors made so far, ``W_G + Y_G (I + A)_GG⁻¹`` with ``Y_G`` the feedback received
(the same values the textbook GPTQ update produces; a group that reaches past the current lazy batch is
given the batch's feedback first).

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
    """``tr(Δ H Δᵀ) / tr(W H Wᵀ)`` for ``w, w_hat [R, K]`` and ``h [K, K]``: float32 products (the two ``[R, K] x
    [K, K]`` GEMMs are most of the cost: 2x faster than float64), each sum taken in float64. Each entry of
    ``Δ H`` carries float32's relative error (~1e-7·√K), far below the figures' 4 digits."""
    h32 = h.to(torch.float32)
    w32 = w.to(torch.float32)
    d = w32 - w_hat.to(torch.float32)  # [R, K]
    num = float(((d @ h32) * d).sum(dtype=torch.float64))
    den = float(((w32 @ h32) * w32).sum(dtype=torch.float64))
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def _panel_chunk(b: int) -> int:
    """Columns per batched block solve in ``ldl_feedback`` (a multiple of ``b``, about 512)."""
    return max(b, (512 // b) * b)


def _reversed_cholesky(h: torch.Tensor, where: str) -> torch.Tensor:
    """``L`` (lower, float64) with ``J h J = L Lᵀ``, ``J`` the reversal; extra damping as ``ldl_feedback`` says."""
    bump = 0.0
    base = float(torch.diagonal(h).mean()) or 1.0
    for attempt in range(9):
        rev = h.flip(0, 1)  # [K, K] J H J, a copy
        if bump:
            rev.diagonal().add_(bump)
        info = torch.empty((), dtype=torch.int32, device=h.device)
        torch.linalg.cholesky_ex(rev, out=(rev, info))  # in place
        if int(info) == 0:
            if bump:
                log.warning("%s: Hessian needed extra damping %.3g to factorise", where or "tensor", bump)
            return rev
        bump = base * 1e-6 * (10 ** attempt)
    raise MoequantError(f"{where or 'tensor'}: Hessian is not positive definite even after extra damping")


def ldl_feedback(h: torch.Tensor, block: int = 1, where: str = "", dtype: torch.dtype = torch.float64
                 ) -> torch.Tensor:
    """The strictly block-upper ``A [K, K]`` (computed in float64, returned as ``dtype``) with
    ``H = (I + A) D (I + A)ᵀ``, ``D`` block-diagonal with ``block``-sized blocks (``block`` divides K). ``h`` must
    already be damped; if it is still not positive definite (rounding), the diagonal is raised by 10× steps of
    1e-6·mean(diag) and a warning is logged; after 8 tries it is an error naming ``where``.

    Computed on the reversed matrix: ``J H J = L Lᵀ`` (Cholesky, lower); reversed back, ``Ũ = J L J`` is upper
    with ``H = Ũ Ũᵀ``; ``I + A = Ũ · blockdiag(Ũ_BB)⁻¹``. In reversed coordinates that is each column block of
    ``L`` right-divided by its own diagonal block (lower), done in place; one more ``K × K`` float64 buffer
    beside ``h`` and the result."""
    h = h.to(torch.float64)
    k = h.shape[0]
    if k % block:
        raise ValueError(f"{where}: block {block} does not divide K={k}")
    rev = _reversed_cholesky(h, where)  # [K, K] L, lower, with J H J = L Lᵀ
    if block == 1:
        rev.div_(torch.diagonal(rev).clone())  # column j / L_jj
        rev.diagonal().zero_()
    else:
        step = _panel_chunk(block)
        for c0 in range(0, k, step):
            c1 = min(k, c0 + step)
            n = (c1 - c0) // block
            panel = rev[:, c0:c1].reshape(k, n, block).transpose(0, 1)  # [n, K, b] (a copy)
            diag = torch.stack([rev[c:c + block, c:c + block] for c in range(c0, c1, block)])  # [n, b, b] lower
            panel = torch.linalg.solve_triangular(diag, panel, upper=False, left=False)  # [n, K, b]
            rev[:, c0:c1] = panel.transpose(0, 1).reshape(k, c1 - c0)
            for c in range(c0, c1, block):
                rev[c:c + block, c:c + block] = 0.0
    out = torch.empty(k, k, dtype=dtype, device=h.device)  # [K, K] A, strictly block-upper
    for i0 in range(0, k, 512):  # reversed back in row chunks: no second float64 copy
        i1 = min(k, i0 + 512)
        out[i0:i1] = rev[k - i1:k - i0].flip(0, 1)
    return out


def _group_values(target0: torch.Tensor, work: torch.Tensor, a: torch.Tensor, err: torch.Tensor, c: int, g1: int,
                  b0: int, b1: int) -> torch.Tensor:
    """The columns ``[c, g1)`` of a group as GPTQ's update holds them when column ``c`` is reached:
    ``W_G + Y_G (I + A)_GG⁻¹`` ``[R, g1 - c]``, ``Y_G`` the feedback of every error before ``c`` (columns past
    the lazy batch ``[b0, b1)`` have not yet received the batch's own errors ``err [R, b1 - b0]``: added here)."""
    y = work[:, c:g1] - target0[:, c:g1]  # [R, g]
    if g1 > b1 and c > b0:
        y[:, b1 - c:] += err[:, :c - b0] @ a[b0:c, b1:g1]
    if not bool(a[c:g1, c:g1].any()):  # a one-block group: nothing to undo
        return target0[:, c:g1] + y
    m = a[c:g1, c:g1] + torch.eye(g1 - c, dtype=a.dtype)  # [g, g] unit upper
    return target0[:, c:g1] + torch.linalg.solve_triangular(m, y, upper=True, left=False)


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
    a = ldl_feedback(h, b, where, torch.float32)  # [K, K] strictly block-upper
    del h
    target0 = work.clone()  # [R, K] W in processing order; work holds W + the feedback received so far
    w_hat = torch.zeros_like(work)  # [R, K] in processing order
    g = quantizer.group
    for b0 in range(0, k, lazy):
        b1 = min(k, b0 + lazy)
        cur = work[:, b0:b1]  # [R, L] view: updated within the batch
        err = torch.zeros_like(cur)  # [R, L] errors W - Ŵ of the batch
        for c in range(b0, b1, b):
            j = c - b0
            if perm is None and c % g == 0:
                quantizer.fit(c, _group_values(target0, work, a, err, c, min(k, c + g), b0, b1))
            col = c if perm is None else int(perm[c])
            qb = quantizer.round(col, cur[:, j:j + b])  # [R, b]
            w_hat[:, c:c + b] = qb
            e = target0[:, c:c + b] - qb  # [R, b]
            cur[:, j + b:] += e @ a[c:c + b, c + b:b1]
            err[:, j:j + b] = e
        if b1 < k:
            work[:, b1:] += err @ a[b0:b1, b1:]
    del a, work, target0
    if perm is not None:
        w_hat = w_hat[:, torch.argsort(perm)]
    hp = h_damped if h_proxy is None else h_proxy
    return LdlqResult(w_hat, proxy_loss(w0, w_hat, hp))
