"""The soft trellis of BCJR-QAT: forward–backward (BCJR) over the bitshift trellis of ``codecs.trellis``, in torch;
the whole pass runs in C++ where ``kernels.bcjr.soft`` applies (float32 on CPU, at most 4,096 states), this code
being its definition (and its recursions, ``alpha_beta`` / ``expectations``, in C++ where those apply).

Notation as in ``codecs.trellis``: ``L`` state bits, ``kv = K·V`` new bits per step (the step's *innovation*,
the low ``kv`` bits of ``s_t``), ``S`` steps per tile, ``V`` values per step, a value table ``[2^L, V]``.

**The soft codeword.** Over the walks of one tile, the Gibbs distribution ``P(s_0 … s_{S-1}) ∝ exp Σ_t ℓ_t(s_t)``
with branch scores ``ℓ_t(s) = −‖v(s) − x_t‖² / τ``. In log space, ``α_t(s) = ℓ_t(s) + logsumexp`` over the
``2^kv`` predecessors of ``α_{t−1}``; ``β_t(s) = logsumexp`` over the ``2^kv`` successors ``s'`` of
``ℓ_{t+1}(s') + β_{t+1}(s')``; the posterior ``P_t(s) = softmax_s(α_t + β_t)``; the soft codeword is
``y_t = Σ_s P_t(s) v(s)``. As ``τ → 0`` it is the Viterbi codeword (the posterior concentrates on the best walk);
at large ``τ`` it tends to the mean of the values.

**Tail-biting, as the codec does it.** ``viterbi_tail_biting`` fixes the overlap ``o`` (the high ``L − kv`` bits
of ``s_0``, which are the low ``L − kv`` bits of ``s_{S−1}``) from a first pass and then finds the best walk with
that overlap. The soft pass does the same and is *exact given the overlap*: ``overlap [B]`` restricts the walks
to ``s_0 >> kv == o`` and ``s_{S−1} mod 2^(L−kv) == o`` (both ends masked), so ``P`` is the exact posterior of the
cyclic walks with overlap ``o``. With ``o`` taken from the codec's result its ``τ → 0`` limit is that result.
Without ``overlap`` the start is free (the codec's ``tail_biting=False``: every ``s_0``, every end).

**A soft pass with fewer states: a sub-trellis around a reference walk.** On a CPU, ``2^16`` states per step
over a whole matrix is far too slow (``codecs.trellis`` Viterbi alone: ~12 s per 576x1536 matrix at L=16 on one core).
Re-hashing the code to a smaller ``L`` would make a *different* code: its soft codeword at the PTQ weight is a
second quantization of it, a jump of the size of the quantization error itself at the start of training and
another at the hardening. Instead the soft pass runs over the walks of the *stored* code that agree with a
reference walk ``ref [B, S]`` (the current codes) except in ``f`` chosen bit positions ``free`` of every
innovation. Those walks form a bitshift trellis of their own: its state ``σ_t`` holds the free bits of the
innovations inside ``s_t`` (``f`` per innovation, ``n = L // kv`` whole ones and the free positions below
``L mod kv`` of the partial oldest one: ``F = n·f + |free ∩ [0, L mod kv)|`` bits), and ``σ_t =
((σ_{t−1} << f) mod 2^F) | (free bits of u_t)``. The full state of ``σ`` at step ``t`` is ``(ref_t & ~M) | D[σ]``
(``M`` the free positions, ``D`` the deposit of ``σ``'s bits onto them, ``sub_states``), and its values are the
stored code's. So the forward–backward above is *exact on this subset of the stored code's walks*, the
reference is one of them (at the PTQ weight the ``τ → 0`` soft codeword is the PTQ weight), and every hard walk
of it is a walk of the stored code. ``free`` = every position is the full trellis (``F = L``). Rotating ``free``
between refreshes of the reference (``soft_geometry(rotation=…)``) lets every bit of the walk move in turn.

**Gradient** (``_SoftTrellis``, checked by ``torch.autograd.gradcheck``). With the upstream gradient ``g_t`` of
``y_t`` and ``G(walk) = Σ_t ⟨g_t, v_t(s_t)⟩``: ``∂L/∂ℓ_t(σ) = P_t(σ) (E[G | σ_t = σ] − E[G])`` (the derivative of
a Gibbs expectation is a covariance). ``E[G | σ_t = σ] = a_t(σ) + b_t(σ)``, where ``a_t`` (the expected ``G`` of
steps ``≤ t`` given ``σ_t``) runs forward with each state's predecessors weighted by ``softmax α_{t−1}`` and ``b_t``
(steps ``> t``) backward with the successors weighted by ``softmax(ℓ_{t+1} + β_{t+1})``. Then ``∂ℓ/∂x_t =
2(v − x_t)/τ`` and ``∂L/∂v_t(σ) = P_t(σ) g_t − 2(v − x_t)/τ · ∂L/∂ℓ_t(σ)``, summed into the value table over the
states ``σ`` stands for (and through ``codecs.trellis.code_values`` into the HYB LUT by autograd).

**Memory.** Tiles are processed ``chunk`` at a time (``chunk_tiles``); the backward recomputes ``α``, ``β`` of its
chunk instead of keeping them (as activation checkpointing does). Peak extra memory is
``O(chunk × S × 2^F)`` — at most ``chunk · S · 2^F · (8 + 4·(2V + 10))`` bytes in float32, kept under ``max_bytes``
— plus the inputs and output ``[B, S, V]`` and the table; with the full trellis ``F = L``, so ``O(chunk × S × 2^L)``.

**Cost measured** (one thread of the 2-core dev machine, another job on the other core; HYB, L=16, K=2, V=2,
tail-biting, a 576x1536 matrix = 3456 tiles, ``max_bytes`` 128 MiB): ``F = 4`` (``f = 1``): forward 0.6 s,
backward 0.75 s, ``hard_path`` 0.25 s; ``F = 8`` (``f = 2``): forward ~6 s, backward ~10 s. The codec's Viterbi at
L=16 on the same matrix: ~90 s then; ~12 s on an idle core with the kernel's second version (2026-12-04).
The pass in C++ (``kernels.bcjr.soft``), 2 idle threads, same matrix: ``F = 4`` 0.07 + 0.12 s, ``F = 8``
0.6 + 1.2 s (``benchmarks/bcjr_soft_pass.py``; the torch path there: 0.23 + 0.35 s and 2.0 + 3.7 s). ``hard_path``
in C++ (``kernels.bcjr.hard_path``, the same walks): 0.02 s at ``F = 4``, 0.15 s at ``F = 8``, against 0.16 / 1.2 s
for the torch loop below (2026-12-07): on the whole of smollm2-135m (~120 such matrices) the refresh before every
BCJR step took ~20 s of torch loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_NEG = -1e30  # log-weight of an excluded state: finite, so softmax over excluded states is uniform, never NaN


MAX_BYTES = 128 << 20  # default bound on one chunk's working memory


def _kernels():
    """``moequant.kernels.bcjr`` (imported on first use: the math here stays importable without the kernels)."""
    from moequant.kernels import bcjr as kernels

    return kernels


# --- geometry of the soft pass ------------------------------------------------------------------
@dataclass(frozen=True)
class SoftGeometry:
    """The sub-trellis: stored ``L``, ``kv``; ``free``: the bit positions (ascending, in ``[0, kv)``) of every
    innovation that the soft pass sums over (the others follow the reference walk)."""

    L: int
    kv: int
    free: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 0 < self.kv < self.L:
            raise ValueError(f"kv={self.kv} must be in [1, L-1] (L={self.L})")
        if not self.free or list(self.free) != sorted(set(self.free)) or not 0 <= self.free[0] <= self.free[-1] < self.kv:
            raise ValueError(f"free bit positions {self.free} must be distinct, ascending, in [0, {self.kv})")

    @property
    def f(self) -> int:
        """Free bits per innovation (the sub-trellis's ``kv``)."""
        return len(self.free)

    @property
    def F(self) -> int:
        """State bits of the sub-trellis: ``n·f`` for the ``n = L // kv`` whole innovations in a state, plus the
        free positions below ``L mod kv`` of the partial one."""
        rest = self.L % self.kv
        return (self.L // self.kv) * self.f + sum(p < rest for p in self.free)

    @property
    def full(self) -> bool:
        """Every bit free: the stored trellis itself (``F = L``, ``σ = s``)."""
        return self.f == self.kv

    def deposit(self) -> tuple[torch.Tensor, int]:
        """(``D`` int64 ``[2^F]``: the bits of ``σ`` placed on their state positions, ``M``: those positions).
        Bit ``i·f + j`` of ``σ`` (innovation ``i`` back, ``i = 0`` the newest) is state bit ``i·kv + free[j]``."""
        positions = [i * self.kv + p for i in range(self.L // self.kv + 1) for p in self.free]
        positions = positions[:self.F]  # the partial innovation keeps its free positions below L mod kv
        sigma = torch.arange(1 << self.F, dtype=torch.int64)  # [2^F]
        dep = torch.zeros_like(sigma)
        for bit, pos in enumerate(positions):
            dep |= ((sigma >> bit) & 1) << pos
        return dep, sum(1 << p for p in positions)


def soft_geometry(L: int, kv: int, soft_bits: int, rotation: int = 0) -> SoftGeometry:
    """The sub-trellis with the most free bits per innovation ``f`` whose state has at most ``soft_bits`` bits
    (at least one free bit; ``soft_bits >= L`` is the full trellis). ``rotation`` ``r`` frees positions
    ``(r·f + j) mod kv``, ``j < f``: successive rotations cycle over every bit of the innovation."""
    f = 1
    for cand in range(kv, 0, -1):
        worst = (L // kv) * cand + min(cand, L % kv)  # F over every rotation is at most this
        if worst <= soft_bits:
            f = cand
            break
    return SoftGeometry(L, kv, tuple(sorted((rotation * f + j) % kv for j in range(f))))


def full_geometry(L: int, kv: int) -> SoftGeometry:
    """The stored trellis itself (every bit free)."""
    return SoftGeometry(L, kv, tuple(range(kv)))


def sub_states(ref: torch.Tensor | None, geom: SoftGeometry) -> torch.Tensor:
    """The stored-code state of every sub-trellis state at every step: ref int ``[B, S]`` -> int64 ``[B, S, 2^F]``
    (``(ref_t & ~M) | D[σ]``). ``ref`` may be None for the full trellis (``σ`` itself)."""
    dep, mask = geom.deposit()  # [2^F]
    if ref is None:
        if not geom.full:
            raise ValueError("a sub-trellis needs a reference walk")
        return dep.view(1, 1, -1)
    return (ref.to(torch.int64) & ~mask).unsqueeze(-1) | dep  # [B, S, 2^F]


def soft_overlap(ref: torch.Tensor, geom: SoftGeometry) -> torch.Tensor:
    """The reference walk's overlap in sub-trellis terms, ``σ_0 >> f``: ref ``[B, S]`` -> int64 ``[B]`` (its free
    bits at state positions ``>= kv``)."""
    dep, _ = geom.deposit()
    out = torch.zeros(ref.shape[0], dtype=torch.int64)
    r0 = ref[:, 0].to(torch.int64)  # [B]
    for bit in range(geom.f, geom.F):
        pos = int(dep[1 << bit]).bit_length() - 1
        out |= ((r0 >> pos) & 1) << (bit - geom.f)
    return out


def chunk_tiles(steps: int, geom: SoftGeometry, v: int, max_bytes: int, itemsize: int = 4) -> int:
    """Tiles per chunk so that one chunk's working set (``steps · 2^F`` entries per tile: the state indices, the
    gathered ``‖v‖²`` and ``v``, scores, ``α``, ``β``, posterior, the backward's weights and moments) stays under
    ``max_bytes``; at least one."""
    per_entry = 8 + itemsize * (2 * v + 10)
    return max(1, max_bytes // (steps * (1 << geom.F) * per_entry))


# --- the passes ---------------------------------------------------------------------------------
# Inside a chunk everything is step-major, ``[S, b, n]`` (``n = 2^F`` states), so that each step's slice is
# contiguous. Branch scores are computed as (2⟨v, x_t⟩ − ‖v‖²) / τ: ℓ_t plus ‖x_t‖²/τ, a constant of the step
# shared by every walk, so posteriors, soft codewords and best walks are those of ℓ. The value table is kept as
# columns ``[1+V, 2^L]``: ``‖v‖²`` then each component (one gather per column is faster than one per row).
def _columns(table: torch.Tensor) -> torch.Tensor:
    return torch.cat([table.square().sum(-1, keepdim=True), table], -1).T.contiguous()  # [1+V, 2^L]


def _gather(cols: torch.Tensor, idx: torch.Tensor, b: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``idx [b|1, S|1, n]`` -> (flat step-major indices ``[S·b·n]``, the columns there ``[1+V, S, b, n]``)."""
    flat = idx.expand(b, steps, idx.shape[-1]).transpose(0, 1).reshape(-1)  # [S·b·n]
    vals = torch.empty(cols.shape[0], flat.shape[0], dtype=cols.dtype)  # [1+V, S·b·n]
    for c, out in zip(cols, vals):
        torch.index_select(c, 0, flat, out=out)
    return flat, vals.view(cols.shape[0], steps, b, -1)


def _scores(vals: torch.Tensor, xs: torch.Tensor, tau: float) -> torch.Tensor:
    """vals ``[1+V, S, b, n]``, xs ``[S, b, V]`` -> scores ``[S, b, n]``."""
    out = vals[0] / -tau
    for i in range(xs.shape[-1]):
        out.addcmul_(vals[i + 1], xs[..., i:i + 1], value=2.0 / tau)
    return out


# Exponents are floored here before ``exp``: torch's vectorised float32 exp leaves its fast path for inputs below
# ln(FLT_MIN) ≈ −87.34 (measured: ~29 ns per element instead of ~0.8 on [−88, −87.5], ~10 ns far below), and the
# excluded states (``_NEG``) and far-off branches sit there. exp(−87) ≈ 1.6e−38 replaces 0 or a denormal; every sum
# it enters also holds a term ≥ 2^−m of the largest (a softmax's max is exp(0) = 1, predecessor weights sum to 1),
# so it vanishes in rounding and the results are the unfloored ones bit for bit (checked on L=16 tiles, F = 4 / 8).
_EXP_FLOOR = -87.0


def _lse(v: torch.Tensor, dim: int) -> torch.Tensor:
    """``logsumexp`` of finite ``v`` along ``dim`` (fewer passes than ``torch.logsumexp`` on these small slices)."""
    mx = v.amax(dim, keepdim=True)
    return (v - mx).clamp_min_(_EXP_FLOOR).exp_().sum(dim).log_().add_(mx.squeeze(dim))


def _forward_backward(scores: torch.Tensor, f: int, overlap: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-space ``α``, ``β`` ``[S, b, n]`` of branch scores ``[S, b, n]`` (``2^f`` new states per step) and the
    forward's ``logsumexp`` over predecessors ``[S, b, n/2^f]`` (by ``σ >> f``; step 0 unused); ``overlap [b]``:
    ``σ_0 >> f`` and ``σ_{S−1} mod 2^(F−f)`` must equal it."""
    fast = _kernels().alpha_beta(scores, f, overlap)
    if fast is not None:
        return fast
    steps, b, n = scores.shape
    m = 1 << f
    r = n >> f
    state = torch.arange(n)
    alpha = torch.empty_like(scores)
    lse = torch.zeros(steps, b, r, dtype=scores.dtype)
    alpha[0] = scores[0]
    if overlap is not None:
        alpha[0].masked_fill_((state >> f).unsqueeze(0) != overlap.unsqueeze(-1), _NEG)
    for t in range(1, steps):
        # predecessors of σ are (σ >> f) + j·r: α_{t−1}.view(b, m, r)[j, q]; σ = q·m + c
        lse[t] = _lse(alpha[t - 1].view(b, m, r), 1)  # [b, r]
        torch.add(scores[t].view(b, r, m), lse[t].unsqueeze(-1), out=alpha[t].view(b, r, m))
    beta = torch.empty_like(scores)
    beta[-1] = 0.0
    if overlap is not None:
        beta[-1].masked_fill_((state & (r - 1)).unsqueeze(0) != overlap.unsqueeze(-1), _NEG)
    for t in range(steps - 2, -1, -1):
        # successors of σ are (σ mod r)·m + c: (ℓ + β)_{t+1}.view(b, r, m)[q, c]; β_t(j·r + q) = their lse[q]
        nxt = _lse(torch.add(scores[t + 1], beta[t + 1]).view(b, r, m), 2)  # [b, r]
        beta[t].view(b, m, r).copy_(nxt.unsqueeze(1).expand(b, m, r))
    return alpha, beta, lse


def _chunk_posterior(x: torch.Tensor, cols: torch.Tensor, idx: torch.Tensor, f: int, tau: float,
                     overlap: torch.Tensor | None):
    """x ``[b, S, V]`` -> (flat indices ``[S·b·n]``, values ``[1+V, S, b, n]``, x step-major ``[S, b, V]``, scores,
    ``α``, ``β`` ``[S, b, n]``, the forward's lse, posterior ``[S, b, n]``)."""
    b, steps, _ = x.shape
    xs = x.transpose(0, 1).contiguous()  # [S, b, V]
    flat, vals = _gather(cols, idx, b, steps)
    scores = _scores(vals, xs, tau)
    alpha, beta, lse = _forward_backward(scores, f, overlap)
    post = torch.softmax(alpha + beta, dim=-1)  # [S, b, n]
    return flat, vals, xs, scores, alpha, beta, lse, post


def _soft(vals: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """``Σ_σ P v`` -> ``[b, S, V]``."""
    return torch.stack([(post * vals[i + 1]).sum(-1) for i in range(vals.shape[0] - 1)], -1).transpose(0, 1)


def _chunk_grads(x: torch.Tensor, cols: torch.Tensor, idx: torch.Tensor, f: int, tau: float,
                 overlap: torch.Tensor | None, grad: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One chunk's (∂L/∂x ``[b, S, V]``, flat indices ``[S·b·n]``, per-entry table terms ``1+V`` × ``[S·b·n]``)
    given ∂L/∂y ``[b, S, V]``. Entry ``(t, σ)`` adds ``P g_t + (2/τ)·∂L/∂ℓ·x_t`` to its state's value gradient and
    ``∂L/∂ℓ`` to the coefficient of ``−(2/τ)·v`` (summed by ``_SoftTrellis.backward``; module docstring)."""
    flat, vals, xs, scores, alpha, beta, lse, post = _chunk_posterior(x, cols, idx, f, tau, overlap)
    steps, b, n = scores.shape
    v = x.shape[-1]
    gs = grad.transpose(0, 1).contiguous()  # [S, b, V]
    c = vals[1] * gs[..., :1]  # [S, b, n]: ⟨g_t, v_t(σ)⟩
    for i in range(1, v):
        c.addcmul_(vals[i + 1], gs[..., i:i + 1])
    fwd, bwd = _expectations(c, scores, alpha, beta, lse, f)
    expect = (post * c).sum((0, 2))  # [b]: E[G]
    g_score = post * fwd.add_(bwd).sub_(expect.view(1, b, 1))  # [S, b, n]: ∂L/∂ℓ
    g_x = torch.stack([(g_score * vals[i + 1]).sum(-1) for i in range(v)], -1).transpose(0, 1) * (2.0 / tau)
    terms = [torch.addcmul(post * gs[..., i:i + 1], g_score, xs[..., i:i + 1], value=2.0 / tau).view(-1)
             for i in range(v)]
    return g_x, flat, [*terms, g_score.view(-1)]


def _expectations(c: torch.Tensor, scores: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, lse: torch.Tensor,
                  f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``E[Σ_{u<=t} c_u | σ_t]`` and ``E[Σ_{u>t} c_u | σ_t]``, each ``[S, b, n]``, from ``c = ⟨g_t, v_t(σ)⟩`` and the
    forward–backward's ``α``, ``β``, lse (``kernels.bcjr`` where it applies, else this loop)."""
    fast = _kernels().expectations(c, scores, alpha, beta, lse, f)
    if fast is not None:
        return fast
    steps, b, n = c.shape
    m = 1 << f
    r = n >> f
    # predecessor weights exp(α_{t−1} − lse_t) [S−1, b, m, r]; successor weights exp(ℓ + β − β) [S−1, b, r, m]
    w_prev = (alpha[:-1].view(steps - 1, b, m, r) - lse[1:].unsqueeze(2)).clamp_min_(_EXP_FLOOR).exp_()
    w_next = (torch.add(scores[1:], beta[1:]).view(steps - 1, b, r, m)
              - beta[:-1].view(steps - 1, b, m, r)[:, :, 0].unsqueeze(-1)).clamp_min_(_EXP_FLOOR).exp_()
    fwd = torch.empty_like(c)  # [S, b, n]: E[Σ_{u<=t} c_u | σ_t]
    fwd[0] = c[0]
    for t in range(1, steps):
        mean = (w_prev[t - 1] * fwd[t - 1].view(b, m, r)).sum(1)  # [b, r]
        torch.add(c[t].view(b, r, m), mean.unsqueeze(-1), out=fwd[t].view(b, r, m))
    bwd = torch.empty_like(c)  # [S, b, n]: E[Σ_{u>t} c_u | σ_t]
    bwd[-1] = 0.0
    for t in range(steps - 2, -1, -1):
        mean = (w_next[t] * torch.add(bwd[t + 1], c[t + 1]).view(b, r, m)).sum(-1)  # [b, r]
        bwd[t].view(b, m, r).copy_(mean.unsqueeze(1).expand(b, m, r))
    return fwd, bwd


def _chunks(b: int, x: torch.Tensor, geom: SoftGeometry, max_bytes: int):
    size = chunk_tiles(x.shape[1], geom, x.shape[2], max_bytes, x.element_size())
    return [slice(i, i + size) for i in range(0, b, size)]


def _idx(ref: torch.Tensor | None, group: torch.Tensor | None, geom: SoftGeometry, sl: slice) -> torch.Tensor:
    """Rows of the flattened tables ``[G·2^L, V]`` of the tiles ``sl``: int32 ``[b|1, S|1, n]`` (half the bytes of
    int64 in the gathers and the gradient's index_add_, which read it ``S·b·n`` times per chunk)."""
    idx = sub_states(None if ref is None else ref[sl], geom)
    idx = idx if group is None else idx + (group[sl] << geom.L).view(-1, 1, 1)
    return idx.to(torch.int32)


class _SoftTrellis(torch.autograd.Function):
    """y ``[B, S, V]`` from x ``[B, S, V]`` and the value tables ``[G·2^L, V]`` (tile ``i`` reads table ``group[i]``);
    backward in closed form: in one C++ call where ``kernels.bcjr.soft`` applies, else chunked."""

    @staticmethod
    def forward(ctx, x, table, ref, overlap, group, geom, tau, max_bytes):
        out = torch.empty_like(x)  # [B, S, V]
        with torch.no_grad():
            cols = _columns(table)
            fused = _fused(x, cols, ref, overlap, group, geom, tau)
            if fused is not None:
                out = fused[0]
            else:
                for sl in _chunks(x.shape[0], x, geom, max_bytes):
                    ov = None if overlap is None else overlap[sl]
                    _, vals, *_, post = _chunk_posterior(x[sl], cols, _idx(ref, group, geom, sl), geom.f, tau, ov)
                    out[sl] = _soft(vals, post)
        ctx.save_for_backward(x, table, ref, overlap, group)
        ctx.geom, ctx.tau, ctx.max_bytes = geom, tau, max_bytes
        return out

    @staticmethod
    def backward(ctx, grad):
        x, table, ref, overlap, group = ctx.saved_tensors
        geom, tau = ctx.geom, ctx.tau
        v = x.shape[-1]
        g_x = torch.zeros_like(x)
        acc = torch.zeros(v + 1, table.shape[0], dtype=x.dtype)  # [V+1, G·2^L]
        with torch.no_grad():
            cols = _columns(table)
            fused = _fused(x, cols, ref, overlap, group, geom, tau, grad.to(x.dtype))
            if fused is not None:
                g_x, acc = fused
            else:
                for sl in _chunks(x.shape[0], x, geom, ctx.max_bytes):
                    g_x[sl], flat, terms = _chunk_grads(x[sl], cols, _idx(ref, group, geom, sl), geom.f, tau,
                                                        None if overlap is None else overlap[sl],
                                                        grad[sl].to(x.dtype))
                    if ctx.needs_input_grad[1]:
                        for i, term in enumerate(terms):
                            acc[i].index_add_(0, flat, term)
            g_table = None
            if ctx.needs_input_grad[1]:
                g_table = acc[:v].T - table * acc[v].unsqueeze(-1) * (2.0 / tau)  # [G·2^L, V]
        return g_x if ctx.needs_input_grad[0] else None, g_table, None, None, None, None, None, None


def _fused(x: torch.Tensor, cols: torch.Tensor, ref: torch.Tensor | None, overlap: torch.Tensor | None,
           group: torch.Tensor | None, geom: SoftGeometry, tau: float, grad: torch.Tensor | None = None):
    """The whole pass by ``kernels.bcjr.soft`` (each tile's recursions in cache, no ``[S, b, 2^F]`` tensors): ``[y]``
    or ``[∂x, table terms [1+V, G·2^L]]``; None where it does not apply (then the chunks below run)."""
    if ref is None and not geom.full:
        return None  # sub_states raises the error
    dep, mask = geom.deposit()
    return _kernels().soft(x, cols, ref, dep, ~mask, group, geom.L, geom.f, tau, overlap, grad)


def _check(x: torch.Tensor, table: torch.Tensor, ref: torch.Tensor | None, group: torch.Tensor | None,
           geom: SoftGeometry, tau: float) -> None:
    if x.dim() == 3 and x.shape[1] == 0:
        raise ValueError(f"x {tuple(x.shape)} has no trellis steps")
    if x.dim() != 3 or table.dim() not in (2, 3) or table.shape[-2:] != (1 << geom.L, x.shape[-1]):
        raise ValueError(f"x {tuple(x.shape)} and table {tuple(table.shape)} do not match L={geom.L}")
    if ref is not None and ref.shape != x.shape[:2]:
        raise ValueError(f"reference walk {tuple(ref.shape)} does not match x {tuple(x.shape)}")
    tables = 1 if table.dim() == 2 else table.shape[0]
    if group is None and tables > 1 or group is not None and (
            group.shape != x.shape[:1] or group.numel() and not 0 <= int(group.min()) <= int(group.max()) < tables):
        raise ValueError(f"{tables} tables need a group [B] of table indices for the {x.shape[0]} tiles")
    if not tau > 0:
        raise ValueError(f"temperature {tau} must be > 0")


def _group(group: torch.Tensor | None) -> torch.Tensor | None:
    return None if group is None else group.to(torch.int64)


def soft_codeword(x: torch.Tensor, table: torch.Tensor, tau: float, geom: SoftGeometry,
                  ref: torch.Tensor | None = None, overlap: torch.Tensor | None = None,
                  group: torch.Tensor | None = None, max_bytes: int = MAX_BYTES) -> torch.Tensor:
    """The soft codeword ``Σ_σ P_t(σ) v_t(σ)`` ``[B, S, V]`` of each tile ``x [B, S, V]`` (code units) under the value
    table ``[2^L, V]`` at temperature ``tau``, over the sub-trellis ``geom`` around ``ref [B, S]`` (None: the full
    trellis), tail-biting given ``overlap [B]`` (``soft_overlap``; None: free start). Several tables ``[G, 2^L, V]``
    (the experts of a stack, one LUT each) with ``group [B]`` naming each tile's table run in one pass.
    Differentiable in ``x`` and ``table``; computed in ``x``'s dtype."""
    _check(x, table, ref, group, geom, tau)
    table = table.to(x.dtype).reshape(-1, x.shape[-1])  # [G·2^L, V]
    ref = None if ref is None else ref.to(torch.int64)
    overlap = None if overlap is None else overlap.to(torch.int64)
    return _SoftTrellis.apply(x, table, ref, overlap, _group(group), geom, float(tau), max_bytes)


def posterior(x: torch.Tensor, table: torch.Tensor, tau: float, geom: SoftGeometry,
              ref: torch.Tensor | None = None, overlap: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(posterior ``P_t(σ)`` ``[B, S, 2^F]``, the stored-code state of each ``σ`` int64 ``[B, S, 2^F]``) under one
    table ``[2^L, V]``; one chunk, no gradient: for inspection and tests."""
    _check(x, table, ref, None, geom, tau)
    with torch.no_grad():
        idx = sub_states(ref, geom).expand(x.shape[0], x.shape[1], -1)
        *_, post = _chunk_posterior(x, _columns(table.to(x.dtype)), idx, geom.f, float(tau),
                                    None if overlap is None else overlap.to(torch.int64))
    return post.transpose(0, 1), idx


def hard_path(x: torch.Tensor, table: torch.Tensor, geom: SoftGeometry, ref: torch.Tensor | None = None,
              overlap: torch.Tensor | None = None, group: torch.Tensor | None = None,
              max_bytes: int = MAX_BYTES) -> torch.Tensor:
    """The best walk of the sub-trellis (its Viterbi; the ``τ → 0`` limit of the soft pass) as stored-code states
    int64 ``[B, S]``: x ``[B, S, V]``, table ``[2^L, V]`` (or ``[G, 2^L, V]`` with ``group``), ``ref`` / ``overlap`` as
    in ``soft_codeword``. Ties go to the smallest predecessor index and end state, as in ``codecs.trellis.viterbi``."""
    _check(x, table, ref, group, geom, 1.0)
    group = _group(group)
    ref = None if ref is None else ref.to(torch.int64)
    b, steps, _ = x.shape
    m, n = 1 << geom.f, 1 << geom.F
    r = n >> geom.f
    state = torch.arange(n)
    out = torch.empty(b, steps, dtype=torch.int64)  # [B, S]
    with torch.no_grad():
        cols = _columns(table.to(x.dtype).reshape(-1, x.shape[-1]))
        if ref is not None or geom.full:
            dep, mask = geom.deposit()
            fast = _kernels().hard_path(x, cols, ref, dep, ~mask, group, geom.L, geom.f,
                                        None if overlap is None else overlap.to(torch.int64))
            if fast is not None:
                return fast
        for sl in _chunks(b, x, geom, max_bytes):
            idx = _idx(ref, None, geom, sl)  # [c|1, S|1, n]: stored-code states
            c = x[sl].shape[0]
            xs = x[sl].transpose(0, 1).contiguous()  # [S, c, V]
            scores = _scores(_gather(cols, _idx(ref, group, geom, sl), c, steps)[1], xs, 1.0)  # [S, c, n]
            cost = scores[0].clone()
            ov = None if overlap is None else overlap[sl].to(torch.int64)
            if ov is not None:
                cost.masked_fill_((state >> geom.f).unsqueeze(0) != ov.unsqueeze(-1), _NEG)
            back = torch.empty(c, steps, r, dtype=torch.int64)  # [c, S, r]: j of the best predecessor
            for t in range(1, steps):
                best, j = cost.view(c, m, r).max(dim=1)  # [c, r]
                back[:, t] = j
                cost = (scores[t].view(c, r, m) + best.unsqueeze(-1)).view(c, n)
            if ov is not None:
                cost.masked_fill_((state & (r - 1)).unsqueeze(0) != ov.unsqueeze(-1), _NEG)
            sig = cost.argmax(-1)  # [c]
            walk = torch.empty(c, steps, dtype=torch.int64)
            walk[:, -1] = sig
            for t in range(steps - 1, 0, -1):
                q = sig >> geom.f
                sig = q + back[:, t].gather(1, q.unsqueeze(-1)).squeeze(-1) * r
                walk[:, t - 1] = sig
            out[sl] = idx.expand(c, steps, n).gather(2, walk.unsqueeze(-1)).squeeze(-1)
    return out
