"""Uniform integer grids with one scale (and zero point) per group of consecutive input columns.

Pure tensor math on ``w [..., N, K]`` (leading dims are experts; groups run along ``K``):

- symmetric, midtread (the default symmetric grid since format v2): ``w_hat = (q - 2^(b-1)) * s`` with
  ``q in [0, 2^b - 1]`` and ``s = shrink * 2 * absmax / (2^b - 1)`` (GPTQ's rule): zero is a level of
  the grid, the levels run from ``-2^(b-1) s`` to ``(2^(b-1) - 1) s``, so the group's negative extreme
  is covered and its positive one clips by ``s / 2`` at most. No zero point is stored.
- symmetric, midrise (format v1 only, decode only): ``w_hat = (q - h) * s`` with ``h = (2^b - 1) / 2``;
  there is no zero level, and on SmolLM2 it collapsed int3/int4 models although its weight MSE was
  only ~1.4x the asymmetric grid's, so new checkpoints never use it.
- asymmetric: ``w_hat = (q - z) * s`` with an integer zero point ``z in [0, 2^b - 1]``. The range is
  first widened to contain 0 (``lo = min(min, 0)``, ``hi = max(max, 0)``, as GPTQ does, so a group of
  one sign still gets a zero point on the grid) and a clip candidate shrinks it towards zero:
  ``s = shrink * (hi - lo) / (2^b - 1)``, ``z = clamp(round(-shrink * lo / s), 0, 2^b - 1)``. Shrinking
  around the range's centre instead measured the same on a Gaussian 256x512, group 128, 16 steps in
  [0.65, 1] (2/3/4 bits: 8.51/14.55/20.41 dB centred vs 8.51/14.57/20.41 dB towards zero), so the
  simpler rule is kept.

Groups: ``G = ceil(K / group_size)`` groups per row; when ``group_size`` does not divide ``K`` the last
group is partial (``K - (G - 1) * group_size`` columns) and still has its own scale (and zero point),
counted in full by the formats' bits per weight. Internally rows are padded with zeros to ``G *
group_size`` columns; a zero is exactly representable on both grids and carries no weight in the clip
search, so padding changes no scale, code or error.

MSE clip search: per group, ``steps`` shrink factors evenly spaced in ``[clip_min, 1]`` are tried and the
one with the least (optionally ``hdiag``-weighted) squared error is kept. The scale is rounded to the
stored scale dtype *before* codes are chosen, so decoding from the stored values reproduces exactly the
reconstruction the search scored.
"""

from __future__ import annotations

import torch

from moequant.errors import UnrepresentableError

# Stored scale dtypes by config name.
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# Rows per chunk are chosen so one [rows, K] fp32 temporary stays under this many elements (16 MiB);
# the search holds about eight of them at once.
_CHUNK_ELEMS = 1 << 22


# Symmetric grids by name: "midtread" (zero level, format v2) and "midrise" (format v1, decode only).
GRIDS = ("midtread", "midrise")


def resolve_group_size(k: int, group_size: int) -> int:
    """``group_size`` (``-1`` = whole row) -> the effective group size (at most ``K``; it need not divide ``K``)."""
    if group_size == -1:
        return k
    if group_size <= 0:
        raise ValueError(f"group size {group_size} must be positive or -1 (whole row)")
    return min(group_size, k) if k else group_size


def num_groups(k: int, group_size: int) -> int:
    """Groups per row of ``K`` columns: ``ceil(K / gs)`` (the last one partial when ``gs`` does not divide ``K``)."""
    gs = resolve_group_size(k, group_size)
    return -(-k // gs) if k else 0


def _pad_cols(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dim of ``t`` to ``width`` columns (no copy when it already has them)."""
    extra = width - t.shape[-1]
    return t if extra == 0 else torch.nn.functional.pad(t, (0, extra))


def smallest_positive(dtype: torch.dtype) -> float:
    """The smallest positive (subnormal) value of a float dtype, used for the scale of all-zero groups."""
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps


def shrink_factors(clip_search: bool, clip_steps: int, clip_min: float) -> list[float]:
    """Shrink candidates, ``1.0`` first (ties keep the unclipped range)."""
    if not clip_search or clip_steps <= 1:
        return [1.0]
    return torch.linspace(1.0, clip_min, clip_steps, dtype=torch.float64).tolist()


def _round_scale(s: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round to the stored dtype and back to fp32; zero (or underflowed) scales become the smallest positive.
    A scale the dtype cannot hold (finite weights whose range overflows it, e.g. 1e30 in float16) is a
    ``ValueError`` (``UnrepresentableError``): stored it would be inf and decode to NaN."""
    r = s.to(scale_dtype).to(torch.float32)
    if not bool(torch.isfinite(r).all()):
        big = float(s[~torch.isfinite(r)].abs().max())
        dtype_name = str(scale_dtype).replace("torch.", "")
        raise UnrepresentableError(f"a group scale of {big:.3g} overflows the {dtype_name} scale dtype "
                         f"(max {torch.finfo(scale_dtype).max:.3g}): the weights are out of range for it; "
                         f"use --scale-dtype float32 (or bfloat16)")
    return torch.where(r > 0, r, torch.full_like(r, smallest_positive(scale_dtype)))


def subnormal_scales(scale: torch.Tensor, scale_dtype: torch.dtype) -> int:
    """How many stored scales lie below ``scale_dtype``'s normal range in magnitude (they keep fewer significant
    bits: the group's values are tiny, its absolute error stays below the dtype's smallest normal times 2^b).
    A zero scale (an all-zero group, stored exactly) is not counted; a negative one (exact Q4_0 / Q5_0 tables)
    is counted by its magnitude."""
    mag = scale.to(torch.float32).abs()
    return int(((mag > 0) & (mag < torch.finfo(scale_dtype).tiny)).sum())


def _grid(wg: torch.Tensor, shrink: float, bits: int, symmetric: bool, scale_dtype: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """wg ``[R, G, g]`` -> (codes float ``[R, G, g]``, scale ``[R, G, 1]``, zero float ``[R, G, 1]`` or None).
    The symmetric grid is midtread."""
    qmax = (1 << bits) - 1
    if symmetric:
        s = _round_scale(shrink * 2.0 * wg.abs().amax(-1, keepdim=True) / qmax, scale_dtype)  # [R, G, 1]
        return round_to_grid(wg, s, None, bits), s, None  # [R, G, g]
    lo = wg.amin(-1, keepdim=True).clamp(max=0)  # [R, G, 1]
    hi = wg.amax(-1, keepdim=True).clamp(min=0)  # [R, G, 1]
    s = _round_scale(shrink * (hi - lo) / qmax, scale_dtype)  # [R, G, 1]
    z = torch.clamp(torch.round(-shrink * lo / s), 0, qmax)  # [R, G, 1]
    return round_to_grid(wg, s, z, bits), s, z  # [R, G, g]


def round_to_grid(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Nearest grid codes (float) for ``w`` given a broadcastable scale ``s`` and zero ``z`` (None = the
    symmetric midtread grid, zero at ``2^(b-1)``)."""
    qmax = (1 << bits) - 1
    return torch.clamp(torch.round(w / s + (float(1 << (bits - 1)) if z is None else z)), 0, qmax)


def decode_grid(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int, grid: str = "midtread"
                ) -> torch.Tensor:
    """Codes ``q`` -> values ``(q - z) * s``; symmetric (``z`` None): ``(q - 2^(b-1)) * s`` (midtread) or
    ``(q - (2^b - 1) / 2) * s`` (midrise, format v1)."""
    if z is not None:
        return (q - z) * s
    if grid == "midtread":
        return (q - float(1 << (bits - 1))) * s
    if grid == "midrise":
        return (q - ((1 << bits) - 1) / 2) * s
    raise ValueError(f"unknown symmetric grid {grid!r} (known: {GRIDS})")


def fit_groups(wg: torch.Tensor, hg: torch.Tensor | None, bits: int, symmetric: bool,
                   shrinks: list[float], scale_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Clip search on rows of groups: wg ``[R, G, g]`` (``hg`` same shape or None) -> best codes ``[R, G, g]``,
    scale ``[R, G, 1]``, zero ``[R, G, 1]`` (None when symmetric); codes and zero are float."""
    best_q, best_s, best_z = _grid(wg, shrinks[0], bits, symmetric, scale_dtype)
    if len(shrinks) == 1:
        return best_q, best_s, best_z
    d = wg - decode_grid(best_q, best_s, best_z, bits)
    best_err = (d * d if hg is None else hg * d * d).sum(-1, keepdim=True)  # [R, G, 1]
    for shrink in shrinks[1:]:
        q, s, z = _grid(wg, shrink, bits, symmetric, scale_dtype)
        d = wg - decode_grid(q, s, z, bits)
        err = (d * d if hg is None else hg * d * d).sum(-1, keepdim=True)  # [R, G, 1]
        better = err < best_err  # [R, G, 1]
        best_err = torch.where(better, err, best_err)
        best_q = torch.where(better, q, best_q)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    return best_q, best_s, best_z


def uniform_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True,
                     clip_search: bool = True, clip_steps: int = 16, clip_min: float = 0.65,
                     hdiag: torch.Tensor | None = None, scale_dtype: torch.dtype = torch.float16
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w ``[..., N, K]`` -> (codes uint8 ``[..., N, K]``, scale fp32 ``[..., N, G]``, zero uint8 ``[..., N, G]``
    or None when symmetric). ``scale`` holds values exactly representable in ``scale_dtype``.

    hdiag: ``[..., K]`` (or anything broadcastable to it, e.g. ``[K]``) non-negative per-column weights
    for the clip-search error, typically the Hessian diagonal.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits {bits} must be in 1..8 for uint8 codes")
    if w.dim() < 2:
        raise ValueError(f"weight must be [..., N, K], got shape {tuple(w.shape)}")
    *lead, n, k = w.shape
    gs = resolve_group_size(k, group_size)
    g = num_groups(k, gs)
    m = w.numel() // k if k else 0  # rows over all experts
    wf = _pad_cols(w.detach().to(torch.float32).reshape(m, k), g * gs).reshape(m, g, gs)  # [M, G, g] zero-padded
    hd = None
    if hdiag is not None:
        hd = torch.broadcast_to(hdiag.detach().to(torch.float32), (*lead, k)).reshape(-1, k)  # [E, K]
        hd = _pad_cols(hd, g * gs).reshape(-1, g, gs)  # [E, G, g], padding weighs 0
    shrinks = shrink_factors(clip_search, clip_steps, clip_min)
    codes = torch.empty(m, g, gs, dtype=torch.uint8, device=w.device)  # [M, G, g]
    scale = torch.empty(m, g, 1, dtype=torch.float32, device=w.device)  # [M, G, 1]
    zero = None if symmetric else torch.empty(m, g, 1, dtype=torch.uint8, device=w.device)  # [M, G, 1]
    rows = max(1, _CHUNK_ELEMS // max(k, 1))
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        hg = None if hd is None else hd[torch.arange(r0, r1, device=w.device) // n]  # [R, G, g]
        q, s, z = fit_groups(wf[r0:r1], hg, bits, symmetric, shrinks, scale_dtype)
        codes[r0:r1] = q.to(torch.uint8)
        scale[r0:r1] = s
        if zero is not None:
            zero[r0:r1] = z.to(torch.uint8)
    out_zero = None if zero is None else zero.reshape(*lead, n, g)
    return codes.reshape(m, g * gs)[:, :k].reshape(*lead, n, k), scale.reshape(*lead, n, g), out_zero


def uniform_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int,
                       bits: int, grid: str = "midtread") -> torch.Tensor:
    """codes ``[..., N, K]``, scale ``[..., N, G]``, zero ``[..., N, G]`` or None -> w_hat fp32 ``[..., N, K]``.

    Asymmetric decoding uses ``zero``; symmetric uses the midpoint of ``grid`` (``bits`` fixes it).
    """
    *lead, n, k = codes.shape
    gs = resolve_group_size(k, group_size)
    g = num_groups(k, gs)
    q = _pad_cols(codes.to(torch.float32), g * gs).reshape(*lead, n, g, gs)  # [..., N, G, g]
    s = scale.to(torch.float32).unsqueeze(-1)  # [..., N, G, 1]
    z = None if zero is None else zero.to(torch.float32).unsqueeze(-1)  # [..., N, G, 1]
    return decode_grid(q, s, z, bits, grid).reshape(*lead, n, g * gs)[..., :k]


def exact_symmetric_parts(w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype,
                          chunk_rows: int = 4096, signed_max: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The symmetric midtread codes and scales that reproduce ``w [N, K]`` **exactly**, or None.

    A group is exact when it equals ``(q - 2^(b-1)) * s`` with integer ``q`` in ``[0, 2^b)`` and ``s`` a value
    of ``scale_dtype``: ``s = absmax / (2^(b-1) - 1)`` (llama.cpp's Q8_0 at ``bits=8, group_size=32``: fp16
    ``d = absmax / 127``, ``x = d * q`` in fp32), or with ``signed_max`` ``s = -m / 2^(b-1)`` for ``m`` the group's
    value of largest magnitude (its first, as llama.cpp picks it), so that value is code 0 and ``s`` is negative
    where ``m`` is positive: the rule of Q4_0 / Q5_0 at ``bits=4 / 5``. A table dequantized from such a block
    type is found again bit for bit. Rows are checked ``chunk_rows`` at a time, and the first group that is not
    exact ends the search (a bf16 or trained fp32 table fails in its first chunk). -> (codes uint8 ``[N, K]``,
    scale ``[N, K / group_size]`` in ``scale_dtype``); None when ``group_size`` does not divide ``K`` or any
    group is off the grid. A zero group is exact with scale 0."""
    n, k = w.shape
    if k % group_size or bits > 8:
        return None
    qmax, mid = (1 << (bits - 1)) - 1, 1 << (bits - 1)
    codes = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, k // group_size, dtype=scale_dtype)
    for r0 in range(0, n, chunk_rows):
        wg = w[r0:r0 + chunk_rows].detach().to(torch.float32).reshape(-1, k // group_size, group_size)  # [r, G, g]
        if signed_max:
            m = wg.gather(-1, wg.abs().argmax(-1, keepdim=True))  # [r, G, 1]: the first value of largest |w|
            s = (-m / mid + 0.0).to(scale_dtype)  # + 0.0: a zero group's scale is +0, not -0
        else:
            s = (wg.abs().amax(-1, keepdim=True) / qmax).to(scale_dtype)  # [r, G, 1]
        sf = s.to(torch.float32)
        q = torch.round(wg / torch.where(sf != 0, sf, torch.ones_like(sf))).clamp_(-qmax - 1, qmax)  # [r, G, g]
        if not bool(torch.isfinite(sf).all()) or not torch.equal(q * sf, wg):
            return None
        codes[r0:r0 + chunk_rows] = (q + mid).to(torch.uint8).reshape(-1, k)
        scales[r0:r0 + chunk_rows] = s.squeeze(-1)
    return codes, scales
