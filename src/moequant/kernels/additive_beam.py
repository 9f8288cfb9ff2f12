"""The additive encoder's beam search in C++ (``csrc/additive_beam.cpp``, extension ``additive-beam``).

``fast_beam`` is what ``codecs.additive_search.beam_search`` calls first once this module is imported
(``formats.additive`` imports it): each row's beam in one task, rows in parallel, a row's hypotheses in cache,
where the torch loop runs a dozen batched ops per (group, codebook) step and copies every hypothesis's carried
``(w − ŵ)H`` row per step. Same search and formulas; the candidates' scores are summed in another order than the
torch loop's GEMM, so a near-tie can go the other way (``beam_search`` still keeps, per row, the start where it
is better). ``None`` where the kernel does not apply (``MOEQUANT_KERNELS=reference``, no extension, not float32 /
CPU, tracing); then the torch loop runs.
"""

from __future__ import annotations

import torch

from moequant.codecs.additive_search import set_beam_fast_path
from moequant.kernels import cpp_build
from moequant.kernels.select import use_fast

EXT_NAME = "additive-beam"
EXT_SOURCES = ["additive_beam.cpp"]
_SOURCES = tuple(EXT_SOURCES)


def extension():
    """The compiled beam search, or ``None`` (then the torch loop runs)."""
    return cpp_build.load_extension(EXT_NAME, EXT_SOURCES)


def fast_beam(eh: torch.Tensor, loss: torch.Tensor, h: torch.Tensor, cb: torch.Tensor, hj: torch.Tensor,
              q: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, beam: int) -> torch.Tensor | None:
    """Codes int64 ``[N, G, M]`` of ``codecs.additive_search._beam_rows`` over every row by the kernel, or None.
    eh ``[N, K]`` = (w − ŵ)H and loss ``[N]`` of the start codes ``[N, G, M]``; h ``[K, K]``, cb ``[M, C, g]``,
    hj ``[G, g, g]``, q ``[M, G, C]``, scale ``[N]``, all float32."""
    if not use_fast() or torch.compiler.is_compiling():
        return None
    tensors = (eh, loss, h, cb, hj, q, scale)
    if any(t.dtype != torch.float32 or not t.is_cpu for t in tensors):
        return None
    ext = None if cpp_build._disabled() else cpp_build._load(EXT_NAME, _SOURCES)
    if ext is None:
        return None
    return ext.additive_beam(*(t.contiguous() for t in tensors[:6]), codes.to(torch.int64).contiguous(),
                             scale.contiguous(), beam)


set_beam_fast_path(fast_beam)  # codecs.additive_search.beam_search tries the kernel first
