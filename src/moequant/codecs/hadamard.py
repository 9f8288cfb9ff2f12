"""Incoherence processing: a random Hadamard transform (RHT) on both sides of a weight matrix.

**The math.** ``H_n`` is an orthonormal ``n × n`` Hadamard-type matrix (``H_nᵀ H_n = I``) and ``S_U``
(``[K]``), ``S_V`` (``[N]``) are random ±1 diagonals. A weight ``W [N, K]`` is quantized in the rotated
basis ``W̃ = H_N S_V W S_U H_Kᵀ`` under the rotated Hessian ``H̃ = H_K S_U H S_U H_Kᵀ``. Both rotations
are orthogonal, so the layer error is unchanged, ``tr(Δ H Δᵀ) = tr(Δ̃ H̃ Δ̃ᵀ)`` with ``Δ̃`` the rotated
error, while every entry of ``W̃`` mixes all entries of ``W``: outliers are spread thin and ``W̃``
looks i.i.d. Gaussian (QuIP#'s incoherence), which is what scalar and vector codes quantize best.
At run time ``W`` is never rebuilt: ``y = W x = S_V H_Nᵀ W̃ (H_K S_U x)``. Expert tensors
``[E, N, K]`` use one sign pair for every expert (``[K]``, ``[N]``) or one per expert (``[E, K]``, ``[E, N]``).

**Any dimension.** ``n = p · m`` with ``p`` a power of two and ``H_n = H_p ⊗ B_m``: ``H_p`` is the
Sylvester–Walsh–Hadamard matrix and ``B_m`` a small orthonormal block. The rule for ``m``: with ``o``
the odd part of ``n``, ``o = 1`` needs no block (``m = 1``); otherwise take the *smallest*
``m = o · 2^j`` (``j ≥ 1``, ``m | n``) for which a Paley construction gives a true Hadamard matrix
(Paley I: ``m - 1`` a prime ``≡ 3 mod 4``; Paley II: ``m/2 - 1`` a prime ``≡ 1 mod 4``). Then every
entry of ``H_n`` is ``±1/√n`` and the power-of-two part stays as large as a true Hadamard allows
(576 = 16·36, 768 = 64·12, 896 = 32·28, 1536 = 128·12, 3072 = 256·12, 4864 = 64·76). A true Hadamard
spreads any spike uniformly, so it is preferred to a smaller odd block. When no Paley order divides
``n`` (odd ``n`` such as 7, or 6 = 2·3), ``B_o`` is a random orthogonal matrix (QR of a Gaussian
seeded by ``o``): a pure function of the size (nothing to store) that maps every fixed direction to
a random one. A DCT block would not do: it maps a constant vector to a single spike.

**Three rules, recorded per tensor** (``RULES``). The rule above is ``"paley"`` (format ``rht`` v1): the
block inside, applied at run time to sub-rows of ``m`` floats. ``"paley-outer"`` (the default since format
``rht`` v2) is the same two factors in the other order, ``H_n = B_m ⊗ H_p`` (element ``i = b · p + a``):
the butterfly runs on contiguous runs of ``p`` floats and the block mixes whole runs (vectors), which
the kernel does 1.8–2.2× faster at prefill shapes; every entry is still ``±1/√n`` (it is ``H_n`` with rows
and columns permuted). ``"hartley"`` keeps only the odd part ``o`` of ``n`` outside, ``H_n = C_o ⊗ H_p`` with ``C_o``
the normalized Hartley matrix ``C[j, k] = (cos 2πjk/o + sin 2πjk/o) / √o`` (symmetric, orthogonal):
``o`` multiply-adds per element instead of ``m`` (9 instead of 36 for 576), but its entries reach ``√2/√n``
(incoherence ``μ = √2``): an outlier's energy is spread unevenly (0 to 2/n of it per entry). On SmolLM2
its single-seed perplexities were within the spread of the two Paley orders (which are equal in
distribution; BENCHMARKS.md, "Three Hadamard rules"), so no loss is established, but its guarantee is
weaker and in a whole model it was barely faster than ``paley-outer``: it is opt-in.

**Fast application.** ``v ↦ H_n v`` never forms ``H_n``: ``v`` is viewed as a tensor
``[f_1, …, f_r, m]`` and one small matrix is applied along each axis, using
``H_p = H_{f_1} ⊗ … ⊗ H_{f_r}`` (Sylvester blocks of order ``f_i ≤ 2^_FACTOR_BITS``). That costs
``n · (Σ f_i + m)`` per vector, the ``O(n log n)`` of a butterfly FWHT up to a small constant, with
``log p / _FACTOR_BITS`` batched matmuls instead of ``log p`` memory passes. At run time
(``transform_input`` / ``restore_output``, float32 on the CPU, shared signs) one call of the C++ kernel
``kernels.hadamard`` does the signs and the whole transform instead (the same math, fp32 rounding aside), and
so does ``weight_inverse`` (``RotatedTensor.dequantize``; fine-tuning an rht run differentiates it: the adjoint
transform backward, ``_SignedTransform``):
this module imports torch only, so the kernel module installs itself here when it is imported
(``set_fast_path``); ``solvers.incoherence`` and the rotated format's run-time path import it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# ``(x, signs_before | None, signs_after | None, transpose) -> y | None``: the accelerated
# ``rht_apply`` (``kernels.hadamard.fast``) once installed; None where it does not apply.
FastPath = Callable[[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], bool, str], Optional[torch.Tensor]]
_fast: FastPath | None = None


def set_fast_path(fn: FastPath | None) -> None:
    """Install (or, with None, remove) the accelerated transform ``transform_input`` / ``restore_output``
    try first (``kernels.hadamard`` installs its C++ kernel on import)."""
    global _fast
    _fast = fn


def _apply_fast(x: torch.Tensor, before: torch.Tensor | None, after: torch.Tensor | None,
                transpose: bool, rule: str) -> torch.Tensor | None:
    return None if _fast is None else _fast(x, before, after, transpose, rule)


def _signed_transform(x: torch.Tensor, before: torch.Tensor | None, after: torch.Tensor | None, transpose: bool,
                      rule: str) -> torch.Tensor:
    """``S_after T (S_before v)`` for every ``v`` along the last dim of ``x`` (``T = H_n``, or ``H_nᵀ`` with
    ``transpose``; a None sign is the identity): the C++ kernel where it applies, else torch ops."""
    out = _apply_fast(x, before, after, transpose, rule)
    if out is not None:
        return out
    y = x if before is None else x * before.to(x.dtype)
    y = hadamard_transform(y, transpose, rule)
    return y if after is None else y * after.to(y.dtype)


class _SignedTransform(torch.autograd.Function):
    """``_signed_transform`` with a backward: the map is linear, its adjoint ``S_before Tᵀ S_after`` is the same
    transform with the signs swapped and ``transpose`` flipped, so the gradient takes the kernel too (the
    kernel has no backward of its own)."""

    @staticmethod
    def forward(ctx, x, before, after, transpose, rule):
        ctx.args = (before, after, transpose, rule)
        return _signed_transform(x, before, after, transpose, rule)

    @staticmethod
    def backward(ctx, grad):
        before, after, transpose, rule = ctx.args
        return _signed_transform(grad.contiguous(), after, before, not transpose, rule), None, None, None, None


def _two_sided(w: torch.Tensor, col_signs: torch.Tensor, row_signs: torch.Tensor, transpose: bool,
               rule: str) -> torch.Tensor:
    """``S_col T_N W T_Kᵀ S_row`` for ``w [..., N, K]`` (``T = H``, or ``Hᵀ`` with ``transpose``) by two
    ``_SignedTransform``s, differentiable: each column ``c ↦ S_col T_N c``, then each row ``r ↦ S_row T_K r``."""
    cols = _SignedTransform.apply(w.transpose(-1, -2).contiguous(), None, col_signs, transpose, rule)  # [..., K, N]
    return _SignedTransform.apply(cols.transpose(-1, -2).contiguous(), None, row_signs, transpose, rule)  # [..., N, K]


# Largest Sylvester factor applied as one dense matmul: 2^5 measured at least as fast as 2^6 and the
# butterfly FWHT on CPU (x [4096, 3072] fp32, one thread); every cap gives the same matrix.
_FACTOR_BITS = 5


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(j - i)`` with ``χ`` the quadratic character modulo the prime ``q``."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q  # [q, q]
    return chi[idx]  # [q, q]


def _paley(m: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix ``[m, m]`` (float64) by Paley I or II, or None when neither applies."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        q = m - 1
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)  # skew conference matrix
        h = torch.eye(m, dtype=torch.float64) + s
    elif m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        q = m // 2 - 1
        s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, 1, _jacobsthal(q)  # symmetric conference matrix
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        h = torch.kron(s, one) + torch.kron((s == 0).to(torch.float64), zero)  # [m, m]
    else:
        return None
    if not torch.compiler.is_compiling():  # a self-check of the construction (not traceable: data-dependent)
        assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64)), f"Paley construction failed for {m}"
    return h


RULES = ("paley", "paley-outer", "hartley")  # the module docstring; a rotated tensor records its rule (rht v2)
DEFAULT_RULE = "paley-outer"  # what new tensors use
OUTER_RULES = ("paley-outer", "hartley")  # the block outside: H_n = B ⊗ H_p


def block_kind(rule: str) -> str:
    """The ``_BUILD`` kind of ``rule``'s non-power-of-two factor: the Hartley matrix or ``_block``."""
    return "hartley" if rule == "hartley" else "block"


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"Hadamard rule {rule!r}: expected one of {', '.join(RULES)}")
    return rule


@torch.compiler.assume_constant_result  # pure in n: a traced graph takes the value, not the computation
def hadamard_factors(n: int, rule: str = "paley") -> tuple[int, int]:
    """``(p, m)`` with ``p · m = n``, ``p`` a power of two and ``m`` the block order under ``rule`` (module
    docstring: ``H_p ⊗ B_m`` for ``"paley"``, ``B_m ⊗ H_p`` for ``"paley-outer"``, ``C_m ⊗ H_p`` with ``m`` the
    odd part for ``"hartley"``)."""
    if check_rule(rule) == "hartley":
        return _odd_split(n)
    return _hadamard_factors(n)


@functools.lru_cache(maxsize=256)
def _odd_split(n: int) -> tuple[int, int]:
    if n < 1:
        raise ValueError(f"transform size must be positive, got {n}")
    p = n & -n
    return p, n // p


@functools.lru_cache(maxsize=256)  # the kernel asks at every call (it builds Paley candidates); a plain function
def _hadamard_factors(n: int) -> tuple[int, int]:  # in front of it, because dynamo traces through lru_cache
    if n < 1:
        raise ValueError(f"transform size must be positive, got {n}")
    odd = n
    while odd % 2 == 0:
        odd //= 2
    if odd == 1:
        return n, 1
    m = odd * 2
    while n % m == 0:
        if _paley(m) is not None:
            return n // m, m
        m *= 2
    return n // odd, odd


def _sylvester(p: int) -> torch.Tensor:
    """Orthonormal Sylvester–Hadamard matrix ``[p, p]`` (``p`` a power of two), float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(p)


def _hartley(o: int) -> torch.Tensor:
    """The normalized Hartley matrix ``C_o [o, o]`` (float64): ``(cos + sin)(2π jk / o) / √o``, symmetric and
    orthogonal (``C_o² = I``)."""
    jk = torch.outer(torch.arange(o, dtype=torch.float64), torch.arange(o, dtype=torch.float64))
    t = 2 * math.pi * torch.remainder(jk, o) / o  # reduced mod o first: exact angles for large j·k
    return (torch.cos(t) + torch.sin(t)) / math.sqrt(o)


def _block(m: int) -> torch.Tensor:
    """The orthonormal block ``B_m [m, m]`` (float64): scaled Paley matrix or seeded random orthogonal."""
    h = _paley(m)
    if h is not None:
        return h / math.sqrt(m)
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(m)
    q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))[None, :]).contiguous()  # unique Q: positive diagonal of R


@torch.compiler.assume_constant_result
def _factor_sizes(n: int, rule: str = "paley") -> tuple[tuple[int, str], ...]:
    """``((order, kind), …)`` of the Kronecker factors of ``H_n``, outermost first: ``"paley"`` gives
    ``H_{f_1} ⊗ … ⊗ H_{f_r} ⊗ B_m``, ``"paley-outer"`` ``B_m ⊗ H_{f_1} ⊗ … ⊗ H_{f_r}``, ``"hartley"``
    ``C_o ⊗ H_{f_1} ⊗ … ⊗ H_{f_r}``; kind ``"sylvester"``, ``"block"`` (``_block``) or ``"hartley"``."""
    return _factor_sizes_cached(n, rule)


@functools.lru_cache(maxsize=256)
def _factor_sizes_cached(n: int, rule: str) -> tuple[tuple[int, str], ...]:
    p, m = hadamard_factors(n, rule)
    k = p.bit_length() - 1
    sizes = [(1 << min(_FACTOR_BITS, k - i), "sylvester") for i in range(0, k, _FACTOR_BITS)]
    if m == 1:
        return tuple(sizes)
    if rule in OUTER_RULES:
        return tuple([(m, block_kind(rule))] + sizes)
    return tuple(sizes + [(m, "block")])


# (order, kind, dtype, device) -> the factor: a plain dict, so that a torch.compile trace reads a built factor as
# a constant (``warm``) instead of tracing its construction.
_FACTORS: dict[tuple[int, str, torch.dtype, torch.device], torch.Tensor] = {}
_BUILD = {"sylvester": _sylvester, "block": _block, "hartley": _hartley}


def _factor(f: int, dtype: torch.dtype, device: torch.device, kind: str | None = None) -> torch.Tensor:
    """The ``[f, f]`` Kronecker factor of order ``f`` and ``kind`` (default: Sylvester for a power of two,
    else ``_block``) in ``dtype`` on ``device`` (cached: pure in its args)."""
    kind = kind or ("sylvester" if f & (f - 1) == 0 else "block")
    key = (f, kind, dtype, device)
    mat = _FACTORS.get(key)
    if mat is None:
        mat = _BUILD[kind](f).to(dtype=dtype, device=device)
        if len(_FACTORS) < 256:
            _FACTORS[key] = mat
    return mat


def warm(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", rule: str = "paley") -> None:
    """Build the factors of ``H_n`` now (eagerly), so that a later ``torch.compile`` trace of a transform of size
    ``n`` finds them built. ``QuantLinear`` / ``QuantExperts`` call it for their rotated tensors' sizes."""
    if torch.compiler.is_compiling():
        return
    for f, kind in _factor_sizes(n, rule):
        _factor(f, dtype, torch.device(device), kind)


def hadamard_transform(x: torch.Tensor, transpose: bool = False, rule: str = "paley") -> torch.Tensor:
    """``x @ H_nᵀ`` (each vector ``v`` along the last dim mapped to ``H_n v``), or ``x @ H_n`` with
    ``transpose`` (``v ↦ H_nᵀ v``); ``n = x.shape[-1]``, any leading dims, any float dtype; ``H_n`` of ``rule``."""
    n = x.shape[-1]
    sizes = _factor_sizes(n, rule)
    if not sizes:
        return x.clone()
    y = x.reshape(-1, n)  # [R, n]
    rows, inner = y.shape[0], n  # y is viewed as [rows, f, inner] for the current factor
    for f, kind in sizes:
        mat = _factor(f, x.dtype, x.device, kind)  # [f, f]
        mat = mat.T if transpose else mat
        inner //= f
        y = y.reshape(rows, f) @ mat.T if inner == 1 else torch.matmul(mat, y.reshape(rows, f, inner))
        rows *= f
    return y.reshape(x.shape)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, rule: str = "paley") -> torch.Tensor:
    """The dense ``H_n [n, n]`` that ``hadamard_transform`` applies under ``rule`` (tests, small ``n``):
    ``H_p ⊗ B_m`` (``"paley"``), ``B_m ⊗ H_p`` (``"paley-outer"``) or ``C_o ⊗ H_p`` (``"hartley"``)."""
    p, m = hadamard_factors(n, rule)
    block = _BUILD[block_kind(rule)](m)
    return torch.kron(*((block, _sylvester(p)) if rule in OUTER_RULES else (_sylvester(p), block))).to(dtype)


def random_signs(n: int, seed: int, dtype: torch.dtype = torch.float32, count: int | None = None) -> torch.Tensor:
    """±1 ``[n]`` (or ``[count, n]``) from a generator seeded with ``seed`` (never the global RNG)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if count is None else (count, n)
    return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(dtype)


def _times_signs(t: torch.Tensor, s: torch.Tensor, dim: int, what: str) -> torch.Tensor:
    """``t`` scaled by the signs ``s [n]`` (or per expert ``[E, n]``, aligned with ``t``'s leading dim)
    along ``dim`` (-1 or -2)."""
    per_expert = s.dim() == 2
    bad_lead = per_expert and (t.dim() < 1 - dim or t.shape[0] != s.shape[0])
    if bad_lead or t.dim() < -dim or t.shape[dim] != s.shape[-1]:
        lead = " (per-expert signs need a leading expert dim, or pass expert=)" if per_expert else ""
        raise ValueError(f"{what} of shape {tuple(t.shape)} does not match signs {tuple(s.shape)} on dim {dim}{lead}")
    tail = [1] * (-dim - 1)
    if per_expert:
        s = s.reshape(s.shape[0], *[1] * (t.dim() - 1 + dim), s.shape[1], *tail)  # [E, 1.., n, (1)]
    else:
        s = s.reshape(s.shape[0], *tail)  # [n, (1)]
    return t * s.to(dtype=t.dtype, device=t.device)


def _left(a: torch.Tensor, transpose: bool = False, rule: str = "paley") -> torch.Tensor:
    """``H_N A`` (or ``H_Nᵀ A``) for ``a [..., N, K]``: the transform applied to the columns."""
    return hadamard_transform(a.transpose(-1, -2), transpose, rule).transpose(-1, -2)


@dataclass(eq=False)
class Incoherence:
    """The random signs of one tensor; the Hadamard parts are fixed by the sizes.

    ``sign_in``: ``S_U``, ±1 ``[K]`` (shared) or ``[E, K]`` (per expert). ``sign_out``: ``S_V``, ±1
    ``[N]`` or ``[E, N]``. Per-expert signs act on tensors whose leading dim is the expert, or on one
    expert's tensor when ``expert=`` names it; shared signs ignore ``expert``.
    """

    sign_in: torch.Tensor
    sign_out: torch.Tensor
    rule: str = "paley"  # the H_n of both sides (module docstring); what format rht v1 stored implicitly

    def __post_init__(self) -> None:
        check_rule(self.rule)
        if self.sign_in.dim() not in (1, 2) or self.sign_out.dim() not in (1, 2):
            raise ValueError(f"signs must be [n] or [E, n], got {tuple(self.sign_in.shape)} and "
                             f"{tuple(self.sign_out.shape)}")
        if self.sign_in.dim() == 2 == self.sign_out.dim() and self.sign_in.shape[0] != self.sign_out.shape[0]:
            raise ValueError(f"per-expert signs disagree on E: {tuple(self.sign_in.shape)} vs "
                             f"{tuple(self.sign_out.shape)}")

    @classmethod
    def make(cls, shape: tuple[int, ...], seed: int, per_expert: bool = False,
             rule: str = DEFAULT_RULE) -> "Incoherence":
        """Signs for a ``[N, K]`` or ``[E, N, K]`` weight from ``seed``: shared by the experts, or with
        ``per_expert`` one pair per expert (``[E, K]``, ``[E, N]``); the transforms of ``rule``."""
        if len(shape) not in (2, 3):
            raise ValueError(f"incoherence supports [N, K] or [E, N, K] weights, got {tuple(shape)}")
        *lead, n, k = shape
        count = lead[0] if lead and per_expert else None
        return cls(random_signs(k, seed, count=count), random_signs(n, seed + 1, count=count), rule)

    def select(self, e: int) -> "Incoherence":
        """The transform of expert ``e`` (shared signs: the same transform)."""
        return Incoherence(_pick(self.sign_in, e), _pick(self.sign_out, e), self.rule)

    def _at(self, expert: int | None) -> "Incoherence":
        return self if expert is None else self.select(expert)

    def weight(self, w: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """``W̃ = H_N S_V W S_U H_Kᵀ`` for ``w [..., N, K]``."""
        inc = self._at(expert)
        a = _times_signs(_times_signs(w, inc.sign_in, -1, "weight"), inc.sign_out, -2, "weight")  # S_V W S_U
        return _left(hadamard_transform(a, rule=self.rule), rule=self.rule)  # H_N (...) H_Kᵀ

    def weight_inverse(self, w_rot: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """``W = S_V H_Nᵀ W̃ H_K S_U`` for ``w_rot [..., N, K]``."""
        inc = self._at(expert)
        if (_fast is not None and w_rot.dim() >= 2 and inc.sign_in.shape == w_rot.shape[-1:]
                and inc.sign_out.shape == w_rot.shape[-2:-1]):
            # shared signs: the C++ transform where it applies (float32 CPU), forward and, when fine-tuning
            # differentiates it, backward; one path, so a trained weight is its checkpoint's dequantize bit for bit
            return _two_sided(w_rot, inc.sign_out, inc.sign_in, True, self.rule)
        a = hadamard_transform(_left(w_rot, True, self.rule), True, self.rule)  # H_Nᵀ W̃ H_K
        return _times_signs(_times_signs(a, inc.sign_in, -1, "rotated weight"), inc.sign_out, -2, "rotated weight")

    def hessian(self, h: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """``H̃ = H_K S_U H S_U H_Kᵀ`` for ``h [K, K]`` or ``[E, K, K]``, in ``h``'s dtype; a shared
        ``[K, K]`` under per-expert signs gives ``[E, K, K]``."""
        inc = self._at(expert)
        s = inc.sign_in
        if h.dim() not in (2, 3) or h.shape[-1] != h.shape[-2]:
            raise ValueError(f"hessian must be [K, K] or [E, K, K], got {tuple(h.shape)}")
        if s.dim() == 2 and h.dim() == 2:
            h = h.expand(s.shape[0], *h.shape)  # [E, K, K]
        a = _times_signs(_times_signs(h, s, -1, "hessian"), s, -2, "hessian")  # S_U H S_U
        return _left(hadamard_transform(a, rule=self.rule), rule=self.rule)  # H_K (...) H_Kᵀ

    def transform_input(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """``H_K S_U x`` for every ``x`` along the last dim of ``x [..., K]``. Float32 CPU activations with
        shared signs take one call of the C++ kernel (``kernels.hadamard``) where it is available."""
        s = self._at(expert).sign_in
        out = _apply_fast(x, s, None, False, self.rule)
        return hadamard_transform(_times_signs(x, s, -1, "input"), rule=self.rule) if out is None else out

    def restore_output(self, y: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """``S_V H_Nᵀ y`` for every ``y`` along the last dim of ``y [..., N]`` (the C++ kernel as above)."""
        s = self._at(expert).sign_out
        out = _apply_fast(y, None, s, True, self.rule)
        return _times_signs(hadamard_transform(y, True, self.rule), s, -1, "output") if out is None else out

    def to_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """``{prefix}sign_in`` / ``{prefix}sign_out`` as int8 ±1 tensors of the signs' shapes."""
        out = {}
        for name, s in (("sign_in", self.sign_in), ("sign_out", self.sign_out)):
            if not bool((s.abs() == 1).all()):
                raise ValueError(f"{name} {tuple(s.shape)} holds values other than ±1")
            out[prefix + name] = s.to(torch.int8)
        return out

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "",
                        dtype: torch.dtype = torch.float32, rule: str = "paley") -> "Incoherence":
        return cls(sd[prefix + "sign_in"].to(dtype), sd[prefix + "sign_out"].to(dtype), rule)

    def nbytes(self) -> int:
        """Bytes of ``to_state_dict`` (one int8 per sign)."""
        return self.sign_in.numel() + self.sign_out.numel()


def _pick(s: torch.Tensor, e: int) -> torch.Tensor:
    """Expert ``e``'s signs from ``[E, n]``; shared ``[n]`` signs as they are."""
    if s.dim() == 1:
        return s
    if not 0 <= e < s.shape[0]:
        raise ValueError(f"expert {e} out of range for per-expert signs {tuple(s.shape)}")
    return s[e]
