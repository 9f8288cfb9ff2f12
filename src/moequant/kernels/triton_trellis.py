"""Triton kernels of the bitshift-trellis format (``trellis-packed``): decode, and ``x Ŵᵀ + b`` from the words.

One block body (``_decode_block``: the float32 weights of rows ``rn`` and columns ``rk`` of the ``[N, K]``
matrix, each computed from the packed words in registers) and three kernels:

- ``dequant(words, scale, lut, ...) -> float32 [N, K]``: bit-identical to ``moequant::trellis_dequant``'s
  reference (same integer state, same float32 code value, one float32 multiply by the row scale);
- ``linear(x [..., K], words, scale, lut, bias, ...) -> [..., N]``: each program decodes ``[BN, BK]``
  blocks of weights and multiplies them into a ``[BM, BN]`` float32 accumulator (the ``[N, K]`` matrix
  never exists; ``input_precision="ieee"`` for float32 inputs: no TF32);
- ``grouped(x [S, K], counts, words [E, ·], scale [E, N], lut [E, 2^Q, 2], ...) -> [S, N]``: the routed experts
  of an MoE layer in ONE launch, with the same block body and accumulation: the ``S`` (token, slot) rows are
  sorted by expert, each program takes up to ``BM`` rows of one expert (the tile table of
  ``triton_uniform.tile_table``) and ``BN`` output columns, and decodes only that expert's words.

Per weight ``(n, k)`` (layout and codes: ``codecs/trellis.py``): tile ``(n // tile, k // tile)``, position
``p = (n mod tile)·tile + k mod tile``, step ``t = p // V``, component ``p mod V``; the state is the ``L``
stream bits from bit ``t·K·V`` of the tile's words (bit ``i`` is bit ``15 − i mod 16`` of word ``i // 16``),
read as three words joined into 48 bits. The stream past its end is zeros (free start), the tile's words
again (tail-biting when ``16 | K·T``: every 16x16 tile) or, for other tail-biting geometries, the bits up to
the end joined with the stream's first bits. Codes: ``hyb`` looks up the float32 LUT and negates component 0
when bit 15 of ``s·(s+1) mod 2^32`` is set; ``1mad`` sums the four bytes of a 32-bit hash and divides
correctly rounded (``div_rn``: a plain ``/`` is approximate on GPUs); ``3inst`` adds two fp16 halves in
float32 (exact) and rounds the sum to fp16, as torch's half add does. Any tile size, ``L`` up to 24.

These run on CUDA tensors (registered as the ``cuda`` kernels of both ops by ``kernels.trellis``) and, for
tests, on CPU tensors under ``TRITON_INTERPRET=1`` — which Triton reads when this module is imported, so
import it only through ``triton_load.triton_module`` after the variable is set.
"""

from __future__ import annotations

import triton
import triton.language as tl
import torch

from moequant.codecs.config import TrellisConfig
from moequant.codecs.trellis import check_geometry, tile_bits, words_per_tile
from moequant.kernels.triton_uniform import finish_output, output_buffer
from moequant.kernels.triton_uniform import launch_for as _launch_for
from moequant.kernels.triton_uniform import tile_table as _tile_table

CODES = {"hyb": 0, "1mad": 1, "3inst": 2}
# how a state reads past the stream's end: zeros, whole words again, or bits again
FREE, CYCLIC_WORDS, CYCLIC_BITS = 0, 1, 2


@triton.jit
def _bits_at(base, pos, nbits, m2, W: tl.constexpr, CYCLIC: tl.constexpr):
    """``nbits`` (<= 32) stream bits from bit ``pos`` of each element's tile (``base``: pointers to the tile's
    first word) as int64; words past ``W`` are the first words again (``CYCLIC``) or zeros."""
    idx = pos >> 4
    off = pos & 15
    if CYCLIC:
        w0 = tl.load(base + idx % W, mask=m2, other=0)
        w1 = tl.load(base + (idx + 1) % W, mask=m2, other=0)
        w2 = tl.load(base + (idx + 2) % W, mask=m2, other=0)
    else:
        w0 = tl.load(base + idx, mask=m2 & (idx < W), other=0)
        w1 = tl.load(base + idx + 1, mask=m2 & (idx + 1 < W), other=0)
        w2 = tl.load(base + idx + 2, mask=m2 & (idx + 2 < W), other=0)
    joined = ((w0.to(tl.int64) & 0xFFFF) << 32) | ((w1.to(tl.int64) & 0xFFFF) << 16) | (w2.to(tl.int64) & 0xFFFF)
    return (joined >> (48 - nbits - off)) & ((tl.full(pos.shape, 1, tl.int64) << nbits) - 1)


@triton.jit
def _state(base, pos, m2, L: tl.constexpr, W: tl.constexpr, TB: tl.constexpr, STREAM: tl.constexpr):
    """The ``L``-bit state starting at stream bit ``pos`` (int64), by the stream's ``STREAM`` mode."""
    if STREAM == 2:  # tail-biting, the cycle ends inside a word: bits [pos, TB) then [0, L - (TB - pos))
        head = tl.minimum(TB - pos, L)
        rest = L - head
        a = _bits_at(base, pos, head, m2, W, False)
        b = _bits_at(base, tl.zeros_like(pos), rest, m2, W, False)
        return (a << rest) | b
    else:
        full = tl.full(pos.shape, L, tl.int32)
        return _bits_at(base, pos, full, m2, W, STREAM == 1)


@triton.jit
def _code(s, comp, lut_ptr, m2, Q: tl.constexpr, CODE: tl.constexpr):
    """float32 value of component ``comp`` of state ``s`` (int64) under code ``CODE`` (0 hyb, 1 1mad, 2 3inst)."""
    su = s.to(tl.uint32)
    if CODE == 0:
        h = su * (su + 1)  # mod 2^32
        idx = ((h >> (15 - Q)) & ((1 << Q) - 1)).to(tl.int32)
        val = tl.load(lut_ptr + 2 * idx + comp, mask=m2, other=0.0)
        neg = (((h >> 15) & 1) == 1) & (comp == 0)
        return tl.where(neg, -val, val)
    elif CODE == 1:
        x = su * 34038481 + 76625530
        y = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + (x >> 24)
        return tl.div_rn(y.to(tl.int32).to(tl.float32) - 510.0, 147.800537109375)
    else:
        x = su * 89226354 + 64248484
        y = (x & 0x8FFF8FFF) ^ 0x3B603B60
        hi = (y >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
        lo = (y & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        return (hi.to(tl.float32) + lo.to(tl.float32)).to(tl.float16).to(tl.float32)


@triton.jit
def _decode_block(words_ptr, scale_ptr, lut_ptr, rn, rk, N, K, KT, L: tl.constexpr, KV: tl.constexpr,
                  V: tl.constexpr, TILE: tl.constexpr, Q: tl.constexpr, CODE: tl.constexpr, W: tl.constexpr,
                  TB: tl.constexpr, STREAM: tl.constexpr):
    """Weights ``[BN, BK]`` float32 of rows ``rn`` and columns ``rk`` (zero outside the matrix)."""
    nmask = rn < N
    m2 = nmask[:, None] & (rk < K)[None, :]
    p = (rn % TILE)[:, None] * TILE + (rk % TILE)[None, :]  # [BN, BK]: position in its tile
    tile = (rn // TILE).to(tl.int64)[:, None] * KT + (rk // TILE)[None, :]  # [BN, BK]
    base = words_ptr + tile * W
    s = _state(base, (p // V) * KV, m2, L, W, TB, STREAM)
    val = _code(s, p % V, lut_ptr, m2, Q, CODE)
    sc = tl.load(scale_ptr + rn, mask=nmask, other=0.0).to(tl.float32)  # [BN]
    return tl.where(m2, val * sc[:, None], 0.0)


@triton.jit
def _dequant_kernel(words_ptr, scale_ptr, lut_ptr, out_ptr, N, K, KT, L: tl.constexpr, KV: tl.constexpr,
                    V: tl.constexpr, TILE: tl.constexpr, Q: tl.constexpr, CODE: tl.constexpr, W: tl.constexpr,
                    TB: tl.constexpr, STREAM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)  # [BN]
    rk = tl.program_id(1) * BK + tl.arange(0, BK)  # [BK]
    w = _decode_block(words_ptr, scale_ptr, lut_ptr, rn, rk, N, K, KT, L, KV, V, TILE, Q, CODE, W, TB, STREAM)
    m2 = (rn < N)[:, None] & (rk < K)[None, :]
    tl.store(out_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :], w, mask=m2)


@triton.jit
def _accumulate(acc, x_ptr, sxm, rm, row_end, words_ptr, scale_ptr, lut_ptr, rn, N, K, k_lo, k_hi, KT, L: tl.constexpr,
                KV: tl.constexpr, V: tl.constexpr, TILE: tl.constexpr, Q: tl.constexpr, CODE: tl.constexpr,
                W: tl.constexpr, TB: tl.constexpr, STREAM: tl.constexpr, IEEE: tl.constexpr, BK: tl.constexpr,
                GEMV: tl.constexpr):
    """``acc [BM, BN] += x[rm] Ŵ[rn]ᵀ`` over columns ``[k_lo, k_hi)`` of ``K`` (``k_lo`` a multiple of ``BK``), one
    decoded ``[BN, BK]`` block at a time (rows of ``x`` from ``row_end`` on read as zeros). ``GEMV`` (``BM == 1``):
    float32 products summed without ``tl.dot``."""
    for k0 in range(k_lo, k_hi, BK):
        rk = k0 + tl.arange(0, BK)
        xm = (rm < row_end)[:, None] & (rk < K)[None, :]
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * sxm + rk[None, :], mask=xm, other=0.0)  # [BM, BK]
        w = _decode_block(words_ptr, scale_ptr, lut_ptr, rn, rk, N, K, KT, L, KV, V, TILE, Q, CODE, W, TB,
                          STREAM).to(x.dtype)  # [BN, BK]
        if GEMV:
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]  # x [1, BK] -> [1, BN]
        elif IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    return acc


@triton.jit
def _linear_kernel(x_ptr, words_ptr, scale_ptr, lut_ptr, bias_ptr, y_ptr, M, N, K, KT, sxm, sym, sys, k_chunk,
                   L: tl.constexpr, KV: tl.constexpr, V: tl.constexpr, TILE: tl.constexpr, Q: tl.constexpr,
                   CODE: tl.constexpr, W: tl.constexpr, TB: tl.constexpr, STREAM: tl.constexpr,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, GEMV: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)  # [BN]
    rm = tl.program_id(1) * BM + tl.arange(0, BM)  # [BM]
    k_lo = tl.program_id(2) * k_chunk  # split-K: y is float32 [S, M, N], sys apart (triton_uniform.output_buffer)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _accumulate(acc, x_ptr, sxm, rm, M, words_ptr, scale_ptr, lut_ptr, rn, N, K, k_lo,
                      tl.minimum(k_lo + k_chunk, K), KT, L, KV, V, TILE, Q, CODE, W, TB, STREAM, IEEE, BK, GEMV)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ym = (rm < M)[:, None] & (rn < N)[None, :]
    y_ptr += tl.program_id(2).to(tl.int64) * sys
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=ym)


@triton.jit
def _grouped_kernel(x_ptr, tiles_ptr, words_ptr, scale_ptr, lut_ptr, y_ptr, N, K, KT, sxm, sym, sys, k_chunk,
                    lut_stride,
                    L: tl.constexpr, KV: tl.constexpr, V: tl.constexpr, TILE: tl.constexpr, Q: tl.constexpr,
                    CODE: tl.constexpr, W: tl.constexpr, TB: tl.constexpr, STREAM: tl.constexpr,
                    IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    GEMV: tl.constexpr):
    """Program ``(j, t)``: columns ``[j·BN, (j+1)·BN)`` of the rows of tile ``t`` of the host's tile table
    (expert ``e``, first row, end row), from expert ``e``'s words, scales and LUT."""
    t = tl.program_id(1)
    e = tl.load(tiles_ptr + 3 * t).to(tl.int64)
    row0 = tl.load(tiles_ptr + 3 * t + 1)
    row_end = tl.load(tiles_ptr + 3 * t + 2)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)  # [BN]
    rm = row0 + tl.arange(0, BM)  # [BM]
    k_lo = tl.program_id(2) * k_chunk
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # expert e's matrix: N/TILE x KT tiles of W words, N scales, one LUT
    acc = _accumulate(acc, x_ptr, sxm, rm, row_end, words_ptr + e * (N // TILE) * KT * W, scale_ptr + e * N,
                      lut_ptr + e * lut_stride, rn, N, K, k_lo, tl.minimum(k_lo + k_chunk, K), KT, L, KV, V, TILE, Q,
                      CODE, W, TB, STREAM, IEEE, BK, GEMV)
    ym = (rm < row_end)[:, None] & (rn < N)[None, :]
    y_ptr += tl.program_id(2).to(tl.int64) * sys
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=ym)


def _geometry(words: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor | None, cfg: TrellisConfig) -> dict:
    """The kernels' compile-time arguments for one matrix (``words [N/tile, K/tile, W]``), after the checks that
    keep every read inside the stored tensors (``ValueError`` otherwise, as the reference raises)."""
    check_geometry(cfg)
    n_words = words_per_tile(cfg)
    if words.dim() != 3 or words.shape[-1] != n_words:
        raise ValueError(f"trellis words {tuple(words.shape)}: expected [N/tile, K/tile, {n_words}] for "
                         f"{cfg.short_name}")
    if scale.numel() != words.shape[0] * cfg.tile:
        raise ValueError(f"trellis scale has {scale.numel()} rows, words have {words.shape[0] * cfg.tile}")
    if cfg.code == "hyb" and (lut is None or tuple(lut.shape) != (1 << cfg.Q, 2)):
        raise ValueError(f"the hyb code needs a [{1 << cfg.Q}, 2] LUT, got {None if lut is None else tuple(lut.shape)}")
    tb = tile_bits(cfg)
    stream = FREE if not cfg.tail_biting else CYCLIC_WORDS if tb % 16 == 0 else CYCLIC_BITS
    return dict(L=cfg.L, KV=cfg.bits * cfg.V, V=cfg.V, TILE=cfg.tile, Q=cfg.Q, CODE=CODES[cfg.code], W=n_words,
                TB=tb, STREAM=stream)


def _tensors(words: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """words as int16 (Triton has no uint16 pointers; the kernel masks to 16 bits), scale [N] and the float32
    LUT [2^Q, 2] (any tensor when there is none: never read)."""
    w16 = words.contiguous().view(torch.int16)
    lut32 = scale if lut is None else lut.to(words.device, torch.float32).contiguous()
    return w16, scale.contiguous().reshape(-1), lut32


def dequant(words: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor | None, bits: int, L: int, V: int,
            tile: int, code: str, Q: int, tail_biting: bool) -> torch.Tensor:
    """``words [N/tile, K/tile, W]`` -> float32 ``[N, K]``, bit-identical to ``moequant::trellis_dequant``."""
    cfg = TrellisConfig(bits=bits, L=L, V=V, tile=tile, code=code, Q=Q, tail_biting=tail_biting)
    geo = _geometry(words, scale, lut, cfg)
    nt, kt = words.shape[0], words.shape[1]
    n, k = nt * tile, kt * tile
    out = torch.empty((n, k), dtype=torch.float32, device=words.device)  # [N, K]
    if n == 0 or k == 0:
        return out
    w16, sc, lut32 = _tensors(words, scale, lut)
    bn, bk = 64, 64
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    _dequant_kernel[grid](w16, sc, lut32, out, n, k, kt, **geo, BN=bn, BK=bk)
    return out


def linear(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor | None,
           bias: torch.Tensor | None, bits: int, L: int, V: int, tile: int, code: str, Q: int,
           tail_biting: bool, *, block_n: int | None = None, block_k: int | None = None,
           gemv: bool | None = None, split_k: int | None = None) -> torch.Tensor:
    """``x [..., K] -> x Ŵᵀ + b [..., N]`` in ``x.dtype``, decoding the weights block by block in registers; the
    keywords override the tile (``triton_uniform.launch_for``)."""
    cfg = TrellisConfig(bits=bits, L=L, V=V, tile=tile, code=code, Q=Q, tail_biting=tail_biting)
    geo = _geometry(words, scale, lut, cfg)
    kt = words.shape[1]
    n, k = words.shape[0] * tile, kt * tile
    if x.shape[-1] != k:
        raise ValueError(f"trellis linear: x has {x.shape[-1]} features, the weight {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    m = x2.shape[0]
    if m == 0 or n == 0:
        return torch.empty((*lead, n), dtype=x.dtype, device=x.device)
    w16, sc, lut32 = _tensors(words, scale, lut)
    t = _launch_for(m, block_n, block_k, gemv, split_k)
    y, sys_ = output_buffer(t, m, n, x)  # [M, N] or [split, M, N]
    grid = (triton.cdiv(n, t.bn), triton.cdiv(m, t.bm), t.split)
    in_kernel_bias = bias is not None and t.split == 1
    _linear_kernel[grid](x2, w16, sc, lut32, bias.contiguous() if in_kernel_bias else x2, y, m, n, k, kt,
                         x2.stride(0), n, sys_, t.k_chunk(k), **geo, HAS_BIAS=in_kernel_bias,
                         IEEE=x.dtype == torch.float32, BM=t.bm, BN=t.bn, BK=t.bk, GEMV=t.gemv)
    return finish_output(y, t, bias, x.dtype).reshape(*lead, n)


def grouped(x: torch.Tensor, counts: list[int] | tuple[int, ...], words: torch.Tensor, scale: torch.Tensor,
            lut: torch.Tensor | None, bits: int, L: int, V: int, tile: int, code: str, Q: int,
            tail_biting: bool, *, block_n: int | None = None, block_k: int | None = None,
            gemv: bool | None = None, split_k: int | None = None) -> torch.Tensor:
    """x ``[S, K]`` sorted by expert (``counts[e]`` rows for expert ``e``) times each expert of the stack ``words
    [E, N/tile, K/tile, W]``, ``scale [E, N]``, ``lut [E, 2^Q, 2]`` (hyb) -> ``[S, N]`` in ``x.dtype``, in one
    launch; experts with no rows get no program."""
    cfg = TrellisConfig(bits=bits, L=L, V=V, tile=tile, code=code, Q=Q, tail_biting=tail_biting)
    if words.dim() != 4 or words.shape[0] == 0:
        raise ValueError(f"trellis grouped: words {tuple(words.shape)} are not an expert stack [E, N/t, K/t, W]")
    e_all, nt, kt = words.shape[:3]
    n, k = nt * tile, kt * tile
    if tuple(scale.shape) != (e_all, n) or (lut is not None and lut.shape[0] != e_all):
        raise ValueError(f"trellis grouped: scale {tuple(scale.shape)} / lut {None if lut is None else tuple(lut.shape)}"
                         f" do not match {e_all} experts of {n} rows")
    geo = _geometry(words[0], scale[0], None if lut is None else lut[0], cfg)
    s = x.shape[0]
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"trellis grouped: x {tuple(x.shape)} is not [S, {k}]")
    if len(counts) != e_all or sum(counts) != s:
        raise ValueError(f"counts {list(counts)} do not split {s} rows over {e_all} experts")
    if s == 0 or n == 0:
        return torch.empty((s, n), dtype=x.dtype, device=x.device)
    w16, sc, lut32 = _tensors(words, scale, lut)  # [E, N/t, K/t, W], [E·N], [E, 2^Q, 2]
    t = _launch_for(max(counts), block_n, block_k, gemv, split_k)
    tiles = _tile_table(counts, t.bm, x.device)  # [T, 3]
    x2 = x.contiguous()
    y, sys_ = output_buffer(t, s, n, x)  # [S, N] or [split, S, N]
    grid = (triton.cdiv(n, t.bn), tiles.shape[0], t.split)
    _grouped_kernel[grid](x2, tiles, w16, sc, lut32, y, n, k, kt, x2.stride(0), n, sys_, t.k_chunk(k),
                          0 if lut is None else lut32[0].numel(), **geo, IEEE=x.dtype == torch.float32,
                          BM=t.bm, BN=t.bn, BK=t.bk, GEMV=t.gemv)
    return finish_output(y, t, None, x.dtype)
