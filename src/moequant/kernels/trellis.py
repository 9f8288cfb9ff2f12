"""Trellis decode as an op: ``moequant::trellis_dequant`` (packed words -> dense weight).

Schema (one matrix; leading expert dims are the caller's loop)::

    trellis_dequant(Tensor words, Tensor scale, Tensor? lut, int bits, int L, int V, int tile,
                    str code, int Q, bool tail_biting) -> Tensor

- ``words``: uint16 ``[N/tile, K/tile, W]`` (format ``trellis-packed``), ``scale``: fp16 ``[N]``,
  ``lut``: fp16 ``[2^Q, 2]`` for ``code == "hyb"``, else ``None``;
- returns float32 ``[N, K]``, bit-identical to the encoder's reconstruction.

Implementations: ``reference`` (pure torch, one uint8 per stream bit: the definition, slow) and the
CPU kernel registered on the op (states from joined words, ``codecs.trellis.unpack_tile_states``). A
GPU kernel registers itself with ``trellis_dequant.register_kernel("cuda")``; until one does, CUDA
tensors run the same torch code as the CPU. ``register_fake`` gives the output's shape, so the op
traces under ``torch.compile``.
"""

from __future__ import annotations

import torch

from moequant.codecs.config import TrellisConfig
from moequant.codecs.trellis import _unpack_tile_states_bitwise, code_values, reconstruct, unpack_tile_states


def _config(bits: int, L: int, V: int, tile: int, code: str, Q: int, tail_biting: bool) -> TrellisConfig:
    return TrellisConfig(bits=bits, L=L, V=V, tile=tile, code=code, Q=Q, tail_biting=tail_biting)


def _values(cfg: TrellisConfig, lut: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    values = code_values(cfg, None if lut is None else lut.to(torch.float32).cpu())  # [2^L, V]
    return values.to(device)


def reference(words: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor | None, cfg: TrellisConfig) -> torch.Tensor:
    """Pure-torch definition of the op (bit-by-bit unpacking) -> float32 ``[N, K]``."""
    states = _unpack_tile_states_bitwise(words.reshape(-1, words.shape[-1]), cfg)  # [B, S]
    states = states.reshape(*words.shape[:-1], states.shape[-1])  # [N/t, K/t, S]
    return reconstruct(states, _values(cfg, lut, words.device), scale, cfg.tile)


@torch.library.custom_op("moequant::trellis_dequant", mutates_args=())
def trellis_dequant(words: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor | None, bits: int, L: int, V: int,
                    tile: int, code: str, Q: int, tail_biting: bool) -> torch.Tensor:
    cfg = _config(bits, L, V, tile, code, Q, tail_biting)
    states = unpack_tile_states(words.reshape(-1, words.shape[-1]), cfg)  # [B, S]
    states = states.reshape(*words.shape[:-1], states.shape[-1])  # [N/t, K/t, S]
    return reconstruct(states, _values(cfg, lut, words.device), scale, tile)


@trellis_dequant.register_fake
def _(words, scale, lut, bits, L, V, tile, code, Q, tail_biting):
    n_tiles, k_tiles = words.shape[-3], words.shape[-2]
    return words.new_empty((n_tiles * tile, k_tiles * tile), dtype=torch.float32)


def dequant(words: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor | None, cfg: TrellisConfig) -> torch.Tensor:
    """``trellis_dequant`` with a ``TrellisConfig`` -> float32 ``[N, K]``."""
    return trellis_dequant(words, scale, lut, cfg.bits, cfg.L, cfg.V, cfg.tile, cfg.code, cfg.Q, cfg.tail_biting)
