"""Each packed format opened up for training: its discrete codes, its continuous parameters, its decode.

Every class here takes the packed tensor it opens and keeps the same interface (``finetune.trainable``):
``parameters()`` (float32 leaves), ``weight()`` (the decoded ``[*shape]``, differentiable in them, equal to
the format's ``dequantize()`` bit for bit before any step), ``state()`` / ``load_state()`` (for resuming) and
``packed()`` (the tensor in its own format again). The forward pass computes with the values the format
stores: a parameter stored in float16 / bfloat16 is rounded to that dtype with the identity as its gradient
(``straight_through``), so the trained model is exactly the saved one.

What trains, per format (the codes never change here; only PV-tuning's V-step re-chooses codes):

- ``uniform-packed`` / ``uniform-asym-packed`` (``UniformScales``): the group scales. The asymmetric zero
  points are stored as packed *integers* on the code grid, so they stay fixed.
- ``lut4-packed`` (``LutAbsmax``): the float16 block absmax. The 16-entry table is fixed by the format.
- ``lut4-dq-packed`` (``LutDqScales``): the float32 scales and offset of the double quantization; the 8-bit
  absmax codes stay fixed, so each absmax moves only through the scale of its block of 256 and the offset.
- ``gguf-*`` (``GgufScales``): the float16 super-block scales ``d`` (and ``dmin``, the min scale or offset,
  where the type has one); the integer sub-block scales and mins stay fixed. A tensor stored as F16 (the
  fallback for rows no block divides) trains its float16 values.
- ``additive-packed`` (``AdditiveTrainable``): the codebooks and row scales; ``reencode`` is PV-tuning's
  V-step on its codes.
- ``rht`` (``Rotated``): whatever its inner tensor trains, seen through the rotation: ``weight()`` maps the
  inner weight back exactly as ``RotatedTensor.dequantize`` does, ``reencode`` maps its target into the
  rotated domain (the rotation is orthogonal: distances are kept), ``packed()`` rewraps with the same signs.
"""

from __future__ import annotations

from typing import Any

import torch

from moequant.codecs.additive import project_codebooks, reconstruct
from moequant.codecs.kquant import BlockParams, decode, effective
from moequant.codecs.kquant_pack import pack_blocks, pack_f16, unpack_blocks, unpack_f16
from moequant.codecs.lut import dq_dequantize, lut_dequantize, lut_values
from moequant.codecs.uniform import SCALE_DTYPES, num_groups, resolve_group_size, uniform_dequantize
from moequant.finetune.pv import v_step
from moequant.formats.additive import AdditiveTensor
from moequant.formats.base import QuantizedTensor
from moequant.formats.bitpack import unpack
from moequant.formats.kquant import GgufTensor
from moequant.formats.lut import CODE_BITS, LutDqTensor, LutTensor
from moequant.formats.rotated import INNER, RotatedTensor


def straight_through(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` with its ``dtype``-rounded values (as float32) in the forward pass and the identity as its gradient.
    Exact: ``t + (r − t)`` is ``r`` when ``r`` is ``t`` rounded to a coarser float (Sterbenz: ``r − t`` is exact)."""
    if dtype == torch.float32:
        return t
    return t + (t.detach().to(dtype).to(torch.float32) - t.detach())


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``t`` that requires grad."""
    return t.detach().to(torch.float32).clone().requires_grad_(True)


def _replaced(qt: QuantizedTensor, data: dict[str, torch.Tensor]) -> QuantizedTensor:
    """``qt`` with some data tensors replaced (same class, shape and attributes; the others are shared)."""
    return type(qt)(qt.shape, {**qt.data, **data}, dict(qt.attrs))


class _Params:
    """Shared by the classes whose state is their parameters ``self.params`` alone (the codes are the run's)."""

    params: dict[str, torch.Tensor]

    def parameters(self) -> dict[str, torch.Tensor]:
        return self.params

    def state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.params.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state[k])


class UniformScales(_Params):
    """Int-k codes ``[..., N, K]`` and zero points ``[..., N, G]`` fixed; the scales ``[..., N, G]`` train in
    their stored dtype."""

    def __init__(self, qt: QuantizedTensor) -> None:
        self.qt, self.shape = qt, tuple(qt.shape)
        bits, k = qt.attrs["bits"], self.shape[-1]
        self.gs = resolve_group_size(k, qt.attrs["group_size"])
        self.codes = unpack(qt.data["codes"], bits, k)  # [..., N, K]
        self.zero = unpack(qt.data["zero"], bits, num_groups(k, self.gs)) if "zero" in qt.data else None  # [..., N, G]
        self.dtype = SCALE_DTYPES[qt.attrs["scale_dtype"]]
        self.params = {"scale": leaf(qt.data["scale"])}  # [..., N, G]

    def weight(self) -> torch.Tensor:
        return uniform_dequantize(self.codes, straight_through(self.params["scale"], self.dtype), self.zero, self.gs,
                                  self.qt.attrs["bits"], self.qt.attrs.get("grid", "midtread"))

    def packed(self) -> QuantizedTensor:
        return _replaced(self.qt, {"scale": self.params["scale"].detach().to(self.dtype)})


class LutAbsmax(_Params):
    """4-bit table codes ``[..., N, K]`` fixed; the float16 block absmax ``[..., N, NB]`` trains."""

    def __init__(self, qt: LutTensor) -> None:
        self.qt, self.shape = qt, tuple(qt.shape)
        self.codes = unpack(qt.data["codes"], CODE_BITS, self.shape[-1])  # [..., N, K]
        self.params = {"absmax": leaf(qt.data["absmax"])}  # [..., N, NB]

    def weight(self) -> torch.Tensor:
        absmax = straight_through(self.params["absmax"], torch.float16)
        return lut_dequantize(self.codes, absmax, lut_values(self.qt.attrs["lut"]), self.qt.attrs["block_size"])

    def packed(self) -> QuantizedTensor:
        return _replaced(self.qt, {"absmax": self.params["absmax"].detach().to(torch.float16)})


class LutDqScales(_Params):
    """4-bit table codes and 8-bit absmax codes fixed; the float32 double-quant scales ``[..., D]`` and offset
    ``[..., 1]`` train (stored in float32: no rounding)."""

    def __init__(self, qt: LutDqTensor) -> None:
        self.qt, self.shape = qt, tuple(qt.shape)
        self.codes = unpack(qt.data["codes"], CODE_BITS, self.shape[-1])  # [..., N, K]
        self.params = {"absmax_scale": leaf(qt.data["absmax_scale"]),  # [..., D]
                       "absmax_offset": leaf(qt.data["absmax_offset"])}  # [..., 1]

    def weight(self) -> torch.Tensor:
        a, p = self.qt.attrs, self.params
        absmax = dq_dequantize(self.qt.data["absmax_codes"], p["absmax_scale"], p["absmax_offset"],
                               a["dq_block_size"])  # [..., N, NB]
        return lut_dequantize(self.codes, absmax, lut_values(a["lut"]), a["block_size"])

    def packed(self) -> QuantizedTensor:
        return _replaced(self.qt, {k: p.detach().clone() for k, p in self.params.items()})


class GgufScales(_Params):
    """GGUF blocks: codes and integer sub-block scales / mins fixed; the float16 ``d`` ``[..., N, B]`` (and
    ``dmin``) train. F16 rows: the float16 values ``[..., N, K]`` train."""

    def __init__(self, qt: GgufTensor) -> None:
        self.qt, self.shape, self.type = qt, tuple(qt.shape), qt.stored
        raw = qt.data["blocks"]  # [..., N, bytes]
        self.params = {}
        if self.type.kind == "float":
            self.params["values"] = leaf(unpack_f16(raw))  # [..., N, K]
            return
        self.codes, p = unpack_blocks(self.type, raw)  # [..., N, K]
        self.fixed = {"scales": p.scales, "mins": p.mins}  # int16 [..., N, B, S] or None
        self.params["d"] = leaf(p.d)  # [..., N, B]
        if p.dmin is not None:
            self.params["dmin"] = leaf(p.dmin)  # [..., N, B]

    def _block_params(self, values: dict[str, torch.Tensor]) -> BlockParams:
        return BlockParams(values["d"], values.get("dmin"), self.fixed["scales"], self.fixed["mins"])

    def weight(self) -> torch.Tensor:
        rounded = {k: straight_through(p, torch.float16) for k, p in self.params.items()}
        if self.type.kind == "float":
            return rounded["values"]
        scale, offset = effective(self.type, self._block_params(rounded))
        return decode(self.type, self.codes, scale, offset)

    def packed(self) -> QuantizedTensor:
        values = {k: p.detach().to(torch.float16) for k, p in self.params.items()}
        raw = pack_f16(values["values"]) if self.type.kind == "float" else \
            pack_blocks(self.type, self.codes, self._block_params(values))
        return _replaced(self.qt, {"blocks": raw})


class AdditiveTrainable:
    """An ``AdditiveTensor`` opened up: codes int64 ``[E, N, G, M]``, codebooks float32 ``[S, M, C, g]`` (``S = 1``
    for one set — a plain linear or ``share="layer"`` — else ``E``), scales float32 ``[E, N]``. The forward
    uses their stored values (scales in float16, codebooks on their ``codebook_bits`` grid, straight through),
    so training computes with what is stored. ``reencode`` is the V-step."""

    def __init__(self, qt: AdditiveTensor) -> None:
        self.shape = tuple(qt.shape)
        self.cfg = qt.config
        *lead, n, k = self.shape
        e = 1 if not lead else lead[0]
        self.codes = qt.codes().reshape(e, n, k // self.cfg.g, self.cfg.M)  # [E, N, G, M]
        books = qt.codebook_values().to(torch.float32)
        self.books = books.reshape(-1, *books.shape[-3:]).clone().requires_grad_(True)  # [S, M, C, g]
        self.scale = qt.data["scale"].to(torch.float32).reshape(e, n).clone().requires_grad_(True)  # [E, N]

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"codebooks": self.books, "scale": self.scale}

    def _books(self, books: torch.Tensor) -> torch.Tensor:
        return books[0] if books.shape[0] == 1 else books  # [M, C, g] or [E, M, C, g]

    def _stored_books(self) -> torch.Tensor:
        """The codebooks as stored, ``[S, M, C, g]`` float32, without a gradient."""
        return project_codebooks(self.books.detach(), self.cfg.codebook_bits)

    def weight(self) -> torch.Tensor:
        # straight through: exact as in ``straight_through`` (a value and its rounding are within a factor 2 of
        # each other, or the rounding is 0)
        books = self._books(self.books + (self._stored_books() - self.books.detach()))
        return reconstruct(self.codes, books, straight_through(self.scale, torch.float16)).reshape(self.shape)

    def reencode(self, target: torch.Tensor, max_fraction: float) -> float:
        e, n, _, _ = self.codes.shape
        books = self._books(self._stored_books())
        scale = self.scale.detach().to(torch.float16).to(torch.float32)
        self.codes, frac = v_step(target.reshape(e, n, -1), self.codes, books, scale, max_fraction)
        return frac

    def code_count(self) -> int:
        return self.codes.numel()

    def state(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "codebooks": self.books.detach(), "scale": self.scale.detach()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.codes = state["codes"].to(torch.int64).clone()
        with torch.no_grad():
            self.books.copy_(state["codebooks"])
            self.scale.copy_(state["scale"])

    def packed(self) -> QuantizedTensor:
        *lead, n, _ = self.shape
        books = self._books(self.books.detach())  # [M, C, g] or [E, M, C, g]
        parts = {"codes": self.codes.reshape(*lead, *self.codes.shape[1:]), "codebooks": books,
                 "scale": self.scale.detach().reshape(*lead, n)}
        return AdditiveTensor.from_parts(self.shape, parts, self.cfg)


class Rotated:
    """An ``rht`` tensor around its inner tensor opened by the same method (``inner``): the rotation is fixed,
    the inner tensor trains in the rotated domain (see the module docstring)."""

    def __init__(self, qt: RotatedTensor, inner: Any) -> None:
        self.qt, self.shape, self.inner = qt, tuple(qt.shape), inner
        self.inc = qt.incoherence()

    def parameters(self) -> dict[str, torch.Tensor]:
        return self.inner.parameters()

    def weight(self) -> torch.Tensor:
        return self.inc.weight_inverse(self.inner.weight())  # [*shape], as RotatedTensor.dequantize

    def reencode(self, target: torch.Tensor, max_fraction: float) -> float:
        return self.inner.reencode(self.inc.weight(target), max_fraction)

    def code_count(self) -> int:
        return self.inner.code_count()

    def set_temperature(self, tau: float) -> None:
        """The inner tensor's temperature (a soft trellis); nothing for an inner tensor without one."""
        setter = getattr(self.inner, "set_temperature", None)
        if setter is not None:
            setter(tau)

    def state(self) -> dict[str, torch.Tensor]:
        return self.inner.state()

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.inner.load_state(state)

    def packed(self) -> QuantizedTensor:
        inner = self.inner.packed()
        data = {"sign_in": self.qt.data["sign_in"], "sign_out": self.qt.data["sign_out"],
                **{INNER + d: t for d, t in inner.data.items()}}
        return RotatedTensor(self.shape, data, {"inner": inner.meta(), "transform": self.inc.rule})
