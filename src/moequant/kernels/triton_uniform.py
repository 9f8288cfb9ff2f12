"""Triton kernels of the uniform (int-k group-wise) format: ``x Ŵᵀ + b`` straight from the packed codes.

Two kernels, one tile body (decode a ``[BN, BK]`` block of weights in registers, multiply it into a
``[BM, BN]`` float32 accumulator; the ``[N, K]`` matrix never exists):

- ``linear(x [M, K], codes, scale, zero, bias, ...) -> [M, N]``: one matrix. Decode (M of 1 to a few rows)
  and prefill use the same kernel with different ``BM``.
- ``grouped(x [S, K], counts, codes [E, N, ·], scale [E, N, G], zero, ...) -> [S, N]``: the routed
  experts of an MoE layer in ONE launch: the ``S`` (token, slot) rows are already sorted by expert
  (``nn.quant_experts.ExpertRouting``); each program takes ``BM`` rows of one expert (a host-built tile
  table: expert, first row, end row), so only routed experts are read.

Layout (``formats.uniform``, ``formats.bitpack``): ``codes`` uint8 ``[..., N, packed_len(K, b)]``, code
``k`` of a row at bit ``k·b`` of the row's little-endian bit stream (a code spans at most two bytes);
``scale`` ``[..., N, G]`` (fp16/bf16/fp32), ``G = ceil(K / gs)``; ``zero`` uint8 ``[..., N,
packed_len(G, b)]`` (asymmetric) or ``None`` with the fixed zero point ``zc`` of the symmetric grid.
A weight is ``(q − z)·s`` in float32, cast to ``x.dtype`` (as the reference decodes it), and the
products accumulate in float32 (``input_precision="ieee"`` for float32 inputs: no TF32).

These run on CUDA tensors (registered as the ``cuda`` kernel of ``moequant::uniform_linear`` by
``kernels.uniform``) and, for tests, on CPU tensors under ``TRITON_INTERPRET=1`` — which Triton reads when
this module is imported, so import it only through ``load()`` after the variable is set.
"""

from __future__ import annotations

import dataclasses

import triton
import triton.language as tl
import torch


@triton.jit
def _decode_tile(codes_ptr, scale_ptr, zero_ptr, rn, rk, N, K, row_bytes, G, zrow_bytes, zc,
                 BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr):
    """Weights ``[BN, BK]`` float32 of rows ``rn`` and columns ``rk`` (zero outside the matrix)."""
    nmask = rn < N
    kmask = rk < K
    m2 = nmask[:, None] & kmask[None, :]
    row = codes_ptr + rn[:, None].to(tl.int64) * row_bytes  # [BN, 1]
    bit = rk * BITS  # [BK]
    byte = bit >> 3
    b0 = tl.load(row + byte[None, :], mask=m2, other=0).to(tl.int32)
    if 8 % BITS == 0:  # 1, 2, 4, 8 bits: a code never leaves its byte
        q = (b0 >> (bit & 7)[None, :]) & ((1 << BITS) - 1)
    else:
        nxt = m2 & ((byte + 1) < row_bytes)[None, :]
        b1 = tl.load(row + byte[None, :] + 1, mask=nxt, other=0).to(tl.int32)
        q = ((b0 | (b1 << 8)) >> (bit & 7)[None, :]) & ((1 << BITS) - 1)
    g = rk // GS  # [BK]
    s = tl.load(scale_ptr + rn[:, None].to(tl.int64) * G + g[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_ZERO:
        zrow = zero_ptr + rn[:, None].to(tl.int64) * zrow_bytes
        zbit = g * BITS
        zbyte = zbit >> 3
        z0 = tl.load(zrow + zbyte[None, :], mask=m2, other=0).to(tl.int32)
        if 8 % BITS == 0:
            z = (z0 >> (zbit & 7)[None, :]) & ((1 << BITS) - 1)
        else:
            znxt = m2 & ((zbyte + 1) < zrow_bytes)[None, :]
            z1 = tl.load(zrow + zbyte[None, :] + 1, mask=znxt, other=0).to(tl.int32)
            z = ((z0 | (z1 << 8)) >> (zbit & 7)[None, :]) & ((1 << BITS) - 1)
        w = (q.to(tl.float32) - z.to(tl.float32)) * s
    else:
        w = (q.to(tl.float32) - zc) * s
    return w


@triton.jit
def _accumulate(acc, x_ptr, sxm, rm, row_end, codes_ptr, scale_ptr, zero_ptr, rn, N, K, row_bytes, G, zrow_bytes,
                zc, BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr, BK: tl.constexpr,
                IEEE: tl.constexpr, GEMV: tl.constexpr):
    """``acc [BM, BN] += x[rm] Ŵ[rn]ᵀ`` over all of ``K``. ``GEMV`` (``BM == 1``): products summed along ``K`` in
    float32 without ``tl.dot`` (whose 16-row minimum would read 15 rows of padding per decode step)."""
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        xm = (rm < row_end)[:, None] & (rk < K)[None, :]
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * sxm + rk[None, :], mask=xm, other=0.0)  # [BM, BK]
        w = _decode_tile(codes_ptr, scale_ptr, zero_ptr, rn, rk, N, K, row_bytes, G, zrow_bytes, zc,
                         BITS, GS, HAS_ZERO).to(x.dtype)  # [BN, BK]
        if GEMV:
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]  # x [1, BK] -> [1, BN]
        elif IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    return acc


@triton.jit
def _linear_kernel(x_ptr, codes_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, M, N, K, row_bytes, G, zrow_bytes,
                   sxm, sym, zc, BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, GEMV: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)  # [BN]
    rm = tl.program_id(1) * BM + tl.arange(0, BM)  # [BM]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _accumulate(acc, x_ptr, sxm, rm, M, codes_ptr, scale_ptr, zero_ptr, rn, N, K, row_bytes, G, zrow_bytes,
                      zc, BITS, GS, HAS_ZERO, BK, IEEE, GEMV)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ym = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=ym)


@triton.jit
def _grouped_kernel(x_ptr, tiles_ptr, codes_ptr, scale_ptr, zero_ptr, y_ptr, N, K, row_bytes, G, zrow_bytes,
                    sxm, sym, zc, BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr,
                    IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    GEMV: tl.constexpr):
    t = tl.program_id(1)
    e = tl.load(tiles_ptr + 3 * t).to(tl.int64)
    row0 = tl.load(tiles_ptr + 3 * t + 1)
    row_end = tl.load(tiles_ptr + 3 * t + 2)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = row0 + tl.arange(0, BM)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _accumulate(acc, x_ptr, sxm, rm, row_end, codes_ptr + e * N * row_bytes, scale_ptr + e * N * G,
                      zero_ptr + e * N * zrow_bytes, rn, N, K, row_bytes, G, zrow_bytes, zc, BITS, GS, HAS_ZERO,
                      BK, IEEE, GEMV)
    ym = (rm < row_end)[:, None] & (rn < N)[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=ym)


def block_m(m: int) -> int:
    """Rows of activations per program: 16 (tl.dot's minimum) up to 64 for prefill-sized batches."""
    return 16 if m <= 16 else 32 if m <= 32 else 64


# Tile of a program when every matrix (or expert) has one row of activations: batch-1 decode. Narrow column
# blocks give the GPU enough programs to keep its memory busy (N=4096 in 64-column blocks is 64 programs for
# 132 multiprocessors); see BENCHMARKS.md "GPU kernels" for the sweep that chose them.
GEMV_BN, GEMV_BK = 16, 128


@dataclasses.dataclass(frozen=True)
class Launch:
    """One launch's tile: ``bm`` rows of activations, ``bn`` output columns, ``bk`` reduction columns per step,
    ``gemv`` (``bm == 1``, no ``tl.dot``)."""

    bm: int
    bn: int
    bk: int
    gemv: bool


def launch_for(rows: int, block_n: int | None = None, block_k: int | None = None,
               gemv: bool | None = None) -> Launch:
    """The tile for ``rows`` activation rows per matrix (the most any expert has, for grouped launches);
    ``block_n`` / ``block_k`` / ``gemv`` override the rule (benchmarks sweep them)."""
    gemv = rows <= 1 if gemv is None else gemv
    if gemv:
        return Launch(1, block_n or GEMV_BN, block_k or GEMV_BK, True)
    return Launch(block_m(rows), block_n or 64, block_k or 64, False)


def _geometry(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> tuple[int, int, int]:
    """(row bytes of codes, groups G, row bytes of zero codes) of one matrix's stored tensors."""
    return codes.shape[-1], scale.shape[-1], 0 if zero is None else zero.shape[-1]


def linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           bias: torch.Tensor | None, bits: int, group_size: int, in_features: int, zc: float, *,
           block_n: int | None = None, block_k: int | None = None, gemv: bool | None = None) -> torch.Tensor:
    """``x [..., K] -> [..., N]`` in ``x.dtype`` for one uniform matrix (codes ``[N, ·]``, scale ``[N, G]``);
    the keywords override the tile (``launch_for``)."""
    k = in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    m, n = x2.shape[0], codes.shape[0]
    row_bytes, groups, zrow = _geometry(codes, scale, zero)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)  # [M, N]
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    t = launch_for(m, block_n, block_k, gemv)
    grid = (triton.cdiv(n, t.bn), triton.cdiv(m, t.bm))
    _linear_kernel[grid](x2, codes.contiguous(), scale.contiguous(), codes if zero is None else zero.contiguous(),
                         x2 if bias is None else bias.contiguous(), y, m, n, k, row_bytes, groups, zrow,
                         x2.stride(0), y.stride(0), float(zc), BITS=bits, GS=group_size, HAS_ZERO=zero is not None,
                         HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BM=t.bm, BN=t.bn, BK=t.bk,
                         GEMV=t.gemv)
    return y.reshape(*lead, n)


def tile_table(counts: list[int] | tuple[int, ...], block_m: int, device: torch.device) -> torch.Tensor:
    """int32 ``[T, 3]``: (expert, first row, end row) of every ``block_m``-row tile of the expert-sorted rows
    (experts with no rows have no tile)."""
    rows: list[tuple[int, int, int]] = []
    start = 0
    for e, c in enumerate(counts):
        for r in range(start, start + c, block_m):
            rows.append((e, r, start + c))
        start += c
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1, 3)


def grouped(x: torch.Tensor, counts: list[int] | tuple[int, ...], codes: torch.Tensor, scale: torch.Tensor,
            zero: torch.Tensor | None, bits: int, group_size: int, in_features: int, zc: float, *,
            block_n: int | None = None, block_k: int | None = None, gemv: bool | None = None) -> torch.Tensor:
    """x ``[S, K]`` sorted by expert (``counts[e]`` rows for expert ``e``), codes ``[E, N, ·]`` -> ``[S, N]``;
    the keywords override the tile (``launch_for``)."""
    s, k = x.shape
    e_all, n = codes.shape[0], codes.shape[1]
    if len(counts) != e_all or sum(counts) != s:
        raise ValueError(f"counts {list(counts)} do not split {s} rows over {e_all} experts")
    row_bytes, groups, zrow = _geometry(codes, scale, zero)
    y = torch.empty((s, n), dtype=x.dtype, device=x.device)  # [S, N]
    if s == 0 or n == 0:
        return y
    t = launch_for(max(counts), block_n, block_k, gemv)
    tiles = tile_table(counts, t.bm, x.device)  # [T, 3]
    x2 = x.contiguous()
    grid = (triton.cdiv(n, t.bn), tiles.shape[0])
    _grouped_kernel[grid](x2, tiles, codes.contiguous(), scale.contiguous(),
                          codes if zero is None else zero.contiguous(), y, n, k, row_bytes, groups, zrow,
                          x2.stride(0), y.stride(0), float(zc), BITS=bits, GS=group_size, HAS_ZERO=zero is not None,
                          IEEE=x.dtype == torch.float32, BM=t.bm, BN=t.bn, BK=t.bk, GEMV=t.gemv)
    return y
