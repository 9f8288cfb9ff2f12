"""4-bit uniform tensors through torch's own CPU kernel ``aten._weight_int4pack_mm_for_cpu``.

The kernel computes ``y = x Ŵᵀ`` with ``Ŵ[n, k] = (q[n, k] − 8) · s[g, n] + m[g, n]`` from codes
repacked by ``aten._convert_weight_to_int4pack_for_cpu`` (its own interleaved layout, 4 bits a code)
and ``scales_and_zeros [G', N, 2]``. Our stored format stays as it is; the repack is done once per
tensor, on first use, and kept on the instance (``runtime_cache``), not in ``data``: it is not saved.

Mapping our grids to its form (``w = (q − z) · s`` in every case):
``m = (8 − z) · s`` with ``z`` the integer zero point (asymmetric), ``8`` (symmetric midtread, so
``m = 0``) or ``7.5`` (v1 midrise, ``m = s / 2``).

Its constraints, measured on torch 2.13 (CPU): group size one of 32/64/128/256, ``K`` a multiple of
it, ``N`` a multiple of 16. We meet them without changing any weight: a group size that is a
multiple of an allowed one is split into sub-groups sharing its scale; ``K`` is padded with zero codes
to whole groups (the partial last group keeps its own scale; the padded activations are zero, so the
padding adds nothing) and ``N`` with zero rows that are sliced off. Group sizes with no allowed
divisor (e.g. 48) take the next path (``None`` is returned).

Arithmetic: the fast path runs in bfloat16 (activations, scales and zeros; fp32 accumulation inside
the kernel). Its outputs differ from the fp32 reference decode + matmul by ~0.2–0.3% relative (bf16 has
8 mantissa bits); float32 activations are supported by the kernel but ran ~20× slower here, so they are
not used. The perplexity difference this makes is measured in BENCHMARKS.md (issue #10).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from moequant.codecs.uniform import num_groups
from moequant.formats.base import QuantizedTensor
from moequant.formats.bitpack import unpack

log = logging.getLogger(__name__)

ALLOWED_GROUPS = (256, 128, 64, 32)
CACHE_KEY = "int4pack"


def kernel_group(group: int) -> int | None:
    """The largest group size the kernel accepts that divides ``group`` (``None`` if none does)."""
    return next((g for g in ALLOWED_GROUPS if group % g == 0), None)


def plan(k: int, group_size: int) -> tuple[int, int, int] | None:
    """``(stored group, padded K, kernel group)`` for a row of ``k`` codes, or ``None``."""
    if group_size == -1:
        k_pad = -(-k // 32) * 32
        stored = k_pad  # one group: the whole (padded) row
    else:
        stored = group_size
        k_pad = num_groups(k, group_size) * group_size
    g = kernel_group(stored)
    return None if g is None else (stored, k_pad, g)


def zero_points(qt: QuantizedTensor) -> torch.Tensor:
    """``z [N, G]`` float32 of a 2-D uniform tensor, in ``w = (q − z) · s``."""
    n, k = qt.shape
    bits, gs = qt.attrs["bits"], qt.attrs["group_size"]
    g = 1 if gs == -1 else num_groups(k, gs)
    if "zero" in qt.data:
        return unpack(qt.data["zero"], bits, g).to(torch.float32)  # [N, G]
    mid = 2 ** (bits - 1) if qt.attrs.get("grid", "midtread") == "midtread" else (2**bits - 1) / 2
    return torch.full((n, g), float(mid))


def repack(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    """``(packed weight, scales_and_zeros bf16 [K_pad/g, N_pad, 2], K_pad, g)`` or ``None`` when the
    tensor's geometry does not fit the kernel."""
    n, k = qt.shape
    p = plan(k, qt.attrs["group_size"])
    if p is None:
        return None
    stored, k_pad, g = p
    n_pad = -(-n // 16) * 16
    codes = unpack(qt.data["codes"], 4, k).to(torch.int32)  # [N, K]
    codes = F.pad(codes, (0, k_pad - k, 0, n_pad - n))  # [N_pad, K_pad], zero codes in the padding
    scale = qt.data["scale"].to(torch.float32)  # [N, G]
    offset = (8.0 - zero_points(qt)) * scale  # [N, G]: m = (8 − z)·s
    reps = stored // g
    scale = F.pad(scale, (0, 0, 0, n_pad - n)).repeat_interleave(reps, dim=1)  # [N_pad, K_pad/g]
    offset = F.pad(offset, (0, 0, 0, n_pad - n)).repeat_interleave(reps, dim=1)  # [N_pad, K_pad/g]
    sz = torch.stack([scale.T, offset.T], dim=-1).to(torch.bfloat16).contiguous()  # [K_pad/g, N_pad, 2]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)  # [N_pad, K_pad/2] uint8
    return packed, sz, k_pad, g


def applies(qt: QuantizedTensor, x: torch.Tensor) -> bool:
    return (len(qt.shape) == 2 and qt.attrs.get("bits") == 4 and x.device.type == "cpu" and qt.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and plan(qt.shape[1], qt.attrs["group_size"]) is not None)


def runtime_cache(qt: QuantizedTensor) -> dict:
    cache = qt.__dict__.get("_runtime")
    if cache is None:
        cache = qt.__dict__["_runtime"] = {}
    return cache


def linear(qt: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x [..., K] → x Ŵᵀ + b [..., N]`` in ``x.dtype`` through the int4pack kernel, or ``None`` where
    the kernel does not apply (not 4-bit, not CPU, a group size it cannot express)."""
    if not applies(qt, x):
        return None
    cache = runtime_cache(qt)
    if CACHE_KEY not in cache:
        cache[CACHE_KEY] = repack(qt)
    packed, sz, k_pad, g = cache[CACHE_KEY]
    n, k = qt.shape
    lead = x.shape[:-1]
    xb = x.reshape(-1, k).to(torch.bfloat16)  # [M, K]
    if k_pad != k:
        xb = F.pad(xb, (0, k_pad - k))  # [M, K_pad]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, g, sz)  # [M, N_pad] bf16
    y = y[:, :n].to(x.dtype).reshape(*lead, n)
    return y if bias is None else y + bias.to(y.dtype)


def runtime_nbytes(qt: QuantizedTensor) -> int:
    """Bytes of the repacked copy held for ``qt`` (0 before first use)."""
    entry = qt.__dict__.get("_runtime", {}).get(CACHE_KEY)
    if not entry:
        return 0
    return entry[0].numel() * entry[0].element_size() + entry[1].numel() * entry[1].element_size()
