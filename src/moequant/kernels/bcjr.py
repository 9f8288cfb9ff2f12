"""BCJR-QAT's soft trellis in C++ (``csrc/bcjr.cpp``, extension ``bcjr``): the whole pass (``soft``), its two
recursions on their own (``alpha_beta``, ``expectations``; the chunked torch path's loops), and the sub-trellis
Viterbi of the reference refresh (``hard_path``).

``finetune.bcjr`` runs two step-by-step recursions per chunk of tiles: the log-space forward–backward (``α``, ``β``
and the forward's ``logsumexp``) and, in the backward pass, the expectations ``E[Σ_{u≤t} c_u | σ_t]`` and
``E[Σ_{u>t} c_u | σ_t]``. In torch each is a Python loop of a few small ops per step (128 steps per tile at 2 bits);
the kernel walks each tile's steps in one call, tiles in parallel, with the transition weights made on the fly.
``alpha_beta`` and ``expectations`` return ``None`` where the kernel does not apply (``MOEQUANT_KERNELS=reference``,
no extension, not float32 / CPU, tracing); then the torch loops run. The arithmetic is the torch path's (the
same floored exponents, sums in the same order) with another ``exp`` (a vectorised polynomial within ~2 ulp),
so results agree to float rounding (``tests/kernels/test_bcjr_kernel.py``), not bit for bit. The fused ``soft`` also
floors the posterior's exponents at −87, so a state the torch softmax gives exactly 0 gets ~1e-38 of the mass.
``hard_path`` (no ``exp``) is exact: its branch scores are computed as the torch path computes them (the same fused
multiply-adds as torch's vectorised ``addcmul``) and its ties go the same way, so it returns the same walks.
"""

from __future__ import annotations

import torch

from moequant.kernels import cpp_build

EXT_NAME = "bcjr"
EXT_SOURCES = ["bcjr.cpp"]
_SOURCES = tuple(EXT_SOURCES)
_NONE = torch.empty(0, dtype=torch.int64)
_FNONE = torch.empty(0, dtype=torch.float32)


def extension():
    """The compiled ``bcjr`` kernels, or ``None`` (then the torch loops run)."""
    return cpp_build.load_extension(EXT_NAME, EXT_SOURCES)


def _ext(*tensors: torch.Tensor):
    return cpp_build.float32_cpu_extension(EXT_NAME, _SOURCES, *tensors)


def alpha_beta(scores: torch.Tensor, f: int, overlap: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``finetune.bcjr._forward_backward`` of ``scores [S, b, n]`` by the kernel: (``α``, ``β`` ``[S, b, n]``, the
    forward's lse ``[S, b, n / 2^f]``), or ``None``."""
    ext = _ext(scores)
    if ext is None:
        return None
    ov = _NONE if overlap is None else overlap.to(torch.int64).contiguous()
    alpha, beta, lse = ext.bcjr_alpha_beta(scores.contiguous(), f, ov)
    return alpha, beta, lse


def expectations(c: torch.Tensor, scores: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, lse: torch.Tensor,
                 f: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The forward and backward expectation recursions of ``finetune.bcjr._chunk_grads`` (each ``[S, b, n]``) by
    the kernel, or ``None``."""
    ext = _ext(c, scores, alpha, beta, lse)
    if ext is None:
        return None
    fwd, bwd = ext.bcjr_expectations(c.contiguous(), scores.contiguous(), alpha.contiguous(), beta.contiguous(),
                                     lse.contiguous(), f)
    return fwd, bwd


def _opt(t: torch.Tensor | None) -> torch.Tensor:
    """An optional index tensor as the extension takes it: int64, contiguous, or empty for None."""
    return _NONE if t is None else t.to(torch.int64).contiguous()


MAX_STATES = 4096  # sub-trellis states per step the fused pass takes (its per-thread scratch is ~36·S·n bytes)


def soft(x: torch.Tensor, cols: torch.Tensor, ref: torch.Tensor | None, dep: torch.Tensor, keep: int,
         group: torch.Tensor | None, L: int, f: int, tau: float, overlap: torch.Tensor | None,
         grad: torch.Tensor | None = None) -> list[torch.Tensor] | None:
    """``finetune.bcjr``'s whole soft pass of the tiles ``x [B, S, V]`` in one call, each tile in cache: ``[y]``, or
    with ``grad`` ``[∂x, table terms [1+V, T]]`` (see ``csrc/bcjr.cpp``); ``None`` where it does not apply (then
    the chunked torch path runs): not float32 / CPU, more than ``MAX_STATES`` states, more than 8 values per
    step (V), or ``MOEQUANT_KERNELS``."""
    if dep.shape[0] > MAX_STATES or x.shape[-1] > 8:
        return None
    ext = _ext(x, cols, *(() if grad is None else (grad,)))
    if ext is None:
        return None

    return ext.bcjr_soft(x.contiguous(), cols.contiguous(), _opt(ref), dep.to(torch.int64).contiguous(), int(keep),
                         _opt(group), L, f, float(tau), _opt(overlap), _FNONE if grad is None else grad.contiguous())


def hard_path(x: torch.Tensor, cols: torch.Tensor, ref: torch.Tensor | None, dep: torch.Tensor, keep: int,
              group: torch.Tensor | None, L: int, f: int, overlap: torch.Tensor | None) -> torch.Tensor | None:
    """``finetune.bcjr.hard_path`` of the tiles ``x [B, S, V]`` in one call, each tile in cache: the stored-code
    states of the best walks int64 ``[B, S]``; ``None`` where it does not apply (as ``soft``)."""
    if dep.shape[0] > MAX_STATES or x.shape[-1] > 8:
        return None
    ext = _ext(x, cols)
    if ext is None:
        return None

    return ext.bcjr_hard_path(x.contiguous(), cols.contiguous(), _opt(ref), dep.to(torch.int64).contiguous(),
                              int(keep), _opt(group), L, f, _opt(overlap))
