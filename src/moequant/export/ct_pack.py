"""compressed-tensors ``pack-quantized`` tensors from moequant's uniform codes: pure packing math.

Stored tensors of one quantized linear ``[N, K]`` with ``G`` groups per row (the contract vLLM's WNA16
path and compressed-tensors' ``PackedQuantizationCompressor`` read):

- ``weight_packed``: int32 ``[N, W(K)]``, each row's ``K`` unsigned ``b``-bit codes packed along ``K``;
- ``weight_scale``: ``[N, G]`` in the serving dtype;
- ``weight_zero_point`` (asymmetric only): int32 ``[W(N), G]``, the unsigned ``b``-bit zero points packed
  along the *output rows* (dim 0);
- ``weight_shape``: int64 ``[2]`` = ``[N, K]``.

compressed-tensors reads an unsigned code ``u`` as the signed ``u - 2^(b-1)`` and decodes
``(q_signed - zp_signed) * scale``. moequant's codes ``q`` and zero points ``z`` are unsigned in
``[0, 2^b - 1]`` and decode as ``(q - z) * s`` (asymmetric) or ``(q - 2^(b-1)) * s`` (the symmetric
midtread grid), so both are stored unchanged: ``(q - 2^(b-1)) - (z - 2^(b-1)) = q - z``.

Two packings of the int32 words (``Layout``), which differ only when ``b`` does not divide 32 (3, 5, 6,
7 bits); for 2, 4 and 8 bits they are the same bytes.
"""

from __future__ import annotations

import re
import sys
from enum import Enum

import torch

from moequant.formats.bitpack import pack

# The first compressed-tensors release whose pack-quantized words are packed densely.
DENSE_SINCE = (0, 18)


class Layout(str, Enum):
    """How ``b``-bit codes fill int32 words."""

    WORD = "word"
    """``32 // b`` codes per word, code ``j`` of a word at bits ``[j*b, (j+1)*b)``, the top ``32 mod b``
    bits zero: ``W(n) = ceil(n / (32 // b))`` words. compressed-tensors <= 0.17 (the version vLLM 0.34 pins)."""
    DENSE = "dense"
    """One little-endian bit stream, code ``i`` at bits ``[i*b, (i+1)*b)`` of it, crossing word
    boundaries: ``W(n) = ceil(n * b / 32)`` words. compressed-tensors >= 0.18. The same stream as
    moequant's own ``bitpack`` codes."""


def parse_version(version: str) -> tuple[int, ...]:
    """``"0.17.0"`` -> ``(0, 17, 0)``; ``ValueError`` unless it is dot-separated integers (at least two)."""
    if not re.fullmatch(r"\d+(\.\d+)+", version):
        raise ValueError(f"compressed-tensors version {version!r} is not of the form MAJOR.MINOR[.PATCH]")
    return tuple(int(p) for p in version.split("."))


def layout_for_version(version: str) -> Layout:
    """The packing a compressed-tensors release reads."""
    return Layout.DENSE if parse_version(version)[:2] >= DENSE_SINCE else Layout.WORD


def packed_words(n: int, bits: int, layout: Layout) -> int:
    """int32 words that ``n`` codes of ``bits`` bits take in ``layout``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bit width must be in 1..8, got {bits}")
    if layout == Layout.DENSE:
        return -(-n * bits // 32)
    return -(-n // (32 // bits))


def pack_int32(codes: torch.Tensor, bits: int, layout: Layout) -> torch.Tensor:
    """codes ``[..., n]`` (unsigned, ``< 2^bits``) -> int32 ``[..., packed_words(n, bits, layout)]``, packed
    along the last dim."""
    *lead, n = codes.shape
    words = packed_words(n, bits, layout)
    if layout == Layout.DENSE:
        stream = pack(codes, bits)  # [..., packed_len(n, bits)] uint8: the little-endian bit stream
        m = min(stream.shape[-1], 4 * words)  # whole bitpack chunks may end short of the last word or past it
        buf = torch.zeros(*lead, 4 * words, dtype=torch.uint8)  # [..., 4W], fresh and contiguous
        buf[..., :m] = stream[..., :m]
        stream = buf
        if sys.byteorder != "little":  # int32 views read native order; the stream is little-endian
            stream = stream.reshape(*lead, words, 4).flip(-1).reshape(*lead, 4 * words)
        return stream.view(torch.int32)  # [..., W]
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    per = 32 // bits
    c = torch.nn.functional.pad(c, (0, words * per - n)).reshape(*lead, words, per)  # [..., W, per]
    shifts = torch.arange(per, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1)  # [..., W], in [0, 2^32)
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)  # the same 32 bits, signed


def ct_linear_tensors(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                      layout: Layout) -> dict[str, torch.Tensor]:
    """One linear's compressed-tensors tensors from unpacked moequant parts: codes ``[N, K]``, scale
    ``[N, G]`` (already in the serving dtype), zero ``[N, G]`` or None (symmetric midtread grid)."""
    n, k = codes.shape
    if scale.dim() != 2 or scale.shape[0] != n or (zero is not None and zero.shape != scale.shape):
        raise ValueError(f"scale {tuple(scale.shape)} / zero {None if zero is None else tuple(zero.shape)} "
                         f"do not fit codes {tuple(codes.shape)}")
    out = {"weight_packed": pack_int32(codes, bits, layout),  # [N, W(K)]
           "weight_scale": scale.contiguous(),  # [N, G]
           "weight_shape": torch.tensor([n, k], dtype=torch.int64)}  # [2]
    if zero is not None:
        out["weight_zero_point"] = pack_int32(zero.t(), bits, layout).t().contiguous()  # [W(N), G]
    return out

