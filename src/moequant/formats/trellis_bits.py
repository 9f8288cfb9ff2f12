"""Bit layout of a trellis tile (``trellis-packed``): the walk's states <-> the uint16 words stored.

A tile's walk ``s_0 … s_{S-1}`` (``codecs.trellis``) is found by the codec; this module stores it.

**Packing.** Chunk ``c_t = s_t >> (L-kv)`` (the ``kv`` bits step ``t`` brings in first). Stored bits:
``c_0 … c_{S-1}`` (``K·T`` bits), then, without tail-biting, the low ``L-kv`` bits of ``s_{S-1}``. Bits
go MSB first into uint16 words (bit ``i`` of the stream is bit ``15 − i mod 16`` of word ``i // 16``),
zero-padded to whole words: ``ceil(bits / 16)`` words per tile, exactly ``K·T / 16`` when tail-biting
and ``16 | K·T`` (every tile of 16x16 or 4x4).
"""

from __future__ import annotations

import torch

from moequant.codecs.config import TrellisConfig
from moequant.codecs.trellis import code_values, decode_states, steps_per_tile, tile_bits, words_per_tile


# --- tile bitstreams --------------------------------------------------------------------------------------
def _to_bits(v: torch.Tensor, nbits: int) -> torch.Tensor:
    """int ``[..., n]`` -> uint8 bits ``[..., n·nbits]``, each value MSB first."""
    shifts = torch.arange(nbits - 1, -1, -1, dtype=torch.int64, device=v.device)
    return ((v.to(torch.int64).unsqueeze(-1) >> shifts) & 1).to(torch.uint8).flatten(-2)


def _from_bits(bits: torch.Tensor, nbits: int) -> torch.Tensor:
    """uint8 bits ``[..., n·nbits]`` (MSB first) -> int64 ``[..., n]``."""
    shifts = torch.arange(nbits - 1, -1, -1, dtype=torch.int64, device=bits.device)
    return (bits.unflatten(-1, (-1, nbits)).to(torch.int64) << shifts).sum(-1)


def pack_tile_bits(states: torch.Tensor, config: TrellisConfig) -> torch.Tensor:
    """states ``[B, S]`` -> uint16 words ``[B, words_per_tile]`` (layout in the module docstring)."""
    L, kv = config.L, config.bits * config.V
    bits = _to_bits(states >> (L - kv), kv)  # [B, S·kv]
    if not config.tail_biting:
        bits = torch.cat([bits, _to_bits(states[:, -1:] & ((1 << (L - kv)) - 1), L - kv)], -1)
    pad = words_per_tile(config) * 16 - bits.shape[-1]
    bits = torch.nn.functional.pad(bits, (0, pad))
    return _from_bits(bits, 16).to(torch.uint16)


def unpack_tile_states(words: torch.Tensor, config: TrellisConfig) -> torch.Tensor:
    """uint16 words ``[B, words_per_tile]`` -> states int64 ``[B, S]`` (inverse of ``pack_tile_bits``).

    State ``t`` is the ``L`` stream bits from bit ``t·kv``: read as three consecutive words joined into
    48 bits (``L <= 24`` and an offset < 16 fit), one gather and a shift per state. The cyclic stream of
    a tail-biting tile wraps at a word boundary when ``16 | K·T`` (every 16x16 or 4x4 tile); other
    geometries take the bit-by-bit path."""
    L, kv, steps = config.L, config.bits * config.V, steps_per_tile(config)
    n_words = words_per_tile(config)
    if words.shape[-1] != n_words:
        raise ValueError(f"{words.shape[-1]} words per tile; {config.short_name} stores {n_words}")
    if config.tail_biting and tile_bits(config) % 16:
        return unpack_tile_states_bitwise(words, config)
    w = words.to(torch.int32).to(torch.int64) & 0xFFFF  # [B, W]
    # two more words: the stream's start again (cyclic) or zeros (free start: the padding)
    ext = w[:, torch.arange(2, device=w.device) % n_words] if config.tail_biting else w.new_zeros(w.shape[0], 2)
    w = torch.cat([w, ext], -1)  # [B, W + 2]
    mask = (1 << L) - 1
    if 16 % kv == 0:  # 16/kv states start in each word: shifts of one joined value per word, no gather
        joined = (w[:, :-2] << 32) | (w[:, 1:-1] << 16) | w[:, 2:]  # [B, W]: 48 bits from each word
        off = torch.arange(0, 16, kv, dtype=torch.int64, device=w.device)  # [16/kv]
        states = (joined.unsqueeze(-1) >> (48 - L - off)) & mask  # [B, W, 16/kv]
        return states.flatten(1)[:, :steps]
    pos = torch.arange(steps, dtype=torch.int64, device=w.device) * kv  # [S]: first bit of each state
    idx, off = pos // 16, pos % 16
    joined = (w[:, idx] << 32) | (w[:, idx + 1] << 16) | w[:, idx + 2]  # [B, S]: 48 bits from word idx
    return (joined >> (48 - L - off)) & mask


def unpack_tile_states_bitwise(words: torch.Tensor, config: TrellisConfig) -> torch.Tensor:
    """``unpack_tile_states`` through one uint8 per bit: any geometry, slower and larger."""
    L, kv, steps = config.L, config.bits * config.V, steps_per_tile(config)
    bits = _to_bits(words.to(torch.int32), 16)[:, :tile_bits(config)]  # [B, bits]
    # extend the stream to L + (S-1)·kv bits (cyclically when tail-biting), padded to whole chunks
    ext = bits[:, :L - kv] if config.tail_biting else bits.new_zeros(bits.shape[0], 0)
    bits = torch.cat([bits, ext], -1)
    span = -(-(L - kv) // kv)  # chunks after the last one that the last state reaches into
    bits = torch.nn.functional.pad(bits, (0, (steps + span) * kv - bits.shape[-1]))
    chunks = _from_bits(bits, kv)  # [B, S + span]
    acc = torch.zeros(bits.shape[0], steps, dtype=torch.int64, device=bits.device)  # [B, S]
    for u in range(span + 1):
        acc = (acc << kv) | chunks[:, u:u + steps]
    return acc >> ((span + 1) * kv - L)


def decode_tiles(words: torch.Tensor, config: TrellisConfig, lut: torch.Tensor | None = None) -> torch.Tensor:
    """uint16 words ``[B, words_per_tile]`` -> float32 ``[B, T]``."""
    return decode_states(unpack_tile_states(words, config), code_values(config, lut))
