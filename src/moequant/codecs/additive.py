"""AQLM additive codebooks (Egiazarian et al. 2024) with output-aware EM initialisation (OA-EM, Kennedy &
Moosavi, arXiv 2604.08118): decoding, objectives, k-means and OA-EM. Pure torch; the code search under the
full Hessian is ``codecs.additive_search``.

A row ``r`` of ``W [N, K]`` is cut into ``G = K/g`` groups of ``g`` consecutive input weights; group ``j`` is
the sum of ``M`` codewords, one from each codebook ``C_m [2^B, g]``, times the row's scale::

    Ŵ[r, jg:(j+1)g] = s[r] · Σ_m C_m[b[r, j, m]]

Codes ``b [N, G, M]`` take ``B`` bits each (``M·B/g`` bits per weight); scales are float16, codebooks float16 or
(``codebook_bits = 8``) int8 with one float16 step per codebook, halving their cost, which matters on small
matrices: 2x8 g8 on SmolLM2-135M's linears counts 2.153 bits/weight with float16 codebooks, 2.088 with int8
(every value here is kept exact in its storage type, and decoding adds the codewords in float32 in the order
``m = 0 .. M-1`` then multiplies by the scale, so the stored tensor decodes to the encoder's reconstruction
bit for bit). A fused expert tensor ``[E, N, K]`` has one codebook set per expert or one shared by all of
them; the math below always fits one codebook set to ``E ≥ 1`` matrices, each with its own Hessian.

Objective: the output error ``Σ_e tr((Ŵ_e − W_e) H_e (Ŵ_e − W_e)ᵀ)``, ``H_e [K, K]`` the damped calibration
Hessian. In the row-normalised space ``y = w / s`` a group's error costs ``s² (ŷ − y)ᵀ H_jj (ŷ − y)`` plus its
cross terms with the other groups of the row; ``H_jj`` is the ``g x g`` diagonal block of group ``j``.

- k-means init (AQLM): codebooks fitted one at a time to the residual left by the previous ones, Lloyd
  iterations under the diagonal metric ``s² diag(H_jj)`` (weighted squared error per coordinate);
- OA-EM (the seed's output-aware EM): from the k-means init, ``R`` rounds of an M-step (Adam on the codebooks
  minimising ``Σ s² eᵀ H_jj e``, ``e = ŷ − y``, the block-diagonal part of the output error) and an E-step
  (each group's codes re-chosen one codebook at a time as ``argmin_c (t − c)ᵀ H_jj (t − c)``, ``t`` the group
  minus its other codewords). Neither step can increase the block-diagonal error (the M-step keeps its best
  iterate; the E-step's current code is a candidate).

Memory: every ``[points, 2^B]`` distance table is built in chunks of at most ``_BUDGET`` elements, so 1x16
(65,536 codewords) runs in bounded memory.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from moequant.errors import UnrepresentableError

# Elements of one distance table chunk (64 MiB of float32).
_BUDGET = 1 << 24
_FP16_MAX = float(torch.finfo(torch.float16).max)


def fp16_exact(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to float16, returned as float32 (the values the format stores)."""
    return t.to(torch.float16).to(torch.float32)


# Codebook storage widths (``AdditiveConfig.codebook_bits``): float16, or int8 codes with one float16 step per codebook.
CODEBOOK_BITS = (16, 8)


def codebook_grid(codebooks: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stored form of codebooks ``[..., M, C, g]``: ``bits = 16`` -> (float16 ``[..., M, C, g]``, None);
    ``bits = 8`` -> (int8 ``[..., M, C, g]`` in −127..127, float16 step ``[..., M]``), the step
    ``fp16(max |C_m| / 127)`` per codebook (1 for an all-zero one) and each value ``round(c / step)``.
    Idempotent on its own output: ``codebook_values`` of it grids to the same bytes."""
    if bits == 16:
        return codebooks.to(torch.float16), None
    if bits != 8:
        raise ValueError(f"codebook_bits {bits} is not one of {CODEBOOK_BITS}")
    cb = codebooks.to(torch.float32)
    peak = cb.abs().amax(dim=(-2, -1))  # [..., M]
    step = (peak / 127).to(torch.float16)
    if bool(torch.isinf(step).any()):
        raise UnrepresentableError(f"a codebook value of {float(peak.max()):.3g} overflows its float16 step")
    step = torch.where(step == 0, torch.ones_like(step), step)
    q = torch.round(cb / step.to(torch.float32)[..., None, None]).clamp_(-127, 127)  # [..., M, C, g]
    return q.to(torch.int8), step


def codebook_values(stored: torch.Tensor, step: torch.Tensor | None) -> torch.Tensor:
    """``codebook_grid``'s output -> the codebooks' values, float32 ``[..., M, C, g]`` (``q · step`` is exact in
    float32: a 7-bit integer times an 11-bit significand)."""
    if step is None:
        return stored.to(torch.float32)
    return stored.to(torch.float32) * step.to(torch.float32)[..., None, None]


def project_codebooks(codebooks: torch.Tensor, bits: int) -> torch.Tensor:
    """Codebooks rounded to what ``bits``-bit storage holds, as float32 (``bits = 16``: ``fp16_exact``)."""
    return codebook_values(*codebook_grid(codebooks, bits))


def num_groups(k: int, g: int) -> int:
    """Groups per row; ``ValueError`` unless ``g`` divides ``K``."""
    if k % g:
        raise ValueError(f"additive groups of {g} input weights need K a multiple of {g}, got K={k}")
    return k // g


def row_scales(w: torch.Tensor) -> torch.Tensor:
    """w ``[E, N, K]`` -> each row's RMS, float16-exact ``[E, N]`` (an all-zero row gets 0)."""
    s = w.to(torch.float32).pow(2).mean(-1).sqrt()  # [E, N]
    if bool((s > _FP16_MAX).any()):
        raise UnrepresentableError(f"a row RMS of {float(s.max()):.3g} overflows the float16 row scale")
    return fp16_exact(s)


def normalised(w: torch.Tensor, scale: torch.Tensor, g: int) -> torch.Tensor:
    """w ``[E, N, K]`` / scale ``[E, N]`` -> groups ``[E, N, G, g]`` (rows of scale 0 stay 0)."""
    e, n, k = w.shape
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (w / safe[..., None]).reshape(e, n, num_groups(k, g), g)


def group_blocks(h: torch.Tensor, g: int) -> torch.Tensor:
    """h ``[E, K, K]`` -> its ``g x g`` diagonal blocks ``[E, G, g, g]``."""
    e, k, _ = h.shape
    G = num_groups(k, g)
    hb = h.reshape(e, G, g, G, g)  # [E, G, g, G, g]
    idx = torch.arange(G)
    return hb[:, idx, :, idx, :].permute(1, 0, 2, 3).contiguous()  # [E, G, g, g]


def decode_groups(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Σ_m C_m[b_m] in float32, added in the order m = 0 .. M-1.

    codes ``[E, ..., M]`` (integers < 2^B); codebooks ``[M, 2^B, g]`` (one set) or ``[E, M, 2^B, g]`` (one per
    leading index) -> ``[E, ..., g]``."""
    cb = codebooks.to(torch.float32)
    m_count = codes.shape[-1]
    c = cb.shape[-2]
    flat = codes.reshape(codes.shape[0], -1, m_count).to(torch.int64)  # [E, P, M]
    out = None
    for m in range(m_count):
        if cb.dim() == 3:
            part = cb[m][flat[..., m]]  # [E, P, g]
        else:  # per-leading-index codebooks: offset each index's codes into the flattened tables
            table = cb[:, m].reshape(-1, cb.shape[-1])  # [E * 2^B, g]
            offset = (torch.arange(flat.shape[0]) * c)[:, None]  # [E, 1]
            part = table[flat[..., m] + offset]  # [E, P, g]
        out = part if out is None else out + part
    return out.reshape(*codes.shape[:-1], cb.shape[-1])


def reconstruct(codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes ``[E, N, G, M]``, codebooks ``[M, 2^B, g]`` or ``[E, M, 2^B, g]``, scale ``[E, N]`` -> Ŵ ``[E, N, K]``
    float32: ``s · Σ_m C_m[b_m]``, exactly what the packed format decodes to."""
    e, n, G, _ = codes.shape
    y = decode_groups(codes, codebooks)  # [E, N, G, g]
    return scale.to(torch.float32)[..., None] * y.reshape(e, n, -1)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row output error ``(ŵ − w) H (ŵ − w)ᵀ`` ``[E, N]`` in float64 (w, ŵ ``[E, N, K]``, h ``[E, K, K]``)."""
    d = (w_hat.to(torch.float64) - w.to(torch.float64))  # [E, N, K]
    return (torch.bmm(d, h.to(torch.float64)) * d).sum(-1)


# ---------------------------------------------------------------- nearest codeword under a block metric


# ``(target [B, P, g], blocks [B, g, g], codebook [C, g]) -> codes [B, P] | None``: the accelerated ``assign``
# (``kernels.additive_encode.fast_assign``: the same argmin) once installed; None where it does not apply.
AssignFastPath = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]
_fast_assign: AssignFastPath | None = None


def set_assign_fast_path(fn: AssignFastPath | None) -> None:
    """Install (or, with None, remove) the accelerated ``assign`` (``kernels.additive_encode`` installs its C++
    kernel on import; ``formats.additive`` imports it)."""
    global _fast_assign
    _fast_assign = fn


def assign(target: torch.Tensor, blocks: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``argmin_c (t − c)ᵀ H (t − c)`` for every group vector.

    target ``[E, G, P, g]`` (points grouped by their metric), blocks ``[E, G, g, g]`` (symmetric PSD: one
    metric per group position), codebook ``[C, g]`` -> codes ``[E, G, P]`` (int64). The constant ``tᵀHt`` is
    dropped: score(c) = cᵀHc − 2 (Ht)·c. Built in chunks of at most ``_BUDGET`` table entries."""
    e, G, p, g = target.shape
    c = codebook.shape[0]
    cb = codebook.to(torch.float32)
    tb = target.reshape(e * G, p, g)  # [EG, P, g]
    hb = blocks.reshape(e * G, g, g).to(torch.float32)  # [EG, g, g]
    fast = None if _fast_assign is None else _fast_assign(tb, hb, cb)
    if fast is not None:
        return fast.reshape(e, G, p)
    out = torch.empty(e * G, p, dtype=torch.int64)
    rows = max(1, min(p, _BUDGET // c))
    per = max(1, min(e * G, _BUDGET // (rows * c), _BUDGET // (c * g)))
    for b0 in range(0, e * G, per):
        h = hb[b0:b0 + per]  # [b, g, g]
        q = (torch.matmul(cb, h) * cb).sum(-1)  # [b, C]: cᵀHc
        for r0 in range(0, p, rows):
            t = torch.bmm(tb[b0:b0 + per, r0:r0 + rows], h)  # [b, r, g] = (Ht)ᵀ (H symmetric)
            score = torch.baddbmm(q[:, None, :], t, cb.T.expand(t.shape[0], g, c), alpha=-2.0)  # [b, r, C]
            out[b0:b0 + per, r0:r0 + rows] = score.argmin(-1)
    return out.reshape(e, G, p)


# ---------------------------------------------------------------- initialisation


def kmeans_init(y: torch.Tensor, hdiag: torch.Tensor, s2: torch.Tensor, m_count: int, bits: int, iters: int,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual k-means, one codebook at a time, under the metric ``s² diag(H_jj)``.

    y ``[E, G, N, g]`` normalised groups (grouped by position), hdiag ``[E, G, g]`` the Hessian diagonal per
    group position, s2 ``[E, 1, N, 1]`` squared row scales -> (codes ``[E, G, N, M]``, codebooks
    ``[M, 2^B, g]`` float32). Centroids start at random distinct groups (``seed``); a cluster that loses
    every point keeps its centroid."""
    e, G, n, g = y.shape
    c = 1 << bits
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.diag_embed(hdiag.to(torch.float32))  # [E, G, g, g]: the diagonal metric (s² cannot move an argmin)
    weight = (s2 * hdiag[:, :, None, :]).reshape(-1, g).to(torch.float32)  # [P, g]
    resid = y.to(torch.float32).clone()  # [E, G, N, g]
    codes, books = [], []
    p = e * G * n
    for _ in range(m_count):
        pts = resid.reshape(-1, g)  # [P, g]
        start = torch.randperm(p, generator=gen)[:c] if p >= c else torch.randint(p, (c,), generator=gen)
        cb = pts[start].clone()  # [C, g]
        a = None
        for _ in range(iters):
            new = assign(resid, blocks, cb).reshape(-1)  # [P]
            if a is not None and torch.equal(new, a):
                break
            a = new
            num = torch.zeros(c, g).index_add_(0, a, weight * pts)  # [C, g]
            den = torch.zeros(c, g).index_add_(0, a, weight)  # [C, g]
            cb = torch.where(den > 0, num / den.clamp_min(1e-30), cb)
        a = assign(resid, blocks, cb)  # [E, G, N]
        resid -= cb[a]
        codes.append(a)
        books.append(cb)
    return torch.stack(codes, -1), torch.stack(books)


def block_error(y: torch.Tensor, y_hat: torch.Tensor, blocks: torch.Tensor, s2: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal output error ``Σ s² (ŷ − y)ᵀ H_jj (ŷ − y)`` and its gradient in ŷ.

    y, y_hat ``[E, G, N, g]``, blocks ``[E, G, g, g]``, s2 ``[E, 1, N, 1]`` -> (scalar, ``[E, G, N, g]``)."""
    d = y_hat - y  # [E, G, N, g]
    hd = torch.matmul(d, blocks)  # [E, G, N, g]
    return (s2 * d * hd).sum(), 2.0 * s2 * hd


class CodebookGrad:
    """∂/∂C of a loss whose gradient in ŷ = Σ_m C_m[b_m] is ``grad_y``, for fixed codes and many gradients (an Adam
    run): each codeword gets the sum of the gradients of the groups that use it. codes ``[..., M]`` (integers
    < ``c``); a call maps grad_y ``[..., g]`` -> ``[M, C, g]``. Each codebook's groups are sorted by codeword once — a
    stable sort, so each codeword's groups keep their order and every sum is a sequential ``index_add_``'s, bit
    for bit — then a call is one gather and one segment sum per codebook (measured on 110,592 groups of 8, 2x8:
    4.5 ms per call instead of 10.2 with ``index_add_``)."""

    def __init__(self, codes: torch.Tensor, c: int) -> None:
        flat = codes.reshape(-1, codes.shape[-1]).to(torch.int64)  # [P, M]
        self.order = [torch.sort(flat[:, m], stable=True).indices for m in range(flat.shape[1])]  # M x [P]
        self.lengths = [torch.bincount(flat[:, m], minlength=c) for m in range(flat.shape[1])]  # M x [C]

    def __call__(self, grad_y: torch.Tensor) -> torch.Tensor:
        flat = grad_y.reshape(-1, grad_y.shape[-1])  # [P, g]
        return torch.stack([torch.segment_reduce(flat.index_select(0, order), "sum", lengths=lengths, axis=0)
                            for order, lengths in zip(self.order, self.lengths)])  # [M, C, g]


def adam_codebooks(codes: torch.Tensor, codebooks: torch.Tensor, loss_grad, steps: int, lr: float,
                   scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Adam on the codebooks ``[M, C, g]`` (and ``scale`` when given) for ``steps`` steps; keeps the best iterate.

    ``loss_grad(codebooks, scale) -> (loss, ∂codebooks, ∂scale or None)`` (``codes`` are fixed; the loss is
    a quadratic the caller differentiates by hand). The step size is ``lr`` times each parameter's RMS
    (codebooks and scales live on different scales); betas (0.9, 0.999), eps 1e-8.
    -> (codebooks, scale, best loss)."""
    params = [codebooks.to(torch.float32).clone()]
    if scale is not None:
        params.append(scale.to(torch.float32).clone())
    rates = [lr * float(p.pow(2).mean().sqrt().clamp_min(1e-12)) for p in params]
    first = [torch.zeros_like(p) for p in params]
    second = [torch.zeros_like(p) for p in params]
    best = (float("inf"), [p.clone() for p in params])
    b1, b2, eps = 0.9, 0.999, 1e-8
    for step in range(steps + 1):
        loss, *grads = loss_grad(params[0], params[1] if scale is not None else None)
        if float(loss) < best[0]:
            best = (float(loss), [p.clone() for p in params])
        if step == steps:
            break
        for p, gr, m1, m2, rate in zip(params, grads, first, second, rates):
            m1.mul_(b1).add_(gr, alpha=1 - b1)
            m2.mul_(b2).addcmul_(gr, gr, value=1 - b2)
            denom = (m2 / (1 - b2 ** (step + 1))).sqrt_().add_(eps)
            p.addcdiv_(m1, denom, value=-rate / (1 - b1 ** (step + 1)))
    return best[1][0], (best[1][1] if scale is not None else None), best[0]


def oa_em(y: torch.Tensor, blocks: torch.Tensor, s2: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
          rounds: int, steps: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Output-aware EM: ``rounds`` of (M-step: Adam on the codebooks under the block metric; E-step: each
    codebook's codes re-chosen in turn as the block-metric nearest codeword to what the others leave).

    y ``[E, G, N, g]``, blocks ``[E, G, g, g]``, s2 ``[E, 1, N, 1]``, codes ``[E, G, N, M]``, codebooks
    ``[M, C, g]`` -> (codes, codebooks)."""
    c = codebooks.shape[1]

    def loss_grad_for(fixed: torch.Tensor):  # codes fixed for one Adam run (they change in the E-step after it)
        grad_of = CodebookGrad(fixed, c)

        def loss_grad(cb: torch.Tensor, _: torch.Tensor | None):
            loss, gy = block_error(y, decode_groups(fixed, cb), blocks, s2)
            return loss, grad_of(gy), None

        return loss_grad

    codes = codes.clone()
    for _ in range(rounds):
        codebooks, _, _ = adam_codebooks(codes, codebooks, loss_grad_for(codes), steps, lr)
        for m in range(codes.shape[-1]):
            others = decode_groups(codes, codebooks) - codebooks[m][codes[..., m]]  # [E, G, N, g]
            codes[..., m] = assign(y - others, blocks, codebooks[m])
    return codes, codebooks
