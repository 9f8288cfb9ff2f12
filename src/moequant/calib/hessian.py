"""Hessian statistics for GPTQ/LDLQ, accumulated in float64 without keeping any activation (partial
products of up to 2,048 tokens are fp32 GEMMs, summed in float64; see ``_accumulate``).

A linear layer ``y = W x`` quantized to ``Ŵ = W - Δ`` loses ``E‖Δ x‖² = tr(Δ H Δᵀ)`` on average, with
``H = E[x xᵀ]`` the second moment of its input. We keep only the running sum ``Σ x xᵀ`` ``[K, K]``
(float64, so millions of tokens add up without drift) and the token count; ``H = Σ x xᵀ / n``.

Fused experts get one statistic per expert, **conditioned on routing**: ``H_e = E[x xᵀ | the router
sent x to expert e]``. For ``gate_up_proj[e]`` ``x`` is the MoE block's input; for ``down_proj[e]`` it
is ``act(gate_e x) ⊙ (up_e x)`` *before* the routing weight — that weight scales the expert's whole
output for a token, so it rescales the token's contribution but not what rounding is best for the
expert. A token routed to ``k`` experts counts once in each of them. Aggregates (for the ablation):

- ``per-expert``: each expert its own ``H_e`` (starved experts: below);
- ``layer-mean``: every expert gets ``(1/|S|) Σ_{e∈S} H_e``, S = experts that saw at least one token;
- ``layer-token-weighted``: every expert gets ``Σ_e Σ x xᵀ / Σ_e n_e``, i.e. experts weighted by
  their token counts (this is also ``H_layer``, the reference for the starved policies).

**Starved experts** (``n_e < min_tokens``) are never handled silently: each is returned as a
``StarvedExpert`` with its count and the policy applied:

- ``shrink``: ``(n_e H_e + τ H_layer) / (n_e + τ)`` — the expert keeps weight ``n_e / (n_e + τ)`` on
  its own estimate (``τ = min_tokens`` unless given), an expert without tokens gets ``H_layer``;
- ``layer``: ``H_layer``;
- ``rtn``: ``mean(diag H_layer) · I`` — with an identity Hessian LDLQ feeds no error forward, so the
  expert is rounded to nearest, at the scale of the layer's Hessians.

``DEFAULT_MIN_EXPERT_TOKENS = 128``. From ``n`` tokens ``H_e`` has rank at most ``n``; along any one
direction ``v`` the estimate ``vᵀ H_e v`` is a mean of ``n`` squares, whose relative spread is about
``√(2/n)`` — 18% at 64 tokens, 12.5% at 128, 4% at 1024 — and with ``n < K`` every direction outside
the ``n`` seen ones is weighted by the 1% damping alone, so LDLQ freely pushes rounding error there.
A threshold tied to ``K`` (full rank) would flag most experts of small calibration sets, so we use a
fixed count that only catches experts the router barely uses: the default calibration (128 × 512 =
65,536 tokens) gives an average expert 8,192 routed tokens in OLMoE (64 experts, top-8), 4,096 in
Qwen3-MoE (128, top-8) and 16,384 in Mixtral (8, top-2), so 128 is 1.5–3% of a fair share.
Below the threshold ``shrink`` is continuous in ``n_e``; at the threshold the own weight jumps from
about ½ to 1 (experts above it are used as measured). Both ``min_tokens`` and ``τ`` are parameters.

``damp`` adds ``λ · mean(diag H) · I`` so that the LDL/Cholesky factorisation exists; inputs that
never carried signal (zero diagonal) get a diagonal of exactly 1 instead — their weight columns
never reach the output, so any value works (the GPTQ convention) and the matrix stays positive
definite. NaN or Inf raise ``MoequantError`` naming the tensor (``where``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moequant.errors import MoequantError

DEFAULT_MIN_EXPERT_TOKENS = 128
MODES = ("per-expert", "layer-mean", "layer-token-weighted")
POLICIES = ("shrink", "layer", "rtn")


# Tokens per partial product. Each chunk's ``xᵀx`` is fp32 GEMMs (relative error ~1e-7); the chunks
# are added into the float64 running sum, so the total never drifts however many tokens arrive. The
# fp32 GEMM is 2x faster than float64 on this CPU (2048 x 4864: 1.0 s vs 2.0 s) and far faster on GPUs.
_CHUNK_TOKENS = 2048
# Columns per block of the symmetric product (``_add_gram``): wider inputs are cut into about this many.
_GRAM_BLOCK = 512


def _gram_blocks(k: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of the column blocks of a ``K``-wide Gram product: one block up to ``_GRAM_BLOCK``
    columns, else ``ceil(K / _GRAM_BLOCK)`` blocks of (nearly) equal width."""
    n = -(-k // _GRAM_BLOCK)
    width = -(-k // n)
    return [(a, min(a + width, k)) for a in range(0, k, width)]


def _add_gram(acc: torch.Tensor, c: torch.Tensor) -> None:
    """``acc [K, K] += (cᵀc)`` in float64 for an fp32 chunk ``c [t, K]``, computing only the blocks on and
    above the diagonal and mirroring the others (``xᵀx`` is symmetric): about half the multiply-adds of one
    ``cᵀc`` GEMM. Each block ``c[:, i]ᵀ c[:, j]`` sums over the same ``t`` tokens as the full product.
    Measured here (``benchmarks/hessian_gram_speed.py``: AMD EPYC with AVX-512, torch 2.13, t = 2048, median of 5,
    nothing else running), time of the blocks over ``c.T @ c`` at K = 576 / 896 / 1536 / 4864 / 8960: 2 threads
    0.89 / 0.82 / 0.94 / 0.58 / 0.62x (4864: 856 -> 500 ms), 1 thread 0.85 / 0.80 / 0.86 / 0.58 / 0.55x; the
    values were equal bit for bit at every width and thread count (``tests/calib/test_hessian_gram.py`` allows
    1e-6). Oversubscribed (2 threads beside another 2-thread job on 2 cores) the blocks were slower, 1.4-2.4x:
    each small GEMM waits for a descheduled thread. The result is exactly symmetric. Why it
    matters: a py-spy profile of ``quantize qwen2.5-coder-0.5b --bits 3`` (LDLQ + RHT) spent 44% of its
    samples in this accumulation, most of it on ``down_proj``'s 4864-wide input."""
    blocks = _gram_blocks(c.shape[1])
    if len(blocks) == 1:
        acc.add_((c.T @ c).to(torch.float64))
        return
    for bi, (i0, i1) in enumerate(blocks):
        ci = c[:, i0:i1]  # [t, b_i]
        for j0, j1 in blocks[bi:]:
            blk = (ci.T @ c[:, j0:j1]).to(torch.float64)  # [b_i, b_j]
            acc[i0:i1, j0:j1].add_(blk)
            if j0 != i0:
                acc[j0:j1, i0:i1].add_(blk.T)


def _accumulate(acc: torch.Tensor, x: torch.Tensor) -> int:
    """``acc [K, K] += xᵀx`` for ``x [..., K]`` (one row per token) -> number of tokens."""
    x = x.detach().reshape(-1, x.shape[-1])  # [T, K]
    for t0 in range(0, x.shape[0], _CHUNK_TOKENS):
        _add_gram(acc, x[t0:t0 + _CHUNK_TOKENS].to(torch.float32))  # chunk [t, K]
    return x.shape[0]


@dataclass
class HessianStat:
    """Running ``Σ x xᵀ`` and token count of one linear input.

    xtx: ``[K, K]`` float64; count: tokens added.
    """

    xtx: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, k: int) -> "HessianStat":
        return cls(torch.zeros(k, k, dtype=torch.float64))

    def add(self, x: torch.Tensor) -> None:
        """x ``[..., K]``: every row is one token."""
        self.count += _accumulate(self.xtx, x)

    def mean(self) -> torch.Tensor:
        """``H = Σ x xᵀ / n`` ``[K, K]``."""
        if self.count == 0:
            raise MoequantError("Hessian statistic has no tokens: the linear never ran during calibration")
        return self.xtx / self.count


@dataclass
class ExpertHessianStat:
    """Per-expert running ``Σ x xᵀ`` over the tokens routed to each expert.

    xtx: ``[E, K, K]`` float64; counts: ``[E]`` int64 routed tokens per expert.
    """

    xtx: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def zeros(cls, experts: int, k: int) -> "ExpertHessianStat":
        return cls(torch.zeros(experts, k, k, dtype=torch.float64), torch.zeros(experts, dtype=torch.long))

    def add(self, e: int, x: torch.Tensor) -> None:
        """x ``[n, K]``: the tokens routed to expert ``e``."""
        self.counts[e] += _accumulate(self.xtx[e], x)

    def mean_per_expert(self) -> torch.Tensor:
        """``H_e`` ``[E, K, K]``; an expert without tokens gets a zero matrix (no estimate at all:
        ``expert_hessians`` replaces it by its starved policy)."""
        return self.xtx / self.counts.clamp(min=1).to(torch.float64)[:, None, None]

    def layer_mean(self) -> torch.Tensor:
        """Unweighted mean of ``H_e`` over the experts with tokens ``[K, K]``."""
        seen = self.counts > 0  # [E]
        if not bool(seen.any()):
            raise MoequantError("no expert of this layer received any calibration token")
        return self.mean_per_expert()[seen].mean(0)

    def layer_token_weighted(self) -> torch.Tensor:
        """``Σ_e Σ x xᵀ / Σ_e n_e`` ``[K, K]``: the mean over all (token, expert) routings."""
        total = int(self.counts.sum())
        if total == 0:
            raise MoequantError("no expert of this layer received any calibration token")
        return self.xtx.sum(0) / total


@dataclass(frozen=True)
class StarvedExpert:
    """An expert with fewer routed tokens than ``min_tokens`` and what was done about it (a policy
    name, or the aggregate mode when every expert shares the layer's Hessian anyway)."""

    expert: int
    count: int
    policy: str


def check_finite(h: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(h).all()):
        raise MoequantError(f"{where}: Hessian has NaN or Inf entries (check the calibration activations)")


def damp(h: torch.Tensor, lam: float = 0.01, where: str = "Hessian") -> torch.Tensor:
    """``H + λ·mean(diag H)·I`` for every matrix of ``h [..., K, K]``, returned as a new float64 tensor.

    Dead inputs (diagonal exactly 0) get a diagonal of 1 and no damping; a matrix whose inputs are
    all dead becomes the identity. Recover the dead mask, if needed, as ``diag(h) == 0`` on the input.
    """
    if not lam >= 0:
        raise ValueError(f"damping must be >= 0, got {lam}")
    check_finite(h, where)
    h = h.to(torch.float64, copy=True)
    d = torch.diagonal(h, dim1=-2, dim2=-1)  # [..., K], a view into h
    dead = d == 0  # [..., K]
    d.add_(lam * d.mean(-1, keepdim=True))
    d.masked_fill_(dead, 1.0)
    return h


def _check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{kind} {value!r} is not one of: {', '.join(valid)}")


def expert_hessians(stat: ExpertHessianStat, mode: str, *, min_tokens: int = DEFAULT_MIN_EXPERT_TOKENS,
                    policy: str = "shrink", tau: float | None = None) -> tuple[torch.Tensor, list[StarvedExpert]]:
    """The (undamped) Hessian each expert is solved with, ``[E, K, K]`` float64, and the experts with
    fewer than ``min_tokens`` routed tokens. ``mode``: one of ``MODES``; ``policy`` (one of
    ``POLICIES``) and ``tau`` only act in ``per-expert`` mode — in the layer modes every expert gets
    the same matrix and the starved list records the mode as its policy."""
    _check_choice("Hessian mode", mode, MODES)
    _check_choice("starved-expert policy", policy, POLICIES)
    if min_tokens < 0:
        raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
    tau = float(min_tokens if tau is None else tau)
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    counts = [int(c) for c in stat.counts.tolist()]
    low = [e for e, c in enumerate(counts) if c < min_tokens]
    layer = stat.layer_token_weighted()  # [K, K]
    if mode != "per-expert":
        shared = layer if mode == "layer-token-weighted" else stat.layer_mean()  # [K, K]
        return shared.expand(len(counts), *shared.shape).clone(), [StarvedExpert(e, counts[e], mode) for e in low]
    per = stat.mean_per_expert()  # [E, K, K]
    for e in low:
        n = counts[e]
        if policy == "shrink":
            per[e] = (n * per[e] + tau * layer) / (n + tau) if n + tau > 0 else layer
        elif policy == "layer":
            per[e] = layer
        else:  # rtn
            per[e] = torch.diagonal(layer).mean() * torch.eye(layer.shape[0], dtype=layer.dtype)
    return per, [StarvedExpert(e, counts[e], policy) for e in low]
