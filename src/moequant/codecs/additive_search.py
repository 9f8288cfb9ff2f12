"""AQLM's code search under the full Hessian, the alternation with Adam on codebooks and scales, and the
whole additive encoder (``quantize``). The representation and the initialisations are ``codecs.additive``.

Beam search (AQLM): rows are independent given the codebooks and scales, so every row runs its own beam of
``beam`` code assignments. The groups ``j = 0 .. G-1`` are visited in order (outer loop) and within a group
the codebooks ``m = 0 .. M-1`` (inner loop); at each step every hypothesis of the beam tries every codeword of
``C_m`` in place of its current one and the ``beam`` best (hypothesis, codeword) pairs survive. The error of a
candidate follows from AQLM's expansion of ``‖XWᵀ − XŴᵀ‖² = (w − ŵ) H (w − ŵ)ᵀ``: with ``u = ((w − ŵ) H)_J``
for the group's columns ``J`` and ``c_o`` the current codeword, replacing it by ``c`` gives

    L(c) = [L + 2s c_o·u + s² c_oᵀH_JJ c_o] − 2s c·(u + s H_JJ c_o) + s² cᵀH_JJ c

(``c = c_o`` gives back ``L``, so the best hypothesis never gets worse). Only ``(w − ŵ) H`` on the columns not
yet visited is carried per hypothesis, updated by a rank-``g`` product after each step. The start codes are
always a hypothesis, and each row finally keeps the start or the result, whichever has the lower error
recomputed in float64: a search never increases the error.

Cost for one ``[N, K]`` matrix at ``M x 2^B``, group ``g``, beam ``b``: scoring ``N·b·2^B·K·M`` multiply-adds,
carrying ``N·b·K²·M/2``; an Adam step on codebooks and scales ``N·K²``. Rows are processed in chunks so that
the ``[rows, b, 2^B]`` table stays under ``codecs.additive._BUDGET`` elements (1x16 at beam 8: 32 rows at a
time). Measured on SmolLM2-135M layer 10 ``down_proj`` ``[576, 1536]`` with its calibration Hessian, 2x8 in
groups of 8, beam 8, the defaults, one thread of a busy 2-core AMD EPYC: k-means init 7 s, OA-EM init 23 s,
the first beam search 9 s, each further round (50 Adam steps, beam search) 13-20 s: about 75 s (k-means) and
80 s (OA-EM) per matrix; the beam state is ``[N·b, K]`` float32 (28 MiB here).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from moequant.codecs.additive import (_BUDGET, CodebookGrad, adam_codebooks, decode_groups, fp16_exact,
                                      group_blocks, kmeans_init, normalised, num_groups, oa_em, output_error,
                                      project_codebooks, reconstruct, row_scales)
from moequant.codecs.config import AdditiveConfig

log = logging.getLogger(__name__)

# ``(w [N, K], h [K, K], codebooks [M, C, g], hj [G, g, g], q [M, G, C], codes [N, G, M], scale [N], beam)
# -> codes | None``: the accelerated ``_beam_rows`` over every row (``kernels.additive_encode.fast_beam``: the
# same search) once installed; it returns None where it does not apply, and the torch loop runs.
BeamFastPath = Callable[..., Optional[torch.Tensor]]
_fast_beam: BeamFastPath | None = None


def set_beam_fast_path(fn: BeamFastPath | None) -> None:
    """Install (or, with None, remove) the accelerated beam search ``beam_search`` tries first
    (``kernels.additive_encode`` installs its C++ kernel on import; ``formats.additive`` imports it)."""
    global _fast_beam
    _fast_beam = fn


def beam_search(w: torch.Tensor, h: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor,
                scale: torch.Tensor, beam: int) -> torch.Tensor:
    """New codes for one matrix: w ``[N, K]``, h ``[K, K]`` (damped), codebooks ``[M, C, g]`` (float32 values),
    codes ``[N, G, M]`` (the start), scale ``[N]`` -> codes ``[N, G, M]`` (int64) with, row by row, an
    output error no larger than the start's."""
    n, k = w.shape
    m_count, c, g = codebooks.shape
    G = num_groups(k, g)
    w, h = w.to(torch.float32), h.to(torch.float32)
    cb = codebooks.to(torch.float32)
    hj = group_blocks(h[None], g)[0]  # [G, g, g]
    q = torch.stack([(torch.matmul(cb[m], hj) * cb[m]).sum(-1) for m in range(m_count)])  # [M, G, C]: cᵀH_JJc
    out = None
    if _fast_beam is not None:
        out = _fast_beam(w, h, cb, hj, q.contiguous(), codes, scale.to(torch.float32), beam)
    if out is None:
        rows = max(1, min(n, _BUDGET // (beam * c), _BUDGET // (beam * k)))
        out = torch.empty(n, G, m_count, dtype=torch.int64)
        for r0 in range(0, n, rows):
            out[r0:r0 + rows] = _beam_rows(w[r0:r0 + rows], h, cb, hj, q, codes[r0:r0 + rows].to(torch.int64),
                                           scale[r0:r0 + rows].to(torch.float32), beam)
    start = reconstruct(codes[None], codebooks, scale[None])  # [1, N, K]
    found = reconstruct(out[None], codebooks, scale[None])
    keep = output_error(w[None], start, h[None])[0] < output_error(w[None], found, h[None])[0]  # [N]
    out[keep] = codes[keep].to(torch.int64)
    return out


def _beam_rows(w: torch.Tensor, h: torch.Tensor, cb: torch.Tensor, hj: torch.Tensor, q: torch.Tensor,
               codes: torch.Tensor, scale: torch.Tensor, beam: int) -> torch.Tensor:
    """The beam search over one chunk of rows: w ``[n, K]``, codes ``[n, G, M]``, scale ``[n]`` -> ``[n, G, M]``.

    Candidates are ranked by ``L(c) / s²`` (the same order within a row), which is one product of
    ``[−2v/s, base/s², 1]`` with ``[C_mᵀ; 1; q]``; a row of scale 0 decodes to zeros whatever its codes,
    and its candidates all tie."""
    n, k = w.shape
    m_count, c, g = cb.shape
    G = k // g
    safe2 = torch.where(scale == 0, torch.ones_like(scale), scale).pow(2)  # [n]
    inv2 = 1.0 / safe2  # [n]
    right = torch.cat([cb.transpose(1, 2), torch.ones(m_count, 2, c)], dim=1)  # [M, g + 2, C]
    err = w - reconstruct(codes[None], cb, scale[None])[0]  # [n, K]
    eh = err @ h  # [n·b, K']: (w − ŵ)H on the columns not yet visited, per hypothesis; b = 1 to start
    loss = (err * eh).sum(-1, keepdim=True)  # [n, b]
    hyp = codes.reshape(n, G * m_count)  # [n·b, G·M]
    b = 1
    rows = torch.arange(n)[:, None]  # [n, 1]
    for j in range(G):
        for m in range(m_count):
            sb = scale.repeat_interleave(b)  # [n·b]: each hypothesis's row scale
            ib = inv2.repeat_interleave(b)  # [n·b]: 1/s² (1 for a row of scale 0)
            u = eh[:, :g]  # [n·b, g]: ((w − ŵ)H)_J
            cur = hyp[:, j * m_count + m]  # [n·b]
            co = cb[m][cur]  # [n·b, g]
            v = u + sb[:, None] * (co @ hj[j])  # [n·b, g]
            base = loss.reshape(-1) + 2 * sb * (co * u).sum(-1) + sb * sb * q[m, j][cur]  # [n·b]
            left = torch.cat([v * (-2 * sb * ib)[:, None], (base * ib)[:, None], (sb * sb * ib)[:, None]], 1)
            right[m, g + 1] = q[m, j]
            cand = (left @ right[m]).reshape(n, b * c)  # [n, b·C]: L(c) / s²
            nb = min(beam, b * c)
            vals, idx = cand.topk(nb, dim=-1, largest=False, sorted=True)  # [n, nb]
            loss = vals * safe2[:, None]
            parent, new = idx // c, idx % c  # [n, nb]
            flat = (rows * b + parent).reshape(-1)  # [n·nb] into the hypotheses
            hyp = hyp.index_select(0, flat)
            eh = eh.index_select(0, flat)
            new = new.reshape(-1)
            delta = scale.repeat_interleave(nb)[:, None] * (cb[m][new] - co.index_select(0, flat))  # [n·nb, g]
            eh.addmm_(delta, h[j * g:(j + 1) * g, j * g:], alpha=-1.0)
            hyp[:, j * m_count + m] = new
            b = nb
        eh = eh[:, g:]  # group j is done: drop its columns
    return hyp.reshape(n, b, G, m_count)[:, 0]


def search(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor,
           cfg: AdditiveConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Beam search, then up to ``cfg.search_rounds`` rounds of (Adam on codebooks and scales under the full
    Hessian, the codebooks rounded to their storage grid (``cfg.codebook_bits``) and the scales to float16, beam
    search) until a round improves the output error by less than ``cfg.tol`` (relative). w ``[E, N, K]``, h
    ``[E, K, K]``, codes ``[E, N, G, M]``, codebooks ``[M, C, g]`` (on the grid) and scale ``[E, N]``
    (float16-exact) -> the best (codes, codebooks, scale) seen."""
    e, n, k = w.shape
    c, g = codebooks.shape[1], codebooks.shape[2]

    def beam_all(cds: torch.Tensor, cb: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
        return torch.stack([beam_search(w[i], h[i], cb, cds[i], sc[i], cfg.beam) for i in range(e)])

    def total(cds: torch.Tensor, cb: torch.Tensor, sc: torch.Tensor) -> float:
        return float(output_error(w, reconstruct(cds, cb, sc), h).sum())

    def loss_grad_for(fixed: torch.Tensor):  # the codes of one Adam run
        grad_of = CodebookGrad(fixed, c)

        def loss_grad(cb: torch.Tensor, sc: torch.Tensor):
            y = decode_groups(fixed, cb).reshape(e, n, k)  # [E, N, K]
            d = sc[..., None] * y - w  # [E, N, K]
            dh = torch.bmm(d, h)  # [E, N, K]
            grad_w = 2.0 * dh  # ∂/∂Ŵ of tr((Ŵ − W) H (Ŵ − W)ᵀ)
            grad_y = (grad_w * sc[..., None]).reshape(e, n, k // g, g)  # [E, N, G, g]
            return (d * dh).sum(), grad_of(grad_y), (grad_w * y).sum(-1)

        return loss_grad

    codes = beam_all(codes, codebooks, scale)
    err = total(codes, codebooks, scale)
    best = (err, codes, codebooks, scale)
    log.debug("additive search: beam 0 error %.6g", err)
    for r in range(cfg.search_rounds):
        cb, sc, _ = adam_codebooks(codes, codebooks, loss_grad_for(codes), cfg.adam_steps, cfg.lr, scale)
        codebooks, scale = project_codebooks(cb, cfg.codebook_bits), fp16_exact(sc)
        codes = beam_all(codes, codebooks, scale)
        new = total(codes, codebooks, scale)
        log.debug("additive search: round %d error %.6g", r + 1, new)
        if new < best[0]:
            best = (new, codes, codebooks, scale)
        if err <= 0 or (err - new) / err < cfg.tol:
            break
        err = new
    return best[1], best[2], best[3]


def initialise(w: torch.Tensor, h: torch.Tensor, cfg: AdditiveConfig
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row scales and ``cfg.init`` codebooks for ``E`` matrices sharing one codebook set: w ``[E, N, K]``,
    h ``[E, K, K]`` -> (codes ``[E, N, G, M]`` int64, codebooks ``[M, C, g]``, scale ``[E, N]``), codebooks on
    their storage grid (``cfg.codebook_bits``) and scales float16-exact (float32 tensors)."""
    scale = row_scales(w)  # [E, N]
    y = normalised(w, scale, cfg.g).permute(0, 2, 1, 3).contiguous()  # [E, G, N, g]
    s2 = scale.pow(2)[:, None, :, None]  # [E, 1, N, 1]
    blocks = group_blocks(h.to(torch.float32), cfg.g)  # [E, G, g, g]
    codes, codebooks = kmeans_init(y, torch.diagonal(blocks, dim1=-2, dim2=-1), s2, cfg.M, cfg.B,
                                   cfg.kmeans_iters, cfg.seed)  # [E, G, N, M], [M, C, g]
    if cfg.init == "oa-em":
        codes, codebooks = oa_em(y, blocks, s2, codes, codebooks, cfg.em_rounds, cfg.adam_steps, cfg.lr)
    return codes.permute(0, 2, 1, 3).contiguous(), project_codebooks(codebooks, cfg.codebook_bits), scale


def full_hessian(h: torch.Tensor | None, lead: tuple[int, ...], k: int) -> torch.Tensor:
    """The Hessian of every matrix as ``[E, K, K]`` float32 (E = prod(lead), at least 1): None -> identity
    (plain squared error), a diagonal ``[..., K]`` -> diag_embed, one ``[K, K]`` -> shared by every matrix."""
    e = 1
    for d in lead:
        e *= d
    if h is None:
        return torch.eye(k).expand(e, k, k)
    h = h.to(torch.float32)
    if h.shape[-2:] != (k, k):
        if h.shape[-1] != k:
            raise ValueError(f"hessian {tuple(h.shape)} fits neither [..., K, K] nor [..., K] for K={k}")
        h = torch.diag_embed(h)
    if h.dim() == 2:
        return h.expand(e, k, k)
    if tuple(h.shape[:-2]) != tuple(lead):
        raise ValueError(f"hessian {tuple(h.shape)} does not match the weight's leading dims {lead}")
    return h.reshape(e, k, k)


def quantize(w: torch.Tensor, h: torch.Tensor | None, cfg: AdditiveConfig
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The additive encoder: w ``[..., N, K]``, h (damped) ``[..., K, K]``, ``[K, K]``, a diagonal or None ->
    (codes ``[..., N, G, M]`` int64, codebooks ``[..., M, 2^B, g]`` (``share="layer"``: ``[M, 2^B, g]``; a 2-D
    weight: ``[M, 2^B, g]``), scale ``[..., N]``), codebooks on their storage grid, scales float16-exact."""
    *lead, n, k = w.shape
    num_groups(k, cfg.g)
    ws = w.detach().to(torch.float32).reshape(-1, n, k)  # [E, N, K]
    hs = full_hessian(h, tuple(lead), k)  # [E, K, K]
    if cfg.share == "layer" or not lead:
        codes, codebooks, scale = search(ws, hs, *initialise(ws, hs, cfg), cfg)
    else:
        fits = [search(ws[i:i + 1], hs[i:i + 1], *initialise(ws[i:i + 1], hs[i:i + 1], cfg), cfg)
                for i in range(ws.shape[0])]
        codes = torch.cat([f[0] for f in fits])  # [E, N, G, M]
        codebooks = torch.stack([f[1] for f in fits]).reshape(*lead, *fits[0][1].shape)  # [..., M, C, g]
        scale = torch.cat([f[2] for f in fits])  # [E, N]
    return codes.reshape(*lead, *codes.shape[1:]), codebooks, scale.reshape(*lead, n)
