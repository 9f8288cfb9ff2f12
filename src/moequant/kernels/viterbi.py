"""The trellis encoder's Viterbi search in C++ (``csrc/viterbi.cpp``, extension ``viterbi``).

``fast_chunk(feats, table, L, kv, start_high, end_low)`` is what ``codecs.trellis.viterbi`` calls for each
chunk of tiles once this module is imported (``formats.trellis`` imports it): the extension, or ``None``
where it does not apply (``MOEQUANT_KERNELS=reference``, no extension, not float32 / CPU, autograd, tracing),
and then the torch loop ``codecs.trellis._viterbi_chunk`` runs.

Same search, same arithmetic: the emission cost of a state is computed as torch's CPU GEMM computed
``mm(feats[:, t], table)`` where this was written (the first product rounded, then one FMA per feature), a
state's cost is the same single float add of its emission and its best predecessor, and ties go to the
smallest predecessor index and the first minimal end state. So the states equal the torch loop's bit for bit
there (``tests/kernels/test_viterbi_kernel.py`` checks it on random tiles with and without the tail-biting
constraints, and on a packed matrix; on a BLAS that sums the 4 terms in another order the costs can differ
in the last bit, and the test then asks for the same walks almost everywhere). What it removes is the torch loop's dozen passes over the ``[b, 2^L]``
costs per step and their Python dispatch.
"""

from __future__ import annotations

import torch

from moequant.codecs.trellis import _EXCLUDED, set_viterbi_fast_path
from moequant.kernels import cpp_build

EXT_NAME = "viterbi"
EXT_SOURCES = ["viterbi.cpp"]
_SOURCES = tuple(EXT_SOURCES)
_NONE = torch.empty(0, dtype=torch.int64)


def extension():
    """The compiled ``viterbi`` kernel, or ``None`` (then the torch loop runs)."""
    return cpp_build.load_extension(EXT_NAME, EXT_SOURCES)


def fast_chunk(feats: torch.Tensor, table: torch.Tensor, L: int, kv: int, start_high: torch.Tensor | None,
               end_low: torch.Tensor | None) -> torch.Tensor | None:
    """States int64 ``[b, S]`` of ``codecs.trellis._viterbi_chunk``'s search by the C++ kernel, or ``None``.
    ``feats [b, S, F]`` and ``table [F, 2^L]`` float32 CPU."""
    if torch.is_grad_enabled() and (feats.requires_grad or table.requires_grad):
        return None
    ext = cpp_build.float32_cpu_extension(EXT_NAME, _SOURCES, feats, table)
    if ext is None:
        return None
    ends = (_NONE if start_high is None else start_high.to(torch.int64),
            _NONE if end_low is None else end_low.to(torch.int64), _EXCLUDED)
    values = half_values(table)
    if values is not None:
        return ext.viterbi_chunk_half(feats.contiguous(), values, L, kv, *ends)
    return ext.viterbi_chunk(feats.contiguous(), table.contiguous(), L, kv, *ends)


def half_values(table: torch.Tensor) -> torch.Tensor | None:
    """``values [V, 2^L]`` float16 when ``table [2V, 2^L]`` is ``[values²; values]`` (as ``codecs.trellis.viterbi``
    builds it) with float16-exact values, e.g. a HYB code's LUT; else None. The kernel then reads 2V bytes per
    state instead of 4·2V and forms the squares itself, with the same float32 rounding (same costs, same walks)."""
    f = table.shape[0]
    if f % 2:
        return None
    vals = table[f // 2:]  # [V, 2^L]
    half = vals.to(torch.float16)
    if not torch.equal(half.to(torch.float32), vals) or not torch.equal(vals.square(), table[:f // 2]):
        return None
    return half.contiguous()


set_viterbi_fast_path(fast_chunk)  # codecs.trellis.viterbi tries the kernel first
