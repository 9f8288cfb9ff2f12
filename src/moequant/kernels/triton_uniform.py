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
def _accumulate(acc, x_ptr, sxm, rm, row_end, codes_ptr, scale_ptr, zero_ptr, rn, N, K, k_lo, k_hi, row_bytes, G,
                zrow_bytes, zc, BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr, BK: tl.constexpr,
                IEEE: tl.constexpr, GEMV: tl.constexpr):
    """``acc [BM, BN] += x[rm] Ŵ[rn]ᵀ`` over columns ``[k_lo, k_hi)`` of ``K`` (``k_lo`` a multiple of ``BK``).
    ``GEMV`` (``BM == 1``): products summed along ``K`` in float32 without ``tl.dot`` (whose 16-row minimum would
    read 15 rows of padding per decode step)."""
    for k0 in range(k_lo, k_hi, BK):
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
                   sxm, sym, sys, k_chunk, zc, BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr,
                   HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, GEMV: tl.constexpr):
    """Program ``(j, i, s)``: output columns of block ``j``, rows of block ``i``, reduction chunk ``s`` (split-K:
    ``y`` is then a float32 ``[S, M, N]`` of partial sums, ``sys`` apart, and the host sums them)."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)  # [BN]
    rm = tl.program_id(1) * BM + tl.arange(0, BM)  # [BM]
    k_lo = tl.program_id(2) * k_chunk
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _accumulate(acc, x_ptr, sxm, rm, M, codes_ptr, scale_ptr, zero_ptr, rn, N, K, k_lo,
                      tl.minimum(k_lo + k_chunk, K), row_bytes, G, zrow_bytes, zc, BITS, GS, HAS_ZERO, BK, IEEE, GEMV)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ym = (rm < M)[:, None] & (rn < N)[None, :]
    y_ptr += tl.program_id(2).to(tl.int64) * sys
    tl.store(y_ptr + rm[:, None].to(tl.int64) * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=ym)


@triton.jit
def _grouped_kernel(x_ptr, tiles_ptr, codes_ptr, scale_ptr, zero_ptr, y_ptr, N, K, row_bytes, G, zrow_bytes,
                    sxm, sym, sys, k_chunk, zc, BITS: tl.constexpr, GS: tl.constexpr, HAS_ZERO: tl.constexpr,
                    IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    GEMV: tl.constexpr):
    t = tl.program_id(1)
    e = tl.load(tiles_ptr + 3 * t).to(tl.int64)
    row0 = tl.load(tiles_ptr + 3 * t + 1)
    row_end = tl.load(tiles_ptr + 3 * t + 2)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = row0 + tl.arange(0, BM)
    k_lo = tl.program_id(2) * k_chunk
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _accumulate(acc, x_ptr, sxm, rm, row_end, codes_ptr + e * N * row_bytes, scale_ptr + e * N * G,
                      zero_ptr + e * N * zrow_bytes, rn, N, K, k_lo, tl.minimum(k_lo + k_chunk, K), row_bytes, G,
                      zrow_bytes, zc, BITS, GS, HAS_ZERO, BK, IEEE, GEMV)
    ym = (rm < row_end)[:, None] & (rn < N)[None, :]
    y_ptr += tl.program_id(2).to(tl.int64) * sys
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
    ``gemv`` (``bm == 1``, no ``tl.dot``), ``split`` programs along ``K`` per output tile (split-K: float32
    partial sums added on the host; 1 = none)."""

    bm: int
    bn: int
    bk: int
    gemv: bool
    split: int = 1

    def k_chunk(self, k: int) -> int:
        """Columns of ``K`` per split program: a multiple of ``bk`` (the last chunk may be shorter or empty)."""
        return triton.cdiv(triton.cdiv(k, self.split), self.bk) * self.bk


def launch_for(rows: int, block_n: int | None = None, block_k: int | None = None,
               gemv: bool | None = None, split_k: int | None = None) -> Launch:
    """The tile for ``rows`` activation rows per matrix (the most any expert has, for grouped launches);
    ``block_n`` / ``block_k`` / ``gemv`` / ``split_k`` override the rule (benchmarks sweep them)."""
    gemv = rows <= 1 if gemv is None else gemv
    split = split_k or 1
    if split < 1:
        raise ValueError(f"split_k must be >= 1, got {split}")
    if gemv:
        return Launch(1, block_n or GEMV_BN, block_k or GEMV_BK, True, split)
    return Launch(block_m(rows), block_n or 64, block_k or 64, False, split)


def output_buffer(t: Launch, rows: int, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The kernel's output buffer and its split stride: ``[rows, N]`` in ``x.dtype``, or float32 partial sums
    ``[split, rows, N]`` under split-K."""
    if t.split == 1:
        return torch.empty((rows, n), dtype=x.dtype, device=x.device), 0
    return torch.empty((t.split, rows, n), dtype=torch.float32, device=x.device), rows * n


def finish_output(y: torch.Tensor, t: Launch, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Split-K: sum the partial sums (float32), add the bias, cast; else ``y`` as the kernel wrote it."""
    if t.split == 1:
        return y
    out = y.sum(0)  # [rows, N] float32
    if bias is not None:
        out += bias.float()
    return out.to(dtype)


def _geometry(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> tuple[int, int, int]:
    """(row bytes of codes, groups G, row bytes of zero codes) of one matrix's stored tensors."""
    return codes.shape[-1], scale.shape[-1], 0 if zero is None else zero.shape[-1]


def linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           bias: torch.Tensor | None, bits: int, group_size: int, in_features: int, zc: float, *,
           block_n: int | None = None, block_k: int | None = None, gemv: bool | None = None,
           split_k: int | None = None) -> torch.Tensor:
    """``x [..., K] -> [..., N]`` in ``x.dtype`` for one uniform matrix (codes ``[N, ·]``, scale ``[N, G]``);
    the keywords override the tile (``launch_for``)."""
    k = in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    m, n = x2.shape[0], codes.shape[0]
    row_bytes, groups, zrow = _geometry(codes, scale, zero)
    if m == 0 or n == 0:
        return torch.empty((*lead, n), dtype=x.dtype, device=x.device)
    t = launch_for(m, block_n, block_k, gemv, split_k)
    y, sys_ = output_buffer(t, m, n, x)  # [M, N] or [S, M, N]
    grid = (triton.cdiv(n, t.bn), triton.cdiv(m, t.bm), t.split)
    in_kernel_bias = bias is not None and t.split == 1
    _linear_kernel[grid](x2, codes.contiguous(), scale.contiguous(), codes if zero is None else zero.contiguous(),
                         bias.contiguous() if in_kernel_bias else x2, y, m, n, k, row_bytes, groups, zrow,
                         x2.stride(0), n, sys_, t.k_chunk(k), float(zc), BITS=bits, GS=group_size,
                         HAS_ZERO=zero is not None, HAS_BIAS=in_kernel_bias, IEEE=x.dtype == torch.float32, BM=t.bm,
                         BN=t.bn, BK=t.bk, GEMV=t.gemv)
    return finish_output(y, t, bias, x.dtype).reshape(*lead, n)


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
            block_n: int | None = None, block_k: int | None = None, gemv: bool | None = None,
            split_k: int | None = None) -> torch.Tensor:
    """x ``[S, K]`` sorted by expert (``counts[e]`` rows for expert ``e``), codes ``[E, N, ·]`` -> ``[S, N]``;
    the keywords override the tile (``launch_for``)."""
    s, k = x.shape
    e_all, n = codes.shape[0], codes.shape[1]
    if len(counts) != e_all or sum(counts) != s:
        raise ValueError(f"counts {list(counts)} do not split {s} rows over {e_all} experts")
    row_bytes, groups, zrow = _geometry(codes, scale, zero)
    if s == 0 or n == 0:
        return torch.empty((s, n), dtype=x.dtype, device=x.device)
    t = launch_for(max(counts), block_n, block_k, gemv, split_k)
    tiles = tile_table(counts, t.bm, x.device)  # [T, 3]
    x2 = x.contiguous()
    y, sys_ = output_buffer(t, s, n, x)  # [S, N] or [split, S, N]
    grid = (triton.cdiv(n, t.bn), tiles.shape[0], t.split)
    _grouped_kernel[grid](x2, tiles, codes.contiguous(), scale.contiguous(),
                          codes if zero is None else zero.contiguous(), y, n, k, row_bytes, groups, zrow,
                          x2.stride(0), n, sys_, t.k_chunk(k), float(zc), BITS=bits, GS=group_size,
                          HAS_ZERO=zero is not None, IEEE=x.dtype == torch.float32, BM=t.bm, BN=t.bn, BK=t.bk,
                          GEMV=t.gemv)
    return finish_output(y, t, None, x.dtype)
