"""The additive encoder's two inner loops in C++ (``csrc/additive_encode.cpp``, extension ``additive-encode``).

- ``fast_assign``: what ``codecs.additive.assign`` (the nearest codeword under each point's block metric: k-means,
  OA-EM's E-steps, PV-tuning's V-steps) calls first. Scored 8 codewords at a time with a running minimum: no
  ``[P, C]`` score table, no chunks.
- ``fast_beam``: what ``codecs.additive_search.beam_search`` calls first: each row's beam in one task, rows in
  parallel, a row's hypotheses in cache, where the torch loop runs a dozen batched ops per (group, codebook) step
  and copies every hypothesis's carried ``(w − ŵ)H`` row per step.

Both are installed on import (``formats.additive`` imports this module) and return ``None`` where they do not apply
(``MOEQUANT_KERNELS=reference``, no extension, not float32 / CPU, tracing); then the torch code runs. Same formulas;
scores are summed in another order than the torch paths' GEMMs, so a near-tie can go the other way
(``beam_search`` still keeps, per row, the start where it is better).
"""

from __future__ import annotations

import torch

from moequant.codecs.additive import reconstruct, set_assign_fast_path
from moequant.codecs.additive_search import set_beam_fast_path
from moequant.kernels import cpp_build

EXT_NAME = "additive-encode"
EXT_SOURCES = ["additive_encode.cpp"]
_SOURCES = tuple(EXT_SOURCES)


def extension():
    """The compiled kernels, or ``None`` (then the torch code runs)."""
    return cpp_build.load_extension(EXT_NAME, EXT_SOURCES)


def _ext(*tensors: torch.Tensor):
    return cpp_build.float32_cpu_extension(EXT_NAME, _SOURCES, *tensors)


def fast_assign(target: torch.Tensor, blocks: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor | None:
    """``codecs.additive.assign`` by the kernel: target ``[B, P, g]``, blocks ``[B, g, g]``, codebook ``[C, g]``, all
    float32 -> codes int64 ``[B, P]``; or None."""
    ext = _ext(target, blocks, codebook)
    if ext is None:
        return None
    return ext.additive_assign(target.contiguous(), blocks.contiguous(), codebook.contiguous())


def fast_beam(w: torch.Tensor, h: torch.Tensor, cb: torch.Tensor, hj: torch.Tensor, q: torch.Tensor,
              codes: torch.Tensor, scale: torch.Tensor, beam: int) -> torch.Tensor | None:
    """Codes int64 ``[N, G, M]`` of ``codecs.additive_search._beam_rows`` over every row by the kernel, or None
    (before any work). w ``[N, K]``, h ``[K, K]``, cb ``[M, C, g]``, hj ``[G, g, g]``, q ``[M, G, C]``, scale ``[N]``
    float32; codes ``[N, G, M]`` the start."""
    ext = _ext(w, h, cb, hj, q, scale)
    if ext is None:
        return None
    err = w - reconstruct(codes[None], cb, scale[None])[0]  # [N, K]
    eh = err @ h  # [N, K]: the start's (w − ŵ)H, carried along each hypothesis
    return beam_kernel(ext, eh, (err * eh).sum(-1), h, cb, hj, q, codes, scale, beam)


def beam_kernel(ext, eh: torch.Tensor, loss: torch.Tensor, h: torch.Tensor, cb: torch.Tensor, hj: torch.Tensor,
                q: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, beam: int) -> torch.Tensor:
    """The C++ call itself: eh ``[N, K]`` = (w − ŵ)H and loss ``[N]`` of the start codes; the rest as ``fast_beam``."""
    return ext.additive_beam(*(t.contiguous() for t in (eh, loss, h, cb, hj, q)), codes.to(torch.int64).contiguous(),
                             scale.contiguous(), beam)


set_assign_fast_path(fast_assign)  # codecs.additive.assign tries the kernel first
set_beam_fast_path(fast_beam)  # codecs.additive_search.beam_search tries the kernel first
