"""Trellis tensors (``trellis-packed``) opened for fine-tuning: BCJR-QAT, straight-through QAT, distillation.

Each class takes a ``TrellisTensor`` (``[N, K]`` or experts ``[E, N, K]``) and keeps the trainable-tensor
interface of ``finetune.trainable``: ``parameters()`` (float32 leaves), ``weight()`` (the decoded weight,
differentiable in them), ``reencode``, ``state()`` / ``load_state()`` (exact: a resumed run continues bit for
bit), ``packed()`` (a normal ``TrellisTensor`` at the stored config), and ``set_temperature``. The per-row scale
and the HYB LUT are stored in float16; training computes with those values (``packed_trainables.straight_through``).

- ``TrellisBCJR`` (``--method bcjr``): a latent weight ``W`` in the code's unit-variance domain (initialised
  from the PTQ codes' values), the scale and the LUT train. ``weight()`` is the soft codeword of ``W`` at the
  current temperature (``finetune.bcjr``) times the scale. The soft pass runs over the sub-trellis of walks
  that follow the current *reference* walk (the PTQ codes at first) except in ``f`` free bits per innovation,
  ``2^F <= 2^soft_bits`` states (``bcjr.soft_geometry``; ``soft_bits >= L`` is the full trellis, exact). Every
  ``refresh_every``-th ``weight()`` call the reference becomes the sub-trellis's best walk for the current
  ``W`` (never a worse fit to ``W``) and the free positions rotate, so every bit can move in turn. With
  tail-biting the reference's overlap (the first state's high ``L − kv`` bits) conditions the pass, as the
  codec's second Viterbi pass does, and stays until ``packed()``. ``packed()`` hardens with the codec's Viterbi
  at the stored config (``encode_tiles``: tail-biting two-pass) on the final *soft codeword* (``harden="soft"``,
  the default) or on the final latent ``W`` (``harden="latent"``). The soft codeword at a low temperature is
  close to a walk of the code, so its Viterbi walk is what training computed with; the latent is not: Adam
  moves it by about ``lr`` per step in directions where the posterior is flat, and it ends a quantization
  error away from its soft codeword (RMS 0.21-0.27 at unit variance after 100 steps on a 128x256 proxy).
  Measured there (layer-output error relative to the float layer, 2-bit HYB L=10, Adam 1e-2, 100 steps, τ
  0.3 → 0.05): PTQ 0.091, KD 0.040, STE 0.032, BCJR hardened on the soft codeword 0.021 (soft_bits 8) /
  0.029 (soft_bits 4), on the latent 0.035-0.067.
- ``TrellisSTE`` (``--method ste``): the same latent ``W``; the forward uses the hard Viterbi codes of ``W``
  (stored config), the backward the identity into ``W`` (and the exact gradient into scale and LUT). The
  Viterbi is re-run every ``ste_every``-th ``weight()`` call and the last codes used in between: at L=16 it
  costs ~12 s per 576x1536 matrix here (L=12: 0.7 s; one idle thread of the 2-core dev machine, the Viterbi
  kernel's second version; the first measured ~90 s / 6.4 s on a busy machine). ``packed()`` is the Viterbi codes of the final ``W``.
- ``TrellisKD`` (``--method kd``): the codes fixed; the scale and the LUT train. Untouched, ``packed()`` is the
  input bit for bit.

``reencode(target, max_fraction)`` (all three): QTIP-style re-encoding of the codes towards ``target``
(weight domain): the Viterbi walk of ``target / scale`` per tile, adopted whole tile by tile where the tile's
squared error to ``target`` falls, largest falls first, while at most ``max_fraction`` of all steps change (a
tile is adopted whole or not at all: a walk is only valid whole); the fraction changed is returned. For
``TrellisBCJR`` it moves the reference walk, for ``TrellisSTE`` the codes in use (until the next refresh), for
``TrellisKD`` the stored codes. It runs the full Viterbi (expensive at L=16).

RHT: a ``rht`` tensor around a trellis is opened by ``packed_trainables.Rotated`` around one of these: the
latent, codes and LUT live in the rotated domain (what the codec encoded), ``weight()`` is rotated back there,
``set_temperature`` is passed through and ``packed()`` rewrapped with the same signs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from moequant.codecs.config import TrellisConfig
from moequant.codecs.trellis import (MAX_BYTES, check_geometry, code_values, decode_states, encode_tiles, from_tiles,
                                     steps_per_tile, to_tiles)
from moequant.finetune.bcjr import MAX_BYTES as SOFT_BYTES
from moequant.finetune.bcjr import SoftGeometry, hard_path, soft_codeword, soft_geometry, soft_overlap
from moequant.finetune.packed_trainables import straight_through
from moequant.formats.base import QuantizedTensor
from moequant.formats.trellis import TrellisTensor


@dataclass(frozen=True)
class TrellisTrainOptions:
    """soft_bits: most state bits of BCJR's soft pass (``>= L``: the full trellis; 8 costs ~10x the time of 4 and
    fitted the layer proxy of the module docstring better, 0.021 vs 0.029). refresh_every: BCJR's reference walk
    follows the latent every N-th ``weight()`` call (0: never; 1 fitted the proxy better than 8, 0.029 vs 0.031
    at soft_bits 4). harden: what BCJR's ``packed()`` runs Viterbi on, ``"soft"`` (the soft codeword) or
    ``"latent"``. ste_every: STE's Viterbi every N-th call. tau: BCJR's temperature until ``set_temperature``.
    soft_bytes / viterbi_bytes: memory bounds per chunk of tiles of the soft pass and of the codec's Viterbi."""

    soft_bits: int = 8
    refresh_every: int = 1
    harden: str = "soft"
    ste_every: int = 8
    tau: float = 0.3
    soft_bytes: int = SOFT_BYTES
    viterbi_bytes: int = MAX_BYTES

    HARDEN: ClassVar[tuple[str, ...]] = ("soft", "latent")

    def __post_init__(self) -> None:
        if self.soft_bits < 1:
            raise ValueError(f"soft_bits must be >= 1, got {self.soft_bits}")
        if self.refresh_every < 0 or self.ste_every < 1:
            raise ValueError(f"refresh_every must be >= 0 and ste_every >= 1, got {self.refresh_every}, "
                             f"{self.ste_every}")
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"tau must be finite and > 0, got {self.tau}")
        if self.soft_bytes < 1 or self.viterbi_bytes < 1:
            raise ValueError("soft_bytes and viterbi_bytes must be >= 1")
        if self.harden not in self.HARDEN:
            raise ValueError(f"harden must be one of {self.HARDEN}, got {self.harden!r}")


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).clone().requires_grad_(True)


class _Trellis:
    """Shared: the geometry, the codes ``states`` int64 ``[E, B, S]`` (``B = (N/tile)·(K/tile)`` tiles per matrix),
    scale ``[E, N]`` and LUT ``[E, 2^Q, 2]`` (hyb) leaves, decoding and hardening."""

    def __init__(self, qt: TrellisTensor, options: TrellisTrainOptions | None = None) -> None:
        self.opts = options or TrellisTrainOptions()
        self.shape = tuple(qt.shape)
        self.cfg: TrellisConfig = qt.config
        check_geometry(self.cfg)
        *lead, n, k = self.shape
        self.lead, self.e = tuple(lead), math.prod(lead)
        self.grid = (n // self.cfg.tile, k // self.cfg.tile)  # tiles per column, per row
        self.steps = steps_per_tile(self.cfg)
        self.kv = self.cfg.bits * self.cfg.V
        self.states = qt.states().reshape(self.e, -1, self.steps)  # [E, B, S]
        self.scale = _leaf(qt.data["scale"].reshape(self.e, n))  # [E, N]
        lut = qt.data.get("lut")
        self.lut = None if lut is None else _leaf(lut.reshape(self.e, *lut.shape[-2:]))  # [E, 2^Q, 2]

    # --- values: every matrix of a stack at once, tiles flattened to ``E·B`` ---------------------
    def _tables(self, train: bool) -> torch.Tensor:
        """Each matrix's value table, ``[E, 2^L, V]``, from its fp16 LUT (straight-through when ``train``)."""
        if self.lut is None:
            return code_values(self.cfg).expand(self.e, -1, -1)
        lut = straight_through(self.lut, torch.float16) if train else self.lut.detach().to(torch.float16).to(torch.float32)
        return torch.stack([code_values(self.cfg, lut[i]) for i in range(self.e)])

    def _group(self) -> torch.Tensor | None:
        """The matrix of every tile ``[E·B]`` (None for one matrix)."""
        b = self.grid[0] * self.grid[1]
        return None if self.e == 1 else torch.arange(self.e).repeat_interleave(b)

    def _row_scale(self) -> torch.Tensor:
        return straight_through(self.scale, torch.float16)  # [E, N]

    def _tiles(self, w: torch.Tensor) -> torch.Tensor:
        """``[E, N, K]`` -> ``[E·B, S, V]``."""
        return to_tiles(w, self.cfg.tile).reshape(-1, self.steps, self.cfg.V)

    def _untile(self, y: torch.Tensor) -> torch.Tensor:
        """``[E·B, S, V]`` (or ``[E·B, T]``) -> ``[E, N, K]``."""
        return from_tiles(y.reshape(self.e, *self.grid, -1), self.cfg.tile)

    def _decode(self, states: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """states ``[E, B, S]``, tables ``[E, 2^L, V]`` -> code-domain ``[E, N, K]`` (differentiable in ``tables``)."""
        offset = (torch.arange(self.e) << self.cfg.L).view(-1, 1, 1)
        return self._untile(decode_states(states + offset, tables.reshape(-1, self.cfg.V)))

    def _out(self, code_w: torch.Tensor) -> torch.Tensor:
        """Code-domain ``[E, N, K]`` -> the weight ``[*shape]`` (times the fp16 row scales)."""
        return (code_w * self._row_scale().unsqueeze(-1)).reshape(self.shape)

    def _viterbi(self, code_w: torch.Tensor) -> torch.Tensor:
        """The codec's walks (stored config, tail-biting as configured) of code-domain ``[E, N, K]`` -> ``[E, B, S]``."""
        lut = None if self.lut is None else self.lut.detach().to(torch.float16).to(torch.float32)
        out = []
        for i in range(self.e):
            x = to_tiles(code_w[i].detach().to(torch.float32), self.cfg.tile).reshape(-1, self.steps * self.cfg.V)
            out.append(encode_tiles(x, self.cfg, None if lut is None else lut[i], max_bytes=self.opts.viterbi_bytes))
        return torch.stack(out)

    def _packed(self, states: torch.Tensor) -> QuantizedTensor:
        *_, n, _ = self.shape
        parts = {"states": states.reshape(*self.lead, *self.grid, self.steps),
                 "scale": self.scale.detach().reshape(*self.lead, n)}
        if self.lut is not None:
            parts["lut"] = self.lut.detach().reshape(*self.lead, *self.lut.shape[-2:])
        return TrellisTensor.from_parts(self.shape, parts, self.cfg)

    def _code_domain(self, target: torch.Tensor) -> torch.Tensor:
        """A weight-domain ``[*shape]`` divided by the fp16 row scales -> ``[E, N, K]``."""
        s = self.scale.detach().to(torch.float16).to(torch.float32)
        safe = torch.where(s == 0, torch.ones_like(s), s)
        return target.detach().to(torch.float32).reshape(self.e, *self.shape[-2:]) / safe.unsqueeze(-1)

    def _reencode(self, target: torch.Tensor, max_fraction: float) -> float:
        """Move ``self.states`` towards ``target`` (module docstring); the fraction of steps changed."""
        cand = self._viterbi(self._code_domain(target))  # [E, B, S]
        tables = self._tables(train=False)
        s = self.scale.detach().to(torch.float16).to(torch.float32)  # [E, N]
        goal = target.detach().to(torch.float32).reshape(self.e, *self.shape[-2:])

        def tile_err(states: torch.Tensor) -> torch.Tensor:  # [E, B]
            w = self._decode(states, tables) * s.unsqueeze(-1)  # [E, N, K]
            return to_tiles((w - goal).square(), self.cfg.tile).sum(-1).reshape(self.e, -1)

        gain = (tile_err(self.states) - tile_err(cand)).reshape(-1)  # [E·B]
        moved = (cand != self.states).sum(-1).reshape(-1)  # [E·B]
        order = torch.argsort(gain, descending=True, stable=True)
        useful = gain[order] > 0
        within = torch.cumsum(moved[order] * useful, 0) <= int(max_fraction * self.states.numel())
        take = torch.zeros_like(useful)
        take[order] = useful & within
        new = torch.where(take.view(*self.states.shape[:2], 1), cand, self.states)
        frac = int((new != self.states).sum()) / max(1, self.states.numel())
        self.states = new
        return frac

    def code_count(self) -> int:
        """The number of codes ``reencode`` counts (trellis steps)."""
        return self.states.numel()

    def set_temperature(self, tau: float) -> None:
        """No temperature here (hard codes)."""

    def _base_state(self) -> dict[str, torch.Tensor]:
        out = {"states": self.states, "scale": self.scale.detach()}
        if self.lut is not None:
            out["lut"] = self.lut.detach()
        return out

    def _load_base(self, state: dict[str, torch.Tensor]) -> None:
        self.states = state["states"].to(torch.int64).clone()
        with torch.no_grad():
            self.scale.copy_(state["scale"])
            if self.lut is not None:
                self.lut.copy_(state["lut"])


class TrellisKD(_Trellis):
    """Codes fixed; the fp16 row scales and the HYB LUT train (module docstring)."""

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale} if self.lut is None else {"scale": self.scale, "lut": self.lut}

    def weight(self) -> torch.Tensor:
        return self._out(self._decode(self.states, self._tables(train=True)))

    def reencode(self, target: torch.Tensor, max_fraction: float) -> float:
        return self._reencode(target, max_fraction)

    def state(self) -> dict[str, torch.Tensor]:
        return self._base_state()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self._load_base(state)

    def packed(self) -> QuantizedTensor:
        return self._packed(self.states)


class _Latent(_Trellis):
    """Shared by BCJR and STE: the latent weight ``[E, N, K]`` in code units and a count of ``weight()`` calls."""

    def __init__(self, qt: TrellisTensor, options: TrellisTrainOptions | None = None) -> None:
        super().__init__(qt, options)
        self.latent = _leaf(self._decode(self.states, self._tables(train=False)))  # [E, N, K]
        self.calls = 0

    def parameters(self) -> dict[str, torch.Tensor]:
        out = {"latent": self.latent, "scale": self.scale}
        if self.lut is not None:
            out["lut"] = self.lut
        return out

    def reencode(self, target: torch.Tensor, max_fraction: float) -> float:
        return self._reencode(target, max_fraction)

    def _due(self, every: int) -> bool:
        """Counts a ``weight()`` call; True on calls ``1 + k·every``, ``k >= 1``."""
        self.calls += 1
        return every > 0 and self.calls > 1 and (self.calls - 1) % every == 0

    def state(self) -> dict[str, torch.Tensor]:
        return {**self._base_state(), "latent": self.latent.detach(), "calls": torch.tensor(self.calls)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self._load_base(state)
        with torch.no_grad():
            self.latent.copy_(state["latent"])
        self.calls = int(state["calls"])

    def packed(self) -> QuantizedTensor:
        return self._packed(self._viterbi(self.latent))


class TrellisSTE(_Latent):
    """Straight-through trellis QAT: hard Viterbi codes of the latent forward, identity backward into it."""

    def weight(self) -> torch.Tensor:
        if self._due(self.opts.ste_every):
            self.states = self._viterbi(self.latent)
        hard = self._decode(self.states, self._tables(train=True))  # [E, N, K]
        return self._out(hard + (self.latent - self.latent.detach()))


class TrellisBCJR(_Latent):
    """BCJR-QAT: the soft codeword of the latent at temperature ``tau`` (module docstring)."""

    def __init__(self, qt: TrellisTensor, options: TrellisTrainOptions | None = None) -> None:
        super().__init__(qt, options)
        self.tau = self.opts.tau

    def set_temperature(self, tau: float) -> None:
        if not (tau > 0 and math.isfinite(tau)):
            raise ValueError(f"temperature {tau} must be finite and > 0")
        self.tau = float(tau)

    def geometry(self, back: int = 0) -> SoftGeometry:
        """The sub-trellis of the current ``weight()`` call (``back`` refreshes earlier): its free positions rotate
        once per refresh of the reference."""
        every = self.opts.refresh_every
        rotation = 0 if every == 0 else max(0, self.calls - 1) // every
        return soft_geometry(self.cfg.L, self.kv, self.opts.soft_bits, max(0, rotation - back))

    def _overlap(self, ref: torch.Tensor, geom: SoftGeometry) -> torch.Tensor | None:
        return soft_overlap(ref, geom) if self.cfg.tail_biting else None

    def _soft(self, train: bool) -> torch.Tensor:
        """The soft codeword ``[E, N, K]`` of the latent at the current temperature and sub-trellis (``train``:
        differentiable in the latent and the straight-through LUT)."""
        geom = self.geometry()
        ref = self.states.reshape(-1, self.steps)
        latent = self.latent if train else self.latent.detach()
        y = soft_codeword(self._tiles(latent), self._tables(train=train), self.tau, geom, ref,
                          self._overlap(ref, geom), self._group(), self.opts.soft_bytes)  # [E·B, S, V]
        return self._untile(y)

    def harden_input(self) -> torch.Tensor:
        """What ``packed()`` runs the codec's Viterbi on, code units ``[E, N, K]``: the soft codeword now (no
        gradient) or the latent (``harden``)."""
        if self.opts.harden == "latent":
            return self.latent.detach().clone()
        with torch.no_grad():
            return self._soft(train=False)

    def weight(self) -> torch.Tensor:
        group = self._group()
        if self._due(self.opts.refresh_every):
            before = self.geometry(back=1)  # the sub-trellis the passes since the last refresh ran on
            ref = self.states.reshape(-1, self.steps)  # [E·B, S]
            walks = hard_path(self._tiles(self.latent.detach()), self._tables(train=False), before, ref,
                              self._overlap(ref, before), group, self.opts.soft_bytes)
            self.states = walks.reshape(self.states.shape)
        return self._out(self._soft(train=True))

    def packed(self) -> QuantizedTensor:
        return self._packed(self._viterbi(self.harden_input()))

    def state(self) -> dict[str, torch.Tensor]:
        return {**super().state(), "tau": torch.tensor(self.tau, dtype=torch.float64)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state(state)
        self.tau = float(state["tau"])


TRELLIS_TRAINABLES: dict[str, type] = {"bcjr": TrellisBCJR, "ste": TrellisSTE, "kd": TrellisKD}
