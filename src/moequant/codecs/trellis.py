"""QTIP bitshift-trellis codec (Tseng et al., NeurIPS 2024): codes, Viterbi with tail-biting.

Pure tensor math, no I/O. Notation: ``K`` = bits per weight (``config.bits``), ``V`` values per step,
``kv = K·V`` new bits per step, ``L`` state bits, a tile of ``T = tile²`` weights is ``S = T / V`` steps.

**Trellis.** A tile is a walk ``s_0 … s_{S-1}`` on states of ``L`` bits with
``s_t = ((s_{t-1} << kv) mod 2^L) | c_t``, ``c_t in [0, 2^kv)``. Equivalently the walk is a bitstream
``b`` (MSB first) and ``s_t = b[t·kv : t·kv + L]`` read as an ``L``-bit integer, the first bit the
most significant. Step ``t`` emits the ``V`` values ``code(s_t)`` for tile positions ``[t·V, t·V + V)``;
positions run row-major inside the tile (position ``r·tile + c`` is row ``r``, column ``c``).

**Codes** (state -> ``V`` float32 values, ``code_values`` builds the whole ``[2^L, V]`` table):

- ``hyb`` (V = 2): ``h = s·(s+1) mod 2^32``, ``idx = (h >> (15-Q)) & (2^Q - 1)``, value ``lut[idx]``
  (a ``[2^Q, 2]`` table) with component **0** negated when bit 15 of ``h`` is set — the component
  QTIP's ``quantlut_sym`` flips. The LUT starts as a 2-D k-means of N(0, I₂) (``hyb_lut_init``).
- ``1mad`` (V = 1): ``x = (s·34038481 + 76625530) mod 2^32``; value = (sum of the 4 bytes of x − 510)
  / 147.800537109375 — a sum of four near-uniform bytes, near-Gaussian with unit variance.
- ``3inst`` (V = 1): ``x = (s·89226354 + 64248484) mod 2^32``; ``y = (x & 0x8FFF8FFF) ^ 0x3B603B60``;
  value = fp16(y >> 16) + fp16(y & 0xFFFF), the add done in fp16 as the paper's kernel does (each
  half keeps its sign and 12 low bits and gets exponent bits fixed to land in ±[0.125, 2)).

QTIP defines 1MAD and 3INST with V = 1 only; ``code_values`` rejects them with V = 2.

**Scale.** Each weight row is divided by ``rms(row) / code_rms(values)`` (fp16) so that it has the
code table's RMS, as QTIP scales by the LUT's RMS. Measured at L=12, 2 bits, 64 N(0,1) tiles: target
RMS 0.95x / 1.0x / 1.05x the code's gave MSE within 0.3% of each other for hyb, 1mad and 3inst.

**Viterbi** minimises ``Σ_t Σ_v w_{t,v} (code(s_t)_v − x_{t,v})²`` over valid walks. The predecessors of
``s`` are ``p = (s >> kv) + j·2^(L-kv)``, ``j in [0, 2^kv)``; the backpointer keeps ``j`` (uint8) per
step and per ``s >> kv``. Memory per tile is about ``S·2^(L-kv)`` bytes of backpointers plus
``16·2^L`` bytes of cost rows (a generous count of the temporaries); tiles are processed in chunks so
that this stays under ``max_bytes`` (default 16 MiB: L=16, K=2, V=2, T=256 is ~1.6 MB per tile, 10 tiles
per chunk; chunks that fit the cache ran 2x faster than 512 MiB ones), one tile at least.

**Tail-biting** (the default): the tile is a cyclic bitstream of exactly ``K·T = S·kv`` bits,
``s_t = b[(t·kv + i) mod K·T for i < L]``. The constraint implemented is
``s_{S-1} mod 2^(L-kv) == s_0 >> kv`` (the last state's low ``L-kv`` bits are the first state's high
bits); it needs ``S·kv >= L``. QTIP's two passes: (1) free Viterbi on the tile rolled by ``S/2`` steps, so
the wrap point sits mid-sequence; the high ``L-kv`` bits ``o`` of the state it picks for original step 0
are kept; (2) Viterbi with ``s_0 >> kv == o`` and ``s_{S-1} mod 2^(L-kv) == o`` (QTIP's ``overlap``
masks). On N(0,1) tiles the two passes found the best cyclic walk (every ``o`` tried: L = 8, 10, 12).
Free start (``tail_biting=False``) stores the first state's ``L`` bits in full: ``K·T + L − kv`` bits
per tile. Those ``L − kv`` extra bits are worth up to ``2^(2(L−kv)/T)`` in MSE (rate-distortion), and
free start does buy part of it: at L=16 on 2048 tiles tail-biting's MSE is 4.0% / 2.9% / 1.5% above
free start's for K = 2 / 3 / 4 (HYB, V=2) and ~5% for 1MAD / 3INST (V=1, 14 extra bits).

**Packing** into stored words is the format's (``formats.trellis_bits``).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from moequant.codecs.config import TrellisConfig

# cost of an excluded state: finite, so excluded-minus-excluded is 0 and never NaN
_EXCLUDED = 1e30
MAX_BYTES = 16 << 20  # default Viterbi memory bound per chunk of tiles (small chunks stay in cache)

# ``(feats, table, L, kv, start_high | None, end_low | None) -> states | None``: the accelerated
# ``_viterbi_chunk`` (``kernels.viterbi.fast_chunk``: the same search and arithmetic) once installed; it
# returns None where it does not apply, and the torch loop runs.
ViterbiFastPath = Callable[[torch.Tensor, torch.Tensor, int, int, Optional[torch.Tensor], Optional[torch.Tensor]],
                           Optional[torch.Tensor]]
_fast_chunk: ViterbiFastPath | None = None


def set_viterbi_fast_path(fn: ViterbiFastPath | None) -> None:
    """Install (or, with None, remove) the accelerated Viterbi chunk ``viterbi`` tries first
    (``kernels.viterbi`` installs its C++ kernel on import; ``formats.trellis`` imports it)."""
    global _fast_chunk
    _fast_chunk = fn


# --- geometry -------------------------------------------------------------------------------------
def steps_per_tile(config: TrellisConfig) -> int:
    """``S = tile² / V``."""
    return config.tile * config.tile // config.V


def tile_bits(config: TrellisConfig) -> int:
    """Stored bits of one tile: ``K·T`` with tail-biting, ``K·T + L − K·V`` with a free start."""
    kv = config.bits * config.V
    extra = 0 if config.tail_biting else config.L - kv
    return steps_per_tile(config) * kv + extra


def words_per_tile(config: TrellisConfig) -> int:
    """uint16 words per tile (``tile_bits`` rounded up to whole words)."""
    return -(-tile_bits(config) // 16)


def check_geometry(config: TrellisConfig) -> None:
    """Raise ``ValueError`` when a tile is too short for the state (``S·K·V >= L`` is needed)."""
    if steps_per_tile(config) * config.bits * config.V < config.L:
        raise ValueError(f"tile {config.tile}: {steps_per_tile(config)} steps of {config.bits * config.V} bits "
                         f"cannot hold an L={config.L} state; use a larger tile or smaller L")


def to_tiles(w: torch.Tensor, tile: int) -> torch.Tensor:
    """``w [..., N, K] -> [..., N/tile, K/tile, tile²]``: tile ``(i, j)`` covers rows ``[i·tile, …)`` and
    columns ``[j·tile, …)``, its weights row-major."""
    *lead, n, k = w.shape
    if n % tile or k % tile:
        raise ValueError(f"trellis tiles of {tile}x{tile} need N and K multiples of {tile}, got {n}x{k}")
    t = w.reshape(*lead, n // tile, tile, k // tile, tile).transpose(-3, -2)  # [..., N/t, K/t, t, t]
    return t.reshape(*lead, n // tile, k // tile, tile * tile)


def from_tiles(tiles: torch.Tensor, tile: int) -> torch.Tensor:
    """Inverse of ``to_tiles``: ``[..., N/tile, K/tile, tile²] -> [..., N, K]``."""
    *lead, nr, nc, _ = tiles.shape
    t = tiles.reshape(*lead, nr, nc, tile, tile).transpose(-3, -2)  # [..., N/t, t, K/t, t]
    return t.reshape(*lead, nr * tile, nc * tile)


# --- codes ----------------------------------------------------------------------------------------
def _hyb_values(states: torch.Tensor, lut: torch.Tensor, q: int) -> torch.Tensor:
    h = (states * (states + 1)) & 0xFFFFFFFF  # [n]
    idx = (h >> (15 - q)) & ((1 << q) - 1)  # [n]
    sign = 1.0 - 2.0 * ((h >> 15) & 1).to(torch.float32)  # [n]
    # index_select, not lut[idx]: its backward is index_add_, which sums in a fixed order; advanced indexing's
    # (index_put_ with accumulate) adds from several threads in any order, so a LUT's gradient changed run to run
    vals = lut.to(torch.float32).index_select(0, idx)  # [n, 2]
    vals[:, 0] *= sign
    return vals


def _1mad_values(states: torch.Tensor) -> torch.Tensor:
    x = (states * 34038481 + 76625530) & 0xFFFFFFFF  # [n]
    y = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + ((x >> 24) & 255)  # [n]
    return ((y - 510).to(torch.float32) / 147.800537109375).unsqueeze(-1)  # [n, 1]


def _fp16_from_bits(bits16: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^16) -> float16 with those bits."""
    return (bits16 - ((bits16 >> 15) << 16)).to(torch.int16).view(torch.float16)


def _3inst_values(states: torch.Tensor) -> torch.Tensor:
    x = (states * 89226354 + 64248484) & 0xFFFFFFFF  # [n]
    y = (x & 0x8FFF8FFF) ^ 0x3B603B60  # [n]
    total = _fp16_from_bits(y >> 16) + _fp16_from_bits(y & 0xFFFF)  # [n] fp16 add
    return total.to(torch.float32).unsqueeze(-1)  # [n, 1]


def code_values(config: TrellisConfig, lut: torch.Tensor | None = None) -> torch.Tensor:
    """The full state -> values table ``[2^L, V]`` float32. ``lut [2^Q, 2]`` is required for ``hyb``."""
    states = torch.arange(1 << config.L, dtype=torch.int64)  # [2^L]
    if config.code == "hyb":
        if lut is None or tuple(lut.shape) != (1 << config.Q, 2):
            raise ValueError(f"the hyb code needs a [{1 << config.Q}, 2] LUT, got "
                             f"{None if lut is None else tuple(lut.shape)}")
        return _hyb_values(states, lut, config.Q)
    if config.V != 1:
        raise ValueError(f"the {config.code} code emits one value per state (QTIP defines it for V=1); "
                         f"got V={config.V}")
    return _1mad_values(states) if config.code == "1mad" else _3inst_values(states)


def hyb_lut_init(q: int, seed: int = 0, iters: int = 8, per_centroid: int = 32) -> torch.Tensor:
    """Deterministic 2-D k-means of ``per_centroid · 2^Q`` N(0, I₂) samples -> ``[2^Q, 2]`` float32.

    Lloyd's algorithm from the first ``2^Q`` samples, ``iters`` rounds in float64 (an empty cell keeps
    its centroid), sorted by component 0, then component 1. Bitwise reproducible on a machine; the
    LUT is stored with every tensor, so decoding never re-derives it. More rounds or samples did not
    lower the trellis MSE (L=12, 64 tiles: 0.0749-0.0751 for 4-30 rounds, noise ±0.001).
    """
    k = 1 << q
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(k * per_centroid, 2, generator=gen, dtype=torch.float64)  # [n, 2]
    cent = data[:k].clone()  # [k, 2]
    for _ in range(iters):
        dist = torch.addmm(cent.square().sum(-1), data, cent.T, alpha=-2)  # [n, k]: |x-c|² - |x|²
        assign = dist.argmin(-1)  # [n]
        sums = torch.zeros_like(cent).index_add_(0, assign, data)  # [k, 2]
        counts = torch.bincount(assign, minlength=k).to(torch.float64).unsqueeze(-1)  # [k, 1]
        cent = torch.where(counts > 0, sums / counts.clamp_min(1), cent)
    cent = cent[cent[:, 1].argsort(stable=True)]
    return cent[cent[:, 0].argsort(stable=True)].to(torch.float32)


def initial_lut(config: TrellisConfig) -> torch.Tensor | None:
    """The HYB LUT the encoder starts from, rounded to its stored fp16 values (float32 ``[2^Q, 2]``),
    or None for computed codes."""
    if config.code != "hyb":
        return None
    return _initial_lut(config.Q).clone()


@functools.lru_cache(maxsize=8)
def _initial_lut(q: int) -> torch.Tensor:
    """Cached: a pure function of ``Q`` (k-means from a fixed seed), needed once per encoded matrix."""
    return hyb_lut_init(q).to(torch.float16).to(torch.float32)


def code_rms(values: torch.Tensor) -> float:
    """RMS of a code table ``[2^L, V]`` over every state and component: a row scaled to this RMS matches
    the code's distribution (``fp16_row_scale``)."""
    return float(values.to(torch.float64).square().mean().sqrt())


# --- Viterbi --------------------------------------------------------------------------------------
def _chunk_tiles(steps: int, L: int, kv: int, max_bytes: int) -> int:
    per_tile = steps * (1 << (L - kv)) + 16 * (1 << L) + 12 * (1 << (L - kv))
    return max(1, max_bytes // per_tile)


def _viterbi_chunk(feats: torch.Tensor, table: torch.Tensor, L: int, kv: int,
                   start_high: torch.Tensor | None, end_low: torch.Tensor | None) -> torch.Tensor:
    b, steps, _ = feats.shape
    n, m = 1 << L, 1 << kv
    r = n >> kv
    state = torch.arange(n, dtype=torch.int64)  # [2^L]
    cost = feats[:, 0] @ table  # [b, 2^L]
    if start_high is not None:
        cost.masked_fill_((state >> kv).unsqueeze(0) != start_high.unsqueeze(-1), _EXCLUDED)
    back = torch.empty(b, steps, r, dtype=torch.uint8)  # [b, S, 2^(L-kv)]: j of the best predecessor
    jidx = torch.arange(m, dtype=torch.int32).view(1, m, 1)  # [1, m, 1]
    gap = torch.empty(b, m, r)  # [b, m, r]
    for t in range(1, steps):
        pred = cost.view(b, m, r)  # [b, m, r]: pred[:, j, q] is the cost of p = j·r + q
        best = pred.amin(dim=1)  # [b, r]
        # smallest j with pred == best, in int32 arithmetic (bool-valued compares and min-with-index
        # are several times slower on CPU): gap >= 0 as float, so its bits clamp to 0 (hit, -0 too)
        # or 1 (miss)
        hit = torch.sub(pred, best.unsqueeze(1), out=gap).view(torch.int32).clamp_(0, 1)  # [b, m, r]
        back[:, t] = hit.mul_(m).add_(jidx).amin(dim=1)
        torch.mm(feats[:, t], table, out=cost)
        cost.view(b, r, m).add_(best.unsqueeze(-1))
    if end_low is not None:
        cost.masked_fill_((state & (r - 1)).unsqueeze(0) != end_low.unsqueeze(-1), _EXCLUDED)
    out = torch.empty(b, steps, dtype=torch.int64)  # [b, S]
    s = cost.argmin(-1)  # [b]
    out[:, -1] = s
    for t in range(steps - 1, 0, -1):
        q = s >> kv
        s = q + back[:, t].gather(1, q.unsqueeze(-1)).squeeze(-1).to(torch.int64) * r
        out[:, t - 1] = s
    return out


def viterbi(x: torch.Tensor, values: torch.Tensor, L: int, kv: int, start_high: torch.Tensor | None = None,
            end_low: torch.Tensor | None = None, weights: torch.Tensor | None = None,
            max_bytes: int = MAX_BYTES) -> torch.Tensor:
    """Best walk for each of ``B`` sequences -> states int64 ``[B, S]``.

    x ``[B, S, V]``; values ``[2^L, V]``; ``kv`` new bits per step; ``start_high`` int ``[B]``: when
    given, ``s_0 >> kv`` must equal it; ``end_low`` int ``[B]``: ``s_{S-1} mod 2^(L-kv)`` must equal it;
    ``weights [B, S, V]`` (>= 0) weight the squared errors. Tiles are processed ``max_bytes`` at a time.
    """
    b, steps, v = x.shape
    if values.shape != (1 << L, v):
        raise ValueError(f"values {tuple(values.shape)} do not match L={L}, V={v}")
    if not 0 < kv < L or kv > 8:
        raise ValueError(f"kv={kv} must be in [1, min(8, L-1)]")
    vals = values.to(torch.float32)
    table = torch.cat([vals.square(), vals], -1).T.contiguous()  # [2V, 2^L]
    x = x.to(torch.float32)
    w = torch.ones_like(x) if weights is None else weights.to(torch.float32)
    # err(s) = Σ_v w_v (val_v(s)² − 2 val_v(s) x_v), dropping the constant Σ w x²
    feats = torch.cat([w, -2.0 * w * x], -1)  # [B, S, 2V]
    out = torch.empty(b, steps, dtype=torch.int64)  # [B, S]
    chunk = _chunk_tiles(steps, L, kv, max_bytes)
    for i in range(0, b, chunk):
        sl = slice(i, i + chunk)
        args = (feats[sl].contiguous(), table, L, kv, None if start_high is None else start_high[sl].to(torch.int64),
                None if end_low is None else end_low[sl].to(torch.int64))
        got = None if _fast_chunk is None else _fast_chunk(*args)
        out[sl] = _viterbi_chunk(*args) if got is None else got
    return out


def viterbi_tail_biting(x: torch.Tensor, values: torch.Tensor, L: int, kv: int,
                        weights: torch.Tensor | None = None, max_bytes: int = MAX_BYTES) -> torch.Tensor:
    """Two-pass tail-biting Viterbi (module docstring) -> states int64 ``[B, S]`` with
    ``s_{S-1} mod 2^(L-kv) == s_0 >> kv``."""
    half = x.shape[1] // 2
    w_rolled = None if weights is None else weights.roll(half, 1)
    first = viterbi(x.roll(half, 1), values, L, kv, weights=w_rolled, max_bytes=max_bytes)  # [B, S]
    overlap = first[:, half] >> kv  # [B]: rolled step `half` is original step 0
    return viterbi(x, values, L, kv, start_high=overlap, end_low=overlap, weights=weights, max_bytes=max_bytes)


# --- tiles ----------------------------------------------------------------------------------------
def encode_tiles(x: torch.Tensor, config: TrellisConfig, lut: torch.Tensor | None = None,
                 weights: torch.Tensor | None = None, max_bytes: int = MAX_BYTES
                 ) -> torch.Tensor:
    """x ``[B, T]`` (tile positions row-major, already at the code's scale) -> states int64 ``[B, S]``
    (``formats.trellis_bits.pack_tile_bits`` turns them into the stored words). ``weights [B, T]`` weight
    the squared errors."""
    check_geometry(config)
    values = code_values(config, lut)  # [2^L, V]
    kv, steps = config.bits * config.V, steps_per_tile(config)
    xs = x.reshape(x.shape[0], steps, config.V)  # [B, S, V]
    ws = None if weights is None else weights.reshape(xs.shape)
    if config.tail_biting:
        states = viterbi_tail_biting(xs, values, config.L, kv, ws, max_bytes)
    else:
        states = viterbi(xs, values, config.L, kv, weights=ws, max_bytes=max_bytes)
    return states


def decode_states(states: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """states ``[..., S]`` -> values ``[..., S·V]`` (tile positions row-major)."""
    # index_select: several times faster than advanced indexing on CPU
    return values.index_select(0, states.reshape(-1)).reshape(*states.shape[:-1], -1)


def fp16_row_scale(w: torch.Tensor, target_rms: float) -> torch.Tensor:
    """Per-row scale ``rms(row) / target_rms`` rounded to fp16 (zero rows get 1) -> float32 ``[..., N]``."""
    rms = w.to(torch.float64).square().mean(-1).sqrt() / target_rms  # [..., N]
    fmax = torch.finfo(torch.float16).max
    tiny = torch.finfo(torch.float16).tiny
    scale = torch.where(rms > 0, rms.clamp(tiny, fmax), torch.ones_like(rms))
    return scale.to(torch.float16).to(torch.float32)


def reconstruct(states: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, tile: int) -> torch.Tensor:
    """states ``[..., N/tile, K/tile, S]``, values ``[2^L, V]``, scale ``[..., N]`` -> ``[..., N, K]`` float32.
    The one decode expression shared by the encoder and the packed format (bit-exact equality)."""
    return from_tiles(decode_states(states, values), tile) * scale.to(torch.float32).unsqueeze(-1)


def quantize_matrix(w: torch.Tensor, config: TrellisConfig, lut: torch.Tensor | None = None,
                    hdiag: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                    max_bytes: int = MAX_BYTES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN-style trellis quantization of ``w [..., N, K]`` -> (states int64 ``[..., N/tile, K/tile, S]``,
    fp16-exact scale float32 ``[..., N]``, reconstruction float32 ``[..., N, K]``).

    Each row is scaled to the code's RMS (or divided by the given fp16-exact ``scale [..., N]``, as a
    solver does for one tile column ``w [N, tile]`` after fixing the scales from the whole rows), then
    every tile gets its Viterbi walk (tail-biting when configured); ``hdiag [..., K]`` (a Hessian
    diagonal) weights each column's squared error. ``lut`` (hyb) must already hold the values that will
    be stored (fp16-exact) for the decode to be exact.
    """
    check_geometry(config)
    values = code_values(config, lut)  # [2^L, V]
    if scale is None:
        scale = fp16_row_scale(w, code_rms(values))  # [..., N]
    x = to_tiles(w.to(torch.float32) / scale.unsqueeze(-1), config.tile)  # [..., N/t, K/t, T]
    weights = None
    if hdiag is not None:
        weights = to_tiles(hdiag.to(torch.float32).unsqueeze(-2).expand(w.shape), config.tile).reshape(-1, x.shape[-1])
    states = encode_tiles(x.reshape(-1, x.shape[-1]), config, lut, weights, max_bytes)  # [B, S]
    states = states.reshape(*x.shape[:-1], states.shape[-1])
    return states, scale, reconstruct(states, values, scale, config.tile)


def mse_per_weight(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean squared error per weight."""
    return float((x.to(torch.float64) - x_hat.to(torch.float64)).square().mean())
