"""Pack unsigned k-bit codes densely along the last dim, crossing byte boundaries where k does not
divide 8 (3-bit: 8 codes in 3 bytes). Little-endian bit order: code i of a chunk occupies bits
``[k*i, k*(i+1))`` of the chunk's little-endian integer.

Layout contract (format ``bitpack-v1``): codes ``[..., n]`` -> bytes ``[..., packed_len(n, k)]`` (uint8),
with ``n`` padded with zero codes up to a whole chunk of ``8 / gcd(k, 8)`` codes.
"""

from __future__ import annotations

import math

import torch


def chunk_geometry(bits: int) -> tuple[int, int]:
    """(codes per chunk, bytes per chunk) for ``bits``-bit codes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bit width must be in 1..8, got {bits}")
    g = math.gcd(bits, 8)
    return 8 // g, bits // g


def packed_len(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits occupy (whole chunks)."""
    codes, nbytes = chunk_geometry(bits)
    return -(-n // codes) * nbytes


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes ``[..., n]`` (any integer dtype, values in ``[0, 2^bits)``) -> uint8 ``[..., packed_len(n, bits)]``."""
    per, nbytes = chunk_geometry(bits)
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    if bits == 8:  # one code per byte: the layout is the codes themselves (no int64 copy of a large table)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 255):
            raise ValueError("codes out of range for 8-bit packing")
        return codes.to(torch.uint8, copy=True).contiguous()
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    chunks = -(-n // per)
    pad = chunks * per - n
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*lead, chunks, per)  # [..., chunks, per]
    shifts = torch.arange(per, dtype=torch.int64, device=c.device) * bits
    word = (c << shifts).sum(-1)  # [..., chunks] (at most 56 bits: 8 codes x 7 bits; 8-bit chunks hold 1 code)
    byte_shifts = torch.arange(nbytes, dtype=torch.int64, device=c.device) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # [..., chunks, nbytes]
    return out.reshape(*lead, chunks * nbytes).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 ``[..., packed_len(n, bits)]`` -> codes ``[..., n]`` as uint8."""
    per, nbytes = chunk_geometry(bits)
    lead = packed.shape[:-1]
    if packed.shape[-1] != packed_len(n, bits):
        raise ValueError(f"packed length {packed.shape[-1]} does not hold {n} codes of {bits} bits")
    chunks = packed.shape[-1] // nbytes
    if bits == 8:
        return packed[..., :n].clone()
    if per * bits == 8:  # 1, 2, 4 bits: one byte per chunk, plain shifts in uint8
        shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
        out = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., nbytes, per]
        return out.reshape(*lead, chunks * per)[..., :n]
    b = packed.to(torch.int64).reshape(*lead, chunks, nbytes)
    byte_shifts = torch.arange(nbytes, dtype=torch.int64, device=packed.device) * 8
    word = (b << byte_shifts).sum(-1)  # [..., chunks]
    shifts = torch.arange(per, dtype=torch.int64, device=packed.device) * bits
    out = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., chunks, per]
    return out.reshape(*lead, chunks * per)[..., :n].to(torch.uint8)
