"""The exact GGUF block bytes of each ``codecs.kquant`` type (ggml's ``block_*`` structs, ggml-common.h).

Codes ``u`` are the unsigned codes of ``codecs.kquant``; fp16 fields are little-endian; multi-bit codes
are packed low bits first. Per block, fields in stored order (``u[i]``: the code of the block's weight
``i``; "nib(a, b)" is one byte ``a | b << 4``):

- Q2_K (84 B): scales[16] ``sc_j | mn_j << 4``; qs[64]: byte ``32h + l`` holds ``u[128h + 32j + l]`` at
  bits ``2j`` (j = 0..3); d, dmin.
- Q3_K (110 B): hmask[32]: bit ``j`` of byte ``l`` is bit 2 of ``u[32j + l]``; qs[64]: the low 2 bits as
  Q2_K's qs; scales[12]: the 16 values ``v = sc + 32`` (6 bits): bytes 0..7 nib(v[i] & 15, v[i+8] & 15),
  bytes 8..11: byte ``i`` holds ``v[4k + i] >> 4`` at bits ``2k``; d.
- Q4_K (144 B): d, dmin; scales[12] (8 sc, 8 mn, 6 bits): byte ``j`` (j<4) ``sc[j] | (sc[j+4] >> 4) << 6``,
  byte ``4+j`` ``mn[j] | (mn[j+4] >> 4) << 6``, byte ``8+j`` nib(sc[j+4] & 15, mn[j+4] & 15); qs[128]:
  byte ``32c + l`` nib(u[64c + l], u[64c + 32 + l]).
- Q5_K (176 B): d, dmin, scales[12] as Q4_K; qh[32]: bit ``j`` of byte ``l`` is bit 4 of ``u[32j + l]``;
  qs[128]: the low 4 bits as Q4_K's qs.
- Q6_K (210 B): ql[128]: byte ``64h + l`` nib(u[128h + l] & 15, u[128h + 64 + l] & 15); qh[64]: byte
  ``32h + l`` holds ``u[128h + 32j + l] >> 4`` at bits ``2j``; scales[16] int8; d.
- Q4_0 / IQ4_NL (18 B): d; qs[16] nib(u[l], u[l+16]).  Q8_0 (34 B): d; qs[32] int8 ``u - 128``.
- Q5_0 (22 B): d; qh[4]: a little-endian uint32 whose bit ``i`` is bit 4 of ``u[i]``; qs[16] nib of the low
  4 bits.  Q5_1 (24 B): d, m, then qh and qs as Q5_0.
- F16: the weights as little-endian float16.
"""

from __future__ import annotations

import torch

from moequant.codecs.kquant import BlockParams, GgmlType

# per type: the stored fields in order, with their byte counts
_FIELDS: dict[str, tuple[tuple[str, int], ...]] = {
    "q2_k": (("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2)),
    "q3_k": (("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2)),
    "q4_k": (("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128)),
    "q5_k": (("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128)),
    "q6_k": (("ql", 128), ("qh", 64), ("scales", 16), ("d", 2)),
    "q4_0": (("d", 2), ("qs", 16)),
    "iq4_nl": (("d", 2), ("qs", 16)),
    "q5_0": (("d", 2), ("qh", 4), ("qs", 16)),
    "q5_1": (("d", 2), ("dmin", 2), ("qh", 4), ("qs", 16)),
    "q8_0": (("d", 2), ("qs", 32)),
}


def _bits_in(u: torch.Tensor, width: int) -> torch.Tensor:
    """u int32 ``[..., n, L]`` (values < 2^width, ``n * width == 8``) -> bytes ``[..., L]``: ``u[..., j, :]``
    at bits ``width * j``."""
    out = torch.zeros(u.shape[:-2] + u.shape[-1:], dtype=torch.int32, device=u.device)
    for j in range(u.shape[-2]):
        out |= u[..., j, :] << (width * j)
    return out


def _bits_out(b: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """bytes ``[..., L]`` (uint8 or int32) -> ``[..., n, L]``: the inverse of ``_bits_in``."""
    mask = (1 << width) - 1
    return torch.stack([(b >> (width * j)) & mask for j in range(n)], dim=-2)


def _fp16_in(v: torch.Tensor) -> torch.Tensor:
    """float16 ``[..., B]`` -> int32 bytes ``[..., B, 2]`` (little-endian)."""
    return v.to(torch.float16).contiguous().unsqueeze(-1).view(torch.uint8).to(torch.int32)


def _fp16_out(b: torch.Tensor) -> torch.Tensor:
    """bytes ``[..., B, 2]`` -> float16 ``[..., B]``."""
    return b.to(torch.uint8).contiguous().view(torch.float16).squeeze(-1)


def _scales_k4_in(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 8 scales and 8 mins of 6 bits ``[..., 8]`` -> the 12 bytes."""
    lo_s, hi_s, lo_m, hi_m = sc[..., :4], sc[..., 4:], mn[..., :4], mn[..., 4:]
    return torch.cat([(lo_s & 63) | ((hi_s >> 4) << 6), (lo_m & 63) | ((hi_m >> 4) << 6),
                      (hi_s & 15) | ((hi_m & 15) << 4)], dim=-1)


def _scales_k4_out(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b03, b47, b811 = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = torch.cat([b03 & 63, (b811 & 15) | ((b03 >> 6) << 4)], dim=-1)  # [..., 8]
    mn = torch.cat([b47 & 63, (b811 >> 4) | ((b47 >> 6) << 4)], dim=-1)  # [..., 8]
    return sc, mn


def _scales_q3_in(v: torch.Tensor) -> torch.Tensor:
    """Q3_K: 16 unsigned 6-bit values ``[..., 16]`` -> the 12 bytes."""
    low = (v[..., :8] & 15) | ((v[..., 8:] & 15) << 4)  # [..., 8]
    high = _bits_in((v >> 4).unflatten(-1, (4, 4)), 2)  # [..., 4]: byte i holds v[4k + i] >> 4 at bits 2k
    return torch.cat([low, high], dim=-1)


def _scales_q3_out(b: torch.Tensor) -> torch.Tensor:
    low = torch.cat([b[..., :8] & 15, b[..., :8] >> 4], dim=-1)  # [..., 16]
    high = _bits_out(b[..., 8:12], 4, 2).flatten(-2)  # [..., 16]
    return low | (high << 4)


def _nibbles_in(u: torch.Tensor, half: int) -> torch.Tensor:
    """``[..., 2*half*c]`` -> ``[..., half*c]``: byte ``half*i + l`` = nib(u[2*half*i + l], u[2*half*i + half + l])."""
    return _bits_in(u.unflatten(-1, (-1, 2, half)), 4).flatten(-2)


def _nibbles_out(b: torch.Tensor, half: int) -> torch.Tensor:
    return _bits_out(b.unflatten(-1, (-1, half)), 2, 4).flatten(-3)


def _crumbs_in(u: torch.Tensor) -> torch.Tensor:
    """2-bit values ``[..., 128h + 32j + l]`` -> ``[..., 32h + l]`` with value ``j`` at bits ``2j`` (the
    Q2_K/Q3_K qs and the Q6_K qh pattern)."""
    return _bits_in(u.unflatten(-1, (-1, 4, 32)), 2).flatten(-2)


def _crumbs_out(b: torch.Tensor) -> torch.Tensor:
    return _bits_out(b.unflatten(-1, (-1, 32)), 4, 2).flatten(-3)


def _plane_in(bit: torch.Tensor, width: int) -> torch.Tensor:
    """One bit per weight ``[..., width*j + l]`` -> ``[..., width]``: bit ``j`` of byte ``l``."""
    return _bits_in(bit.unflatten(-1, (-1, width)), 1)


def _plane_out(b: torch.Tensor) -> torch.Tensor:
    return _bits_out(b, 8, 1).flatten(-2)


def pack_blocks(t: GgmlType, codes: torch.Tensor, p: BlockParams) -> torch.Tensor:
    """codes uint8 ``[..., N, K]`` and the parameters -> the GGUF bytes, uint8 ``[..., N, K/block*block_bytes]``."""
    *lead, n, k = codes.shape
    u = codes.reshape(*lead, n, k // t.block, t.block).to(torch.int32)  # [..., N, B, block]
    f: dict[str, torch.Tensor] = {"d": _fp16_in(p.d)}
    if p.dmin is not None:
        f["dmin"] = _fp16_in(p.dmin)
    name = t.name
    if name in ("q2_k", "q3_k"):
        f["qs"] = _crumbs_in(u & 3)  # [..., 64]
    if name == "q2_k":
        f["scales"] = p.scales.to(torch.int32) | (p.mins.to(torch.int32) << 4)
    elif name == "q3_k":
        f["hmask"] = _plane_in(u >> 2, 32)
        f["scales"] = _scales_q3_in(p.scales.to(torch.int32) + 32)
    elif name in ("q4_k", "q5_k"):
        f["scales"] = _scales_k4_in(p.scales.to(torch.int32), p.mins.to(torch.int32))
        f["qs"] = _nibbles_in(u & 15, 32)  # [..., 128]
        if name == "q5_k":
            f["qh"] = _plane_in(u >> 4, 32)
    elif name == "q6_k":
        f["ql"] = _nibbles_in(u & 15, 64)  # [..., 128]
        f["qh"] = _crumbs_in(u >> 4)  # [..., 64]
        f["scales"] = p.scales.to(torch.int32) & 0xFF
    elif name in ("q4_0", "iq4_nl", "q5_0", "q5_1"):
        f["qs"] = _nibbles_in(u & 15, 16)  # [..., 16]
        if name in ("q5_0", "q5_1"):
            f["qh"] = _bits_in((u >> 4).unflatten(-1, (4, 8)).transpose(-1, -2), 1)  # [..., 4]: LE uint32
    elif name == "q8_0":
        f["qs"] = u ^ 0x80
    else:
        raise ValueError(f"no block layout for {name}")
    raw = torch.cat([f[field].reshape(*lead, n, k // t.block, size) for field, size in _FIELDS[name]], dim=-1)
    return raw.to(torch.uint8).reshape(*lead, n, (k // t.block) * t.block_bytes)


def unpack_blocks(t: GgmlType, raw: torch.Tensor) -> tuple[torch.Tensor, BlockParams]:
    """GGUF bytes uint8 ``[..., N, B*block_bytes]`` -> (codes uint8 ``[..., N, B*block]``, parameters);
    the exact inverse of ``pack_blocks`` (every bit pattern of a block is read, none is checked)."""
    *lead, n, nbytes = raw.shape
    if nbytes % t.block_bytes:
        raise ValueError(f"{t.name}: {nbytes} bytes per row is not a whole number of {t.block_bytes}-byte blocks")
    nb = nbytes // t.block_bytes
    blk = raw.reshape(*lead, n, nb, t.block_bytes).to(torch.uint8)  # every field fits in 8 bits until widened
    f: dict[str, torch.Tensor] = {}
    at = 0
    for field, size in _FIELDS[t.name]:
        f[field] = blk[..., at:at + size]
        at += size
    name = t.name
    d = _fp16_out(f["d"])  # [..., N, B]
    dmin = _fp16_out(f["dmin"]) if "dmin" in f else None
    scales = mins = None
    if name == "q2_k":
        u = _crumbs_out(f["qs"])
        scales, mins = f["scales"] & 15, f["scales"] >> 4
    elif name == "q3_k":
        u = _crumbs_out(f["qs"]) | (_plane_out(f["hmask"]) << 2)
        scales = _scales_q3_out(f["scales"]).to(torch.int16) - 32
    elif name in ("q4_k", "q5_k"):
        scales, mins = _scales_k4_out(f["scales"])
        u = _nibbles_out(f["qs"], 32)
        if name == "q5_k":
            u = u | (_plane_out(f["qh"]) << 4)
    elif name == "q6_k":
        u = _nibbles_out(f["ql"], 64) | (_crumbs_out(f["qh"]) << 4)
        scales = f["scales"].contiguous().view(torch.int8)
    elif name in ("q4_0", "iq4_nl", "q5_0", "q5_1"):
        u = _nibbles_out(f["qs"], 16)
        if name in ("q5_0", "q5_1"):
            u = u | (_bits_out(f["qh"], 8, 1).transpose(-1, -2).flatten(-2) << 4)
    elif name == "q8_0":
        u = f["qs"] ^ 0x80
    else:
        raise ValueError(f"no block layout for {name}")
    codes = u.to(torch.uint8).reshape(*lead, n, nb * t.block)
    p = BlockParams(d, dmin, None if scales is None else scales.to(torch.int16),
                    None if mins is None else mins.to(torch.int16))
    return codes, p


def pack_f16(w: torch.Tensor) -> torch.Tensor:
    """w ``[..., N, K]`` -> uint8 ``[..., N, 2K]``: the weights rounded to float16, little-endian."""
    return w.to(torch.float16).contiguous().view(torch.uint8)


def unpack_f16(raw: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., N, 2K]`` -> float16 ``[..., N, K]``."""
    return raw.contiguous().view(torch.float16)
