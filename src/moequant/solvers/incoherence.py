"""Incoherence processing: a random Hadamard transform (RHT) on both sides of a weight matrix.

With ``H_n`` an orthonormal ``n × n`` Hadamard-type matrix and ``S_U``, ``S_V`` diagonal random ±1
matrices, a weight ``W [N, K]`` is quantized as ``W̃ = H_N S_V W S_U H_Kᵀ`` under the Hessian
``H̃ = H_K S_U H S_U H_Kᵀ``. Orthogonality keeps the layer's error ``tr(Δ H Δᵀ)`` unchanged, while
the rotation spreads outliers over every entry so that ``W̃`` looks i.i.d. Gaussian (QuIP#'s
incoherence). At run time ``y = W x = S_V H_Nᵀ W̃ (H_K S_U x)``.

**Any dimension** ``n = p · m`` with ``p`` a power of two: ``H_n = H_p ⊗ B_m`` where ``H_p`` is the
Sylvester–Hadamard matrix applied by a fast Walsh–Hadamard transform (``O(n log n)``, no ``n × n``
matrix) and ``B_m`` a small orthonormal block. The rule for ``B_m``: let ``o`` be the odd part of
``n``; if ``o = 1`` there is no block. Otherwise the smallest ``m = o · 2^j`` (``j ≥ 1``, ``m | n``)
for which a Paley construction gives a true Hadamard matrix is used — Paley I when ``m - 1`` is a
prime ``≡ 3 (mod 4)``, Paley II when ``m / 2 - 1`` is a prime ``≡ 1 (mod 4)`` — so every entry of
``H_n`` has magnitude ``1/√n`` (576 = 16·36, 768 = 64·12, 896 = 32·28, 1536 = 128·12,
3072 = 256·12, 4864 = 64·76). If none exists (e.g. an odd ``n`` such as 7), ``B_o`` is a random
orthogonal matrix from a fixed seed (QR of a Gaussian) — orthonormal, only "incoherent" on average.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(j - i)`` with ``χ`` the quadratic character mod the prime ``q``."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]  # [q, q]


def _paley(m: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order ``m`` by Paley I or II, or None."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        q = m - 1
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        h = torch.eye(m, dtype=torch.float64) + s
    elif m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        q = m // 2 - 1
        s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, 1, _jacobsthal(q)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        h = torch.kron(s, one) + torch.kron((s == 0).to(torch.float64), zero)
    else:
        return None
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64)), f"Paley construction failed for {m}"
    return h


def hadamard_factors(n: int) -> tuple[int, int]:
    """``(p, m)`` with ``p · m = n``, ``p`` a power of two and ``m`` the block order (see the module rule)."""
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


@functools.lru_cache(maxsize=64)
def _block(m: int) -> torch.Tensor:
    """The orthonormal ``m × m`` block ``B_m`` (float64). Cached: a pure function of ``m``."""
    h = _paley(m)
    if h is not None:
        return h / math.sqrt(m)
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(m)
    q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


# The power-of-two transform is applied as a Kronecker product of dense Sylvester blocks of at most
# 2^_FACTOR_BITS: H_{2^k} = H_{2^a} ⊗ H_{2^b} ⊗ ..., one small matmul per factor along its own axis
# (cost n·Σ 2^a_i per vector instead of n², and BLAS-fast unlike butterfly passes in torch).
_FACTOR_BITS = 6


@functools.lru_cache(maxsize=32)
def _sylvester(p: int) -> torch.Tensor:
    """Orthonormal Sylvester–Hadamard matrix of order ``p`` (a power of two), float64. Cached."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(p)


def _fwht(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Orthonormal Sylvester–Walsh–Hadamard transform along ``dim`` (a power-of-two length)."""
    x = x.movedim(dim, -1)
    p = x.shape[-1]
    lead = x.shape[:-1]
    k = p.bit_length() - 1
    sizes = [1 << min(_FACTOR_BITS, k - i) for i in range(0, k, _FACTOR_BITS)]  # high bits first
    y = x.reshape(*lead, *sizes)
    nf = len(sizes)
    for i, f in enumerate(sizes):
        h = _sylvester(f).to(dtype=x.dtype, device=x.device)  # symmetric
        axis = len(lead) + i
        y = (y.movedim(axis, -1) @ h).movedim(-1, axis) if i < nf - 1 else y @ h
    return y.reshape(*lead, p).movedim(-1, dim)


def hadamard_transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x @ H_nᵀ`` (every vector along the last dim mapped to ``H_n v``), or ``x @ H_n`` with
    ``transpose`` (``v ↦ H_nᵀ v``). ``n = x.shape[-1]``; any leading dims; float32 or float64."""
    n = x.shape[-1]
    p, m = hadamard_factors(n)
    y = x.reshape(*x.shape[:-1], p, m)  # v as a [p, m] matrix X: H_n v = H_p X B_mᵀ
    if m > 1:
        b = _block(m).to(x.dtype).to(x.device)
        y = y @ (b if transpose else b.T)
    if p > 1:
        y = _fwht(y, dim=-2)
    return y.reshape(x.shape)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense ``H_n`` that ``hadamard_transform`` applies (for tests and small ``n``)."""
    return hadamard_transform(torch.eye(n, dtype=torch.float64)).T.contiguous().to(dtype)


def random_signs(n: int, seed: int, dtype: torch.dtype = torch.float32, count: int | None = None) -> torch.Tensor:
    """±1 ``[n]`` (or ``[count, n]``) from a generator seeded with ``seed`` (never the global RNG)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if count is None else (count, n)
    return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(dtype)


def _left(a: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``H_N A`` (or ``H_Nᵀ A``) for ``a [..., N, K]``: transform the columns."""
    return hadamard_transform(a.transpose(-1, -2), transpose).transpose(-1, -2)


@dataclass
class Incoherence:
    """Sign vectors of one tensor: ``sign_in`` ``[K]`` or ``[E, K]`` (``S_U``), ``sign_out`` ``[N]`` or
    ``[E, N]`` (``S_V``), float ±1. The Hadamard parts are fixed by the sizes."""

    sign_in: torch.Tensor
    sign_out: torch.Tensor

    @classmethod
    def make(cls, shape: tuple[int, ...], seed: int) -> "Incoherence":
        """Signs for a ``[N, K]`` or ``[E, N, K]`` weight; each expert gets its own, all from ``seed``."""
        *lead, n, k = shape
        count = lead[0] if lead else None
        if len(lead) > 1:
            raise ValueError(f"incoherence supports [N, K] or [E, N, K] weights, got {tuple(shape)}")
        return cls(random_signs(k, seed, count=count), random_signs(n, seed + 1, count=count))

    def _check(self, w: torch.Tensor) -> None:
        if w.shape[-1] != self.sign_in.shape[-1] or w.shape[-2] != self.sign_out.shape[-1]:
            raise ValueError(f"weight {tuple(w.shape)} does not match signs {tuple(self.sign_out.shape)} x "
                             f"{tuple(self.sign_in.shape)}")

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """``W̃ = H_N S_V W S_U H_Kᵀ`` for ``w [..., N, K]``."""
        self._check(w)
        a = hadamard_transform(w * self.sign_in.to(w.dtype).unsqueeze(-2))  # W S_U H_Kᵀ
        return _left(a * self.sign_out.to(w.dtype).unsqueeze(-1))  # H_N S_V (...)

    def weight_inverse(self, w_rot: torch.Tensor) -> torch.Tensor:
        """``W = S_V H_Nᵀ W̃ H_K S_U``."""
        self._check(w_rot)
        a = _left(w_rot, transpose=True) * self.sign_out.to(w_rot.dtype).unsqueeze(-1)  # S_V H_Nᵀ W̃
        return hadamard_transform(a, transpose=True) * self.sign_in.to(w_rot.dtype).unsqueeze(-2)  # (...) H_K S_U

    def hessian(self, h: torch.Tensor) -> torch.Tensor:
        """``H̃ = H_K S_U H S_U H_Kᵀ`` for ``h [K, K]`` or ``[E, K, K]`` (float64 stays float64)."""
        s = self.sign_in.to(h.dtype)
        a = h * s.unsqueeze(-1) * s.unsqueeze(-2)  # S_U H S_U
        return _left(hadamard_transform(a))  # H_K (...) H_Kᵀ

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``H_K S_U x`` along the last dim of ``x [..., K]`` (2-D tensors' signs)."""
        return hadamard_transform(x * self.sign_in.to(x.dtype))

    def restore_output(self, y: torch.Tensor) -> torch.Tensor:
        """``S_V H_Nᵀ y`` along the last dim of ``y [..., N]``."""
        return hadamard_transform(y, transpose=True) * self.sign_out.to(y.dtype)
