"""1-D lookup-table codecs (NF4, FP4) with blockwise absmax scaling, and double quantization of the scales.

Pure tensor math on ``w [..., N, K]``; blocks of ``block_size`` consecutive input columns share one absmax.
``w_hat = lut[code] * absmax``; each weight takes the code of the table value nearest to ``w / absmax``.

Tables (part of the format spec, never stored per tensor; code order is bitsandbytes'):
- ``nf4``: QLoRA's 4-bit NormalFloat, 16 values ascending, code 7 is exact zero;
- ``fp4``: bitsandbytes' e2m1 table ``{0, 0.0625, 2, 3, 4, 6, 8, 12}`` (bit 3 = sign) divided by 12, so
  the largest magnitude is 1. It has two zeros (+0 at code 0, -0 at code 8), hence 15 distinct values.

Double quantization (QLoRA): the scale matrix ``absmax [..., N, K/B]`` minus its mean per expert is cut
into blocks of ``dq_block`` consecutive scales in row-major order (the last block zero-padded), and each
block is quantized to *linear symmetric int8*: ``code = round(x / s) + 128`` with ``s = block_absmax / 127``
(codes 1..255; bitsandbytes' dynamic 8-bit map is not used).
"""

from __future__ import annotations

from types import MappingProxyType

import torch

_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_FP4_E2M1 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)  # codes 0..7; codes 8..15 are their negatives
_FP4 = tuple(v / 12.0 for v in _FP4_E2M1) + tuple(-v / 12.0 for v in _FP4_E2M1)

LUTS: MappingProxyType[str, tuple[float, ...]] = MappingProxyType({"nf4": _NF4, "fp4": _FP4})


def lut_values(name: str) -> torch.Tensor:
    """The 16-entry table ``name`` as fp32 ``[16]``, indexed by code."""
    if name not in LUTS:
        raise ValueError(f"unknown LUT {name!r} (choose from {sorted(LUTS)})")
    return torch.tensor(LUTS[name], dtype=torch.float32)


def _check_blocks(k: int, block_size: int) -> int:
    if block_size <= 0 or k % block_size:
        raise ValueError(f"block size {block_size} does not divide the input dim K={k}")
    return k // block_size


def block_absmax(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """w ``[..., N, K]`` -> fp32 ``[..., N, K/B]``: the largest magnitude of each block."""
    *lead, n, k = w.shape
    nb = _check_blocks(k, block_size)
    return w.detach().to(torch.float32).reshape(*lead, n, nb, block_size).abs().amax(-1)  # [..., N, K/B]


def lut_assign(w: torch.Tensor, lut: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """Nearest-value codes: w ``[..., N, K]``, lut ``[L]``, absmax ``[..., N, K/B]`` -> uint8 ``[..., N, K]``.

    Exact ties go to the smaller table value. A block with absmax 0 gets the code of the value nearest 0.
    """
    *lead, n, k = w.shape
    nb = _check_blocks(k, block_size)
    lut = lut.to(torch.float32).to(w.device)
    sorted_vals, perm = torch.sort(lut)  # [L], [L]
    mids = (sorted_vals[1:] + sorted_vals[:-1]) / 2  # [L-1]
    a = absmax.to(torch.float32).unsqueeze(-1)  # [..., N, K/B, 1]
    safe = torch.where(a > 0, a, torch.ones_like(a))
    x = w.detach().to(torch.float32).reshape(*lead, n, nb, block_size) / safe  # [..., N, K/B, B]
    idx = torch.bucketize(x.contiguous(), mids)  # [..., N, K/B, B] index into sorted_vals
    return perm[idx].to(torch.uint8).reshape(*lead, n, k)


def lut_quantize(w: torch.Tensor, lut: torch.Tensor, block_size: int,
                 scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """w ``[..., N, K]`` -> (codes uint8 ``[..., N, K]``, absmax fp32 ``[..., N, K/B]``).

    absmax is rounded to ``scale_dtype`` (the stored dtype) before codes are chosen, so decoding the
    stored values reproduces exactly what was optimised.
    """
    absmax = block_absmax(w, block_size).to(scale_dtype).to(torch.float32)  # [..., N, K/B]
    return lut_assign(w, lut, absmax, block_size), absmax


def lut_dequantize(codes: torch.Tensor, absmax: torch.Tensor, lut: torch.Tensor, block_size: int) -> torch.Tensor:
    """codes ``[..., N, K]``, absmax ``[..., N, K/B]``, lut ``[L]`` -> w_hat fp32 ``[..., N, K]``."""
    *lead, n, k = codes.shape
    nb = _check_blocks(k, block_size)
    vals = lut.to(torch.float32).to(codes.device)[codes.long()]  # [..., N, K]
    return (vals.reshape(*lead, n, nb, block_size) * absmax.to(torch.float32).unsqueeze(-1)).reshape(*lead, n, k)


def dq_num_blocks(num_scales: int, dq_block: int) -> int:
    """Double-quant blocks for ``num_scales`` scales per expert."""
    return -(-num_scales // dq_block)


def dq_quantize(absmax: torch.Tensor, dq_block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """absmax ``[..., N, NB]`` -> (codes uint8 ``[..., N, NB]``, scale fp32 ``[..., D]``, offset fp32 ``[..., 1]``)
    with ``D = ceil(N * NB / dq_block)`` blocks per expert (see the module docstring)."""
    if dq_block <= 0:
        raise ValueError(f"dq block size {dq_block} must be positive")
    *lead, n, nb = absmax.shape
    a = absmax.to(torch.float32).reshape(*lead, n * nb)  # [..., S]
    offset = a.mean(-1, keepdim=True)  # [..., 1]
    d = dq_num_blocks(n * nb, dq_block)
    x = torch.nn.functional.pad(a - offset, (0, d * dq_block - n * nb)).reshape(*lead, d, dq_block)  # [..., D, Bd]
    scale = x.abs().amax(-1) / 127  # [..., D]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)  # [..., D, 1]
    q = torch.clamp(torch.round(x / safe), -127, 127) + 128  # [..., D, Bd]
    codes = q.reshape(*lead, d * dq_block)[..., : n * nb].to(torch.uint8).reshape(*lead, n, nb)
    return codes, scale, offset


def dq_dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dq_block: int) -> torch.Tensor:
    """codes uint8 ``[..., N, NB]``, scale ``[..., D]``, offset ``[..., 1]`` -> absmax fp32 ``[..., N, NB]``."""
    *lead, n, nb = codes.shape
    d = scale.shape[-1]
    q = codes.to(torch.float32).reshape(*lead, n * nb) - 128  # [..., S]
    q = torch.nn.functional.pad(q, (0, d * dq_block - n * nb)).reshape(*lead, d, dq_block)  # [..., D, Bd]
    x = (q * scale.to(torch.float32).unsqueeze(-1)).reshape(*lead, d * dq_block)[..., : n * nb]  # [..., S]
    return (x + offset.to(torch.float32)).reshape(*lead, n, nb)
