"""llama.cpp's GGUF block formats as codecs: the k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), the 32-wide
types llama.cpp falls back to for rows whose width is not a multiple of 256 (Q4_0, Q5_0, Q5_1, Q8_0; F16
when the width is not even a multiple of 32) and IQ4_NL (a 32-wide 4-bit table type).

Blocks run along a row (the input dim ``K``). A k-quant *super-block* of 256 weights is cut into
sub-blocks of 16 or 32 that each have an integer scale (and, for Q2_K/Q4_K/Q5_K, an integer min) on a
grid set by the super-block's fp16 ``d`` (and ``dmin``). What a block decodes to, per weight with
unsigned code ``u`` in sub-block ``j`` (``sc_j``/``mn_j`` the sub-block integers):

==========  =====================================  =========  ==========================================
type        value                                  code bits  sub-block integers
==========  =====================================  =========  ==========================================
Q2_K        ``(d*sc_j)*u - (dmin*mn_j)``           2          16 of 16: sc, mn in [0, 15]
Q3_K        ``(d*sc_j)*(u - 4)``                   3          16 of 16: sc in [-32, 31]
Q4_K        ``(d*sc_j)*u - (dmin*mn_j)``           4          8 of 32: sc, mn in [0, 63]
Q5_K        ``(d*sc_j)*u - (dmin*mn_j)``           5          8 of 32: sc, mn in [0, 63]
Q6_K        ``(d*sc_j)*(u - 32)``                  6          16 of 16: sc in [-128, 127]
Q4_0        ``d*(u - 8)``                          4          one block of 32, no sub-blocks
Q5_0        ``d*(u - 16)``                         5          one block of 32
Q5_1        ``d*u + m`` (``m`` fp16, any sign)     5          one block of 32
Q8_0        ``d*(u - 128)``, ``u - 128 != -128``   8          one block of 32
IQ4_NL      ``d*LUT[u]`` (a fixed 16-entry table)  4          one block of 32
==========  =====================================  =========  ==========================================

Each product and difference is one fp32 operation in exactly that order (fp16 -> fp32 conversions are
exact), as ggml and gguf-py decode them, so ``decode`` is bit-identical to theirs.

Choosing the parameters is our own weighted search (``importance`` ``[..., K]``, e.g. the Hessian
diagonal: the error of a weight in column ``k`` counts ``importance[k]`` times):

1. every sub-block gets a real-valued fit: candidate scales that put the sub-block's extreme a
   fraction of a level inside or outside the end of the code range are each tried, the codes rounded,
   the scale (and min) refitted by weighted least squares on those codes, the codes rounded again,
   and the candidate with the least weighted squared error kept;
2. the sub-block scales are put on the super-block's grid: candidate ``d`` (rounded to fp16) map the
   largest sub-scale a fraction of an integer around the end of the integer range; the ``d`` whose
   integer scales are closest, each sub-block weighted by how much its error costs, is kept;
3. (types with mins) given the stored scales the mins are refitted, then put on their grid the same way;
4. the codes are rounded to the nearest level of the stored grid (``round_codes``).

``round_codes`` and ``decode`` act on the *effective* sub-block scale and offset (``effective``), so a
column-by-column solver (``codecs.kquant_columns``) can fix a super-block's parameters and round one
column at a time on that grid. Byte layouts live in ``codecs.kquant_pack``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moequant.errors import UnrepresentableError

QK_K = 256  # weights per k-quant super-block

# llama.cpp's IQ4_NL levels (kvalues_iq4nl): a fixed non-uniform 4-bit table, scaled by the block's d.
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# Blocks per chunk of the parameter search (bounds its temporaries to a few tens of MiB).
_CHUNK_WEIGHTS = 1 << 20


@dataclass(frozen=True)
class GgmlType:
    """One GGUF block type. ``kind``: "min" (``s*u - m``), "sym" (``s*(u - offset)``), "affine"
    (``d*u + m``), "lut" (``d*LUT[u]``) or "float" (F16, no codes)."""

    name: str
    type_id: int  # ggml_type
    block: int  # weights per block (the super-block for k-quants)
    block_bytes: int
    sub: int  # weights per sub-block sharing a scale (== block when there is one scale per block)
    bits: int  # code bits
    kind: str
    offset: int = 0  # signed level = u - offset ("sym")
    scale_lo: int = 0  # integer sub-block scale range (k-quants); 0, 0 when the block has one fp16 scale
    scale_hi: int = 0
    qmin: int | None = None  # lowest code used ("sym"); None: 0

    @property
    def n_sub(self) -> int:
        return self.block // self.sub

    @property
    def two_level(self) -> bool:
        """Sub-block integer scales under a super-block fp16 scale (the k-quants)."""
        return self.scale_hi > 0

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block

    @property
    def code_range(self) -> tuple[int, int]:
        """Lowest and highest code ``u`` the encoder writes."""
        return (0 if self.qmin is None else self.qmin), (1 << self.bits) - 1


TYPES: dict[str, GgmlType] = {t.name: t for t in (
    GgmlType("q2_k", 10, QK_K, 84, 16, 2, "min", scale_hi=15),
    GgmlType("q3_k", 11, QK_K, 110, 16, 3, "sym", offset=4, scale_lo=-32, scale_hi=31),
    GgmlType("q4_k", 12, QK_K, 144, 32, 4, "min", scale_hi=63),
    GgmlType("q5_k", 13, QK_K, 176, 32, 5, "min", scale_hi=63),
    GgmlType("q6_k", 14, QK_K, 210, 16, 6, "sym", offset=32, scale_lo=-128, scale_hi=127),
    GgmlType("q4_0", 2, 32, 18, 32, 4, "sym", offset=8),
    GgmlType("q5_0", 6, 32, 22, 32, 5, "sym", offset=16),
    GgmlType("q5_1", 7, 32, 24, 32, 5, "affine"),
    # Q8_0 stores int8; like ggml we never write -128, so the grid is symmetric.
    GgmlType("q8_0", 8, 32, 34, 32, 8, "sym", offset=128, qmin=1),
    GgmlType("iq4_nl", 20, 32, 18, 32, 4, "lut"),
    GgmlType("f16", 1, 1, 2, 1, 16, "float"),
)}

# llama.cpp's fallback for a k-quant whose row width is not a multiple of 256 (tensor_type_fallback in
# llama-quant.cpp of the llama.cpp that llama-cpp-python 0.3.36 vendors; older llama.cpp sent Q2_K/Q3_K to
# IQ4_NL); any type whose block does not divide the width falls back to F16.
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def stored_type(name: str, k: int) -> GgmlType:
    """The type llama.cpp stores a row of ``k`` weights in when ``name`` is asked for."""
    t = TYPES[name]
    if k % t.block and name in FALLBACK:
        t = TYPES[FALLBACK[name]]
    return t if k % t.block == 0 else TYPES["f16"]


@dataclass
class BlockParams:
    """The stored (non-code) fields of every block of a ``[..., N, K]`` tensor, ``B = K / block``,
    ``S = block / sub``. Unused fields are None."""

    d: torch.Tensor  # [..., N, B] float16: the (super-)block scale
    dmin: torch.Tensor | None = None  # [..., N, B] float16: the min scale ("min") or the offset m ("affine")
    scales: torch.Tensor | None = None  # [..., N, B, S] int16: sub-block integer scales (k-quants)
    mins: torch.Tensor | None = None  # [..., N, B, S] int16: sub-block integer mins ("min" k-quants)

    def parts(self) -> dict[str, torch.Tensor]:
        return {n: v for n, v in (("d", self.d), ("dmin", self.dmin), ("scales", self.scales),
                                  ("mins", self.mins)) if v is not None}

    @classmethod
    def from_parts(cls, parts: dict[str, torch.Tensor]) -> "BlockParams":
        return cls(parts["d"], parts.get("dmin"), parts.get("scales"), parts.get("mins"))


# ---- the grid: effective scales, rounding, exact decode ---------------------------------------------------

def effective(t: GgmlType, p: BlockParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (scale, offset), each ``[..., N, K / sub]`` fp32: the per-sub-block factors the codes are decoded
    with, computed as ggml does (``d * sc`` and ``dmin * mn`` as single fp32 products); offset None
    for types without one."""
    d = p.d.to(torch.float32)  # [..., N, B]
    if t.two_level:
        scale = (d.unsqueeze(-1) * p.scales.to(torch.float32)).flatten(-2)  # [..., N, B*S]
        offset = None
        if t.kind == "min":
            offset = (p.dmin.to(torch.float32).unsqueeze(-1) * p.mins.to(torch.float32)).flatten(-2)
        return scale, offset
    return d, (p.dmin.to(torch.float32) if t.kind == "affine" else None)


def _lut(device: torch.device | None = None) -> torch.Tensor:
    return torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32, device=device)  # [16]


def grid_decode(t: GgmlType, u: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """codes uint8 ``u`` -> fp32 values, ``s``/``m`` (the effective scale/offset) broadcasting against ``u``
    (not beyond its shape); one fp32 operation per step in ggml's order (in place: half the time)."""
    if t.kind == "lut":
        return _lut(u.device)[u.long()].mul_(s)
    uf = u.to(torch.float32)
    if t.kind == "sym":
        return uf.sub_(t.offset).mul_(s)
    if t.kind == "min":
        return uf.mul_(s).sub_(m)
    if t.kind == "affine":
        return uf.mul_(s).add_(m)
    raise ValueError(f"{t.name} has no codes")


def grid_round(t: GgmlType, x: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """x -> the codes uint8 of the nearest levels of the grid ``s``/``m`` (broadcasting against ``x``); where
    ``s`` is 0 every code decodes alike and the zero level's code (0 for types with a min) is written."""
    y = x.to(torch.float32)
    lo, hi = t.code_range
    if t.kind == "sym":
        u = torch.round(y / _nz(s)).clamp_(lo - t.offset, hi - t.offset).add_(t.offset)
    elif t.kind in ("min", "affine"):
        u = torch.round((y + m if t.kind == "min" else y - m) / _nz(s)).clamp_(lo, hi)
    elif t.kind == "lut":
        u = _nearest_lut(y / _nz(s))
    else:
        raise ValueError(f"{t.name} has no codes")
    return u.to(torch.uint8)


def _nz(s: torch.Tensor) -> torch.Tensor:
    """``s`` with zeros made infinite: dividing a finite weight by it gives 0, the zero level."""
    return torch.where(s == 0, torch.full_like(s, float("inf")), s)


def decode(t: GgmlType, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """codes uint8 ``[..., N, C]`` (``C`` a multiple of ``sub``; ``scale``/``offset`` ``[..., N, C / sub]``)
    -> fp32 ``[..., N, C]``, bit-identical to ggml's dequantization."""
    *lead, n, c = codes.shape
    u = codes.reshape(*lead, n, c // t.sub, t.sub)  # [..., N, G, sub]
    m = None if offset is None else offset.unsqueeze(-1)
    return grid_decode(t, u, scale.unsqueeze(-1), m).reshape(*lead, n, c)


def round_codes(t: GgmlType, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """x ``[..., N, C]`` -> the nearest codes uint8 ``[..., N, C]`` on the grid of ``scale``/``offset``
    ``[..., N, C / sub]``."""
    *lead, n, c = x.shape
    y = x.reshape(*lead, n, c // t.sub, t.sub)  # [..., N, G, sub]
    m = None if offset is None else offset.unsqueeze(-1)
    return grid_round(t, y, scale.unsqueeze(-1), m).reshape(*lead, n, c)


def _nearest_lut(y: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the IQ4_NL level nearest each value of ``y``. The midpoints between levels are all
    multiples of 1/2, so ``floor(2y)`` picks a half-unit cell that lies wholly on one side of each."""
    cells = torch.arange(-256, 256, dtype=torch.float32, device=y.device) / 2 + 0.25  # [512] cell centres
    lv = _lut(y.device)
    table = torch.bucketize(cells, (lv[1:] + lv[:-1]) / 2)  # [512]
    return table[(torch.floor(2 * y).clamp_(-256, 255) + 256).long()]


# ---- the parameter search ------------------------------------------------------------------------------------

def choose_params(t: GgmlType, w: torch.Tensor, importance: torch.Tensor | None = None,
                  steps: int = 8) -> BlockParams:
    """Block parameters of type ``t`` for ``w [..., N, K]`` (``K`` a multiple of ``t.block``), minimising
    the ``importance``-weighted squared error (``importance`` ``[..., K]``, broadcast over ``N``; None:
    plain squared error). ``steps`` candidates per search (see the module docstring)."""
    if t.kind == "float":
        raise ValueError("f16 has no block parameters")
    *lead, n, k = w.shape
    if k % t.block:
        raise ValueError(f"{t.name} needs rows of a multiple of {t.block} weights, got {k}")
    nb, ns = k // t.block, t.n_sub
    x = w.detach().to(torch.float32).reshape(-1, ns, t.sub)  # [M, S, sub], M = prod(lead) * N * B
    a = _importance(importance, w).reshape(-1, ns, t.sub)  # [M, S, sub]
    chunk = max(1, _CHUNK_WEIGHTS // t.block)
    outs = [_choose_blocks(t, x[i:i + chunk], a[i:i + chunk], steps) for i in range(0, x.shape[0], chunk)]
    fields = {}
    for name in outs[0]:
        cat = torch.cat([o[name] for o in outs])  # [M] or [M, S]
        fields[name] = cat.reshape(*lead, n, nb, *cat.shape[1:])
    return BlockParams(**fields)


def _importance(importance: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    """Per-weight error weights ``[..., N, K]``: ``importance [..., K]`` scaled to mean 1 per row of ``K``
    plus a floor of 1e-4 (columns no calibration token reached still get a sensible grid); ones without."""
    if importance is None:
        return torch.ones(w.shape, dtype=torch.float32, device=w.device)
    imp = importance.detach().to(torch.float32).clamp_min(0)  # [..., K]
    if imp.shape[-1] != w.shape[-1] or imp.dim() > w.dim() - 1:
        raise ValueError(f"importance {tuple(imp.shape)} does not fit weight {tuple(w.shape)} (want [..., K])")
    mean = imp.mean(-1, keepdim=True)
    imp = torch.where(mean > 0, imp / torch.where(mean > 0, mean, torch.ones_like(mean)), torch.ones_like(imp))
    return (imp + 1e-4).unsqueeze(-2).expand(w.shape)


def _choose_blocks(t: GgmlType, x: torch.Tensor, a: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
    """x, a ``[M, S, sub]`` -> the stored fields of ``M`` blocks (``[M]`` fp16 / ``[M, S]`` int16)."""
    lo, hi = t.code_range
    if t.kind in ("min", "affine"):
        s, m = fit_affine(x, a, hi, steps, nonneg_min=t.kind == "min")  # [M, S]
    else:
        levels = (float(lo - t.offset), float(hi - t.offset)) if t.kind == "sym" else None
        s, m = fit_symmetric(x, a, levels, steps), None  # [M, S]
    if not t.two_level:
        d = _to_fp16(s[:, 0], t)  # [M]
        if m is None:
            return {"d": d}
        m16 = _to_fp16(-m[:, 0], t)  # affine: stored offset is +m
        return {"d": d, "dmin": m16}
    # sub-block scale errors cost sum(a u^2) each (the codes scale with s), min errors sum(a)
    u = _codes_for(x, s, m, t)  # [M, S, sub]
    d, sc = quantize_scales(s, (a * u * u).sum(-1), t.scale_lo, t.scale_hi, steps)  # [M], [M, S]
    _check_fp16(d, t)
    if m is None:
        return {"d": d, "scales": sc}
    s_q = d.to(torch.float32).unsqueeze(-1) * sc.to(torch.float32)  # [M, S]
    m = refit_min(x, a, s_q, m, hi)
    dmin, mn = quantize_scales(m, a.sum(-1), 0, t.scale_hi, steps)
    _check_fp16(dmin, t)
    return {"d": d, "dmin": dmin, "scales": sc, "mins": mn}


def _codes_for(x: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None, t: GgmlType) -> torch.Tensor:
    """Signed levels (sym) or codes (min) of ``x [M, S, sub]`` under real-valued ``s``, ``m`` ``[M, S]``."""
    lo, hi = t.code_range
    if m is None:
        return torch.round(x / _nz(s).unsqueeze(-1)).clamp_(lo - t.offset, hi - t.offset)
    return _round_affine(x, s, m, hi)


def _to_fp16(v: torch.Tensor, t: GgmlType) -> torch.Tensor:
    out = v.to(torch.float16)
    _check_fp16(out, t)
    return out


def _check_fp16(v: torch.Tensor, t: GgmlType) -> None:
    if not bool(torch.isfinite(v).all()):
        raise UnrepresentableError(f"{t.name}: a block scale overflows float16 (weights beyond ~{65504 * 8:.0e})")


def _deltas(steps: int, span: float) -> torch.Tensor:
    """``steps`` offsets evenly spaced in ``[-span, span]``, 0 always among them (ties keep it: first)."""
    d = torch.linspace(-span, span, max(steps, 1)) if steps > 1 else torch.zeros(1)
    return torch.cat([torch.zeros(1), d[d != 0]])


def fit_affine(x: torch.Tensor, a: torch.Tensor, qmax: int, steps: int, nonneg_min: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted fit of ``x ≈ s*u - m``, ``u`` integer in ``[0, qmax]``, per sub-block.

    x, a ``[M, S, sub]`` -> s, m ``[M, S]`` with ``s >= 0`` (and ``m >= 0`` when ``nonneg_min``: the lowest
    level is then at most 0, as the k-quants store mins unsigned). Candidates map the range ``[lo, hi]``
    onto ``qmax + delta`` levels; each is refitted by weighted least squares on its rounded codes and
    scored on the codes re-rounded to the refitted grid."""
    lo = x.amin(-1)  # [M, S]
    if nonneg_min:
        lo = lo.clamp(max=0)
    rng = x.amax(-1) - lo  # [M, S]
    best_s, best_m = rng / qmax, -lo
    best_err = _affine_err(x, a, best_s, best_m, qmax)
    sa, sx = a.sum(-1), (a * x).sum(-1)  # [M, S]
    for delta in _deltas(steps, 1.0).tolist():
        if qmax + delta <= 0:
            continue
        s0 = rng / (qmax + delta)
        u = _round_affine(x, s0, -lo, qmax)  # [M, S, sub]
        su, suu, sux = (a * u).sum(-1), (a * u * u).sum(-1), (a * u * x).sum(-1)
        det = sa * suu - su * su
        ok = det > 1e-12 * sa * suu
        s = torch.where(ok, (sa * sux - su * sx) / torch.where(ok, det, torch.ones_like(det)), s0)
        m = torch.where(ok, (sux * su - sx * suu) / torch.where(ok, det, torch.ones_like(det)), -lo)
        if nonneg_min:  # the min would be negative: refit the scale alone with m = 0
            neg = m < 0
            s = torch.where(neg, sux / torch.where(suu > 0, suu, torch.ones_like(suu)), s)
            m = torch.where(neg, torch.zeros_like(m), m)
        s = s.clamp_min(0)
        err = _affine_err(x, a, s, m, qmax)
        better = err < best_err
        best_s, best_m, best_err = (torch.where(better, s, best_s), torch.where(better, m, best_m),
                                    torch.where(better, err, best_err))
    return best_s, best_m


def _round_affine(x: torch.Tensor, s: torch.Tensor, m: torch.Tensor, qmax: int) -> torch.Tensor:
    """Codes in ``[0, qmax]`` of ``x [M, S, sub]`` for ``x ≈ s*u - m`` (``s``, ``m`` ``[M, S]``; 0 where ``s`` is 0)."""
    return torch.round((x + m.unsqueeze(-1)).div_(_nz(s).unsqueeze(-1))).clamp_(0, qmax)


def _affine_err(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, m: torch.Tensor, qmax: int) -> torch.Tensor:
    u = _round_affine(x, s, m, qmax)
    return (a * (s.unsqueeze(-1) * u - m.unsqueeze(-1) - x).square()).sum(-1)  # [M, S]


def refit_min(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, m: torch.Tensor, qmax: int, iters: int = 2
              ) -> torch.Tensor:
    """Given fixed scales ``s [M, S]``, improve the mins ``m [M, S]`` (kept ``>= 0``) by alternating code
    rounding and the weighted-mean min; a candidate is kept only where it lowers the error."""
    err = _affine_err(x, a, s, m, qmax)
    sa = a.sum(-1).clamp_min(1e-30)
    for _ in range(iters):
        u = _round_affine(x, s, m, qmax)
        m_new = ((a * (s.unsqueeze(-1) * u - x)).sum(-1) / sa).clamp_min(0)
        e_new = _affine_err(x, a, s, m_new, qmax)
        better = e_new < err
        m, err = torch.where(better, m_new, m), torch.where(better, e_new, err)
    return m


def fit_symmetric(x: torch.Tensor, a: torch.Tensor, levels: tuple[float, float] | None, steps: int) -> torch.Tensor:
    """Weighted fit of ``x ≈ s*q`` per sub-block, ``q`` an integer in ``levels = (qlo, qhi)`` or, when
    ``levels`` is None, an IQ4_NL table value. x, a ``[M, S, sub]`` -> signed ``s`` ``[M, S]``.

    The sign of ``s`` is free, so the sub-block's largest-magnitude weight can sit on either end of an
    asymmetric range; candidates map it ``delta`` levels around each end, are refitted by weighted least
    squares on their codes and scored on the codes re-rounded to the refitted scale."""
    amax_i = x.abs().argmax(-1, keepdim=True)
    peak = x.gather(-1, amax_i).squeeze(-1)  # [M, S] signed largest-magnitude weight
    if levels is None:
        ends, span = (float(IQ4_NL_LEVELS[0]), float(IQ4_NL_LEVELS[-1])), 8.0
    else:
        ends, span = (levels if levels[0] != -levels[1] else levels[1:]), 1.0
    best_s = torch.zeros_like(peak)
    best_err = (a * x * x).sum(-1)  # s = 0
    for end in ends:
        for delta in _deltas(steps, span).tolist():
            target = end + (delta if end > 0 else -delta)
            if target * end <= 0:
                continue
            s0 = peak / target
            q = _sym_levels(x, s0, levels)
            sqq, sqx = (a * q * q).sum(-1), (a * q * x).sum(-1)
            s = torch.where(sqq > 0, sqx / torch.where(sqq > 0, sqq, torch.ones_like(sqq)), s0)
            q = _sym_levels(x, s, levels)
            err = (a * (s.unsqueeze(-1) * q - x).square()).sum(-1)
            better = err < best_err
            best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
    return best_s


def _sym_levels(x: torch.Tensor, s: torch.Tensor, levels: tuple[float, float] | None) -> torch.Tensor:
    """The level values ``q`` nearest ``x / s`` (where ``s`` is 0: the level nearest 0, which ``s`` zeroes)."""
    y = x / _nz(s).unsqueeze(-1)
    if levels is None:
        return _lut(x.device)[_nearest_lut(y)]
    return torch.round(y).clamp_(levels[0], levels[1])


def quantize_scales(s: torch.Tensor, cost: torch.Tensor, lo: int, hi: int, steps: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Put real sub-block scales ``s [M, S]`` on a super-block grid ``d * sc``, ``sc`` an integer in
    ``[lo, hi]`` and ``d`` fp16, minimising ``sum(cost * (s - d*sc)^2)`` (``cost [M, S] >= 0``).

    Candidates map the largest-magnitude scale ``delta`` in ``[-1/2, 1/2]`` around ``hi`` (and, when
    ``lo < 0``, around ``lo``, which flips the sign of ``d``). -> d float16 ``[M]``, sc int16 ``[M, S]``."""
    peak = s.gather(-1, s.abs().argmax(-1, keepdim=True)).squeeze(-1)  # [M]
    best_d = torch.zeros_like(peak)
    best_sc = torch.zeros_like(s)
    best_err = (cost * s * s).sum(-1)
    ends = (float(hi),) if lo >= 0 else (float(hi), float(lo))
    for end in ends:
        for delta in _deltas(steps, 0.5).tolist():
            d = (peak / (end + (delta if end > 0 else -delta))).to(torch.float16).to(torch.float32)  # [M]
            safe = torch.where(d == 0, torch.ones_like(d), d).unsqueeze(-1)
            sc = torch.round(s / safe).clamp_(lo, hi)
            sc = torch.where((d == 0).unsqueeze(-1), torch.zeros_like(sc), sc)
            err = (cost * (s - d.unsqueeze(-1) * sc).square()).sum(-1)
            better = err < best_err
            best_d = torch.where(better, d, best_d)
            best_sc = torch.where(better.unsqueeze(-1), sc, best_sc)
            best_err = torch.where(better, err, best_err)
    return best_d.to(torch.float16), best_sc.to(torch.int16)


# ---- whole tensors -----------------------------------------------------------------------------------------

def quantize(t: GgmlType, w: torch.Tensor, importance: torch.Tensor | None = None, steps: int = 8
             ) -> tuple[torch.Tensor, BlockParams]:
    """w ``[..., N, K]`` -> (codes uint8 ``[..., N, K]``, parameters) of type ``t``."""
    p = choose_params(t, w, importance, steps)
    scale, offset = effective(t, p)
    return round_codes(t, w, scale, offset), p


def dequantize(t: GgmlType, codes: torch.Tensor, p: BlockParams) -> torch.Tensor:
    """(codes ``[..., N, K]``, parameters) -> fp32 ``[..., N, K]``, as ggml decodes them."""
    scale, offset = effective(t, p)
    return decode(t, codes, scale, offset)
