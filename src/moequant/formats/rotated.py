"""``RotatedTensor`` (format ``rht`` v2): a packed tensor of the *incoherent* weight
``W̃ = H_N S_V W S_U H_Kᵀ`` plus the random sign vectors that undo the rotation.

``H_n`` is the orthonormal Hadamard-type transform of ``codecs.hadamard`` (fast Walsh–Hadamard,
Kronecker with a small block for non-powers of two) and ``S_U``, ``S_V`` are diagonal ±1 matrices.
Stored tensors, for a logical weight ``[..., N, K]`` (every expert has its own signs):

- ``sign_in``: uint8 ``[..., packed_len(K, 1)]``, bit ``k`` = 1 where ``S_U[k] = -1`` (1 bit per sign);
- ``sign_out``: uint8 ``[..., packed_len(N, 1)]``, likewise for ``S_V``;
- ``inner_<data>``: the inner format's tensors (any registered format), which encode ``W̃``.

Attributes: ``inner`` = the inner tensor's ``meta()``; ``transform`` = the rule of ``H_n`` (``codecs.hadamard``:
``"paley-outer"``, ``B_m ⊗ H_p``, what new tensors use; ``"paley"``, ``H_p ⊗ B_m``; ``"hartley"``,
``C_o ⊗ H_p``). Version 1 had no
``transform`` attribute: its tensors are ``"paley"`` and load and decode as before. Decoding: ``W = S_V H_Nᵀ W̃ H_K S_U``. At run
time ``y = W x`` is computed without decoding ``W``: ``y = S_V H_Nᵀ (W̃ (H_K S_U x))``
(``linear``). The signs count towards ``bits_per_weight`` like every other stored bit.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from moequant.codecs.config import MethodConfig
from moequant.codecs.hadamard import RULES, Incoherence
from moequant.formats.base import QuantizedTensor
from moequant.formats.bitpack import pack, packed_len, unpack
from moequant.formats.methods import METHOD_FORMATS

INNER = "inner_"


def _pack_signs(s: torch.Tensor) -> torch.Tensor:
    return pack((s < 0).to(torch.uint8), 1)  # [..., packed_len(n, 1)]


def _unpack_signs(b: torch.Tensor, n: int) -> torch.Tensor:
    return 1.0 - 2.0 * unpack(b, 1, n).to(torch.float32)  # [..., n] of ±1


class RotatedTensor(QuantizedTensor):
    format_id: ClassVar[str] = "rht"
    format_version: ClassVar[int] = 2  # v2: the ``transform`` attribute (v1: always "paley")
    config_type: ClassVar[type[MethodConfig]] = MethodConfig
    data_names: ClassVar[tuple[str, ...]] = ("sign_in", "sign_out")
    attr_names: ClassVar[tuple[str, ...]] = ("inner", "transform")

    @classmethod
    def names_for(cls, attrs: dict[str, Any]) -> tuple[str, ...]:
        return cls.data_names + tuple(INNER + n for n in _inner_class(attrs["inner"]).names_for(attrs["inner"]))

    @classmethod
    def wrap(cls, inner: QuantizedTensor, incoherence: Any) -> "RotatedTensor":
        """``inner`` encodes ``W̃``; ``incoherence`` (``codecs.hadamard.Incoherence``) holds signs
        ``[..., K]`` / ``[..., N]`` (or shared ``[K]`` / ``[N]``, which are broadcast over the experts)."""
        *lead, n, k = inner.shape
        s_in = torch.broadcast_to(incoherence.sign_in, (*lead, k))  # [..., K]
        s_out = torch.broadcast_to(incoherence.sign_out, (*lead, n))  # [..., N]
        data = {"sign_in": _pack_signs(s_in), "sign_out": _pack_signs(s_out),
                **{INNER + d: t for d, t in inner.data.items()}}
        return cls(inner.shape, data, {"inner": inner.meta(), "transform": incoherence.rule})

    @property
    def transform(self) -> str:
        """The rule of ``H_n`` (``check_meta`` gives a version-1 tensor ``"paley"``)."""
        return self.attrs["transform"]

    @classmethod
    def encode(cls, w: torch.Tensor, config: MethodConfig, hessian: torch.Tensor | None = None) -> "QuantizedTensor":
        raise TypeError("RotatedTensor wraps an encoded tensor: use solvers.solve.solve_tensor with incoherence='rht'")

    @classmethod
    def from_parts(cls, shape: tuple[int, ...], parts: dict[str, torch.Tensor], config: MethodConfig
                   ) -> "QuantizedTensor":
        raise TypeError("RotatedTensor wraps an encoded tensor: use RotatedTensor.wrap")

    @classmethod
    def expected_bits_per_weight(cls, shape: tuple[int, ...], config: MethodConfig) -> float:
        raise TypeError("the bits of a rotated tensor are the inner format's plus (N + K) sign bits per matrix")

    @classmethod
    def check_meta(cls, meta: Any) -> tuple[tuple[int, ...], dict[str, Any]]:
        """The base checks, and the transform rule by version: version 1 has none (``"paley"``), from version 2
        it must be recorded (a v2 tensor without it would decode under the wrong ``H_n``)."""
        shape, attrs = super().check_meta(meta)
        has = "transform" in attrs
        if meta.get("format_version", 1) >= 2 and not has:
            raise ValueError(f"{cls.format_id} version {meta['format_version']}: missing attributes ['transform']")
        if meta.get("format_version", 1) == 1:
            if has:
                raise ValueError(f"{cls.format_id} version 1 has no 'transform' attribute (found {attrs['transform']!r})")
            attrs["transform"] = "paley"  # what version 1 meant; the tensor's meta() is then the current version's
        return shape, attrs

    @classmethod
    def check_attrs(cls, attrs: dict[str, Any]) -> None:
        """``inner`` is a valid ``meta()`` of a non-rotated format."""
        if "inner" not in attrs:
            raise ValueError("missing attributes ['inner']")
        if attrs.get("transform", "paley") not in RULES:
            raise ValueError(f"transform {attrs['transform']!r} is not one of {', '.join(RULES)}")
        inner = attrs["inner"]
        if not isinstance(inner, dict) or not isinstance(inner.get("format"), str):
            raise ValueError(f"inner metadata {inner!r} has no format")
        try:
            _inner_class(inner).check_meta(inner)
        except KeyError as e:
            raise ValueError(f"inner: {e.args[0] if e.args else e}") from None
        except ValueError as e:
            raise ValueError(f"inner: {e}") from None

    @classmethod
    def data_spec(cls, shape: tuple[int, ...], attrs: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """sign_in uint8 ``[..., packed_len(K, 1)]``, sign_out uint8 ``[..., packed_len(N, 1)]``, and the inner
        format's tensors (prefixed ``inner_``) for the same logical shape."""
        inner = attrs["inner"]
        icls = _inner_class(inner)
        ishape, iattrs = icls.check_meta(inner)
        if ishape != tuple(shape):
            raise ValueError(f"inner shape {list(ishape)} is not the tensor's shape {list(shape)}")
        *lead, n, k = shape
        spec = {"sign_in": ((*lead, packed_len(k, 1)), torch.uint8),
                "sign_out": ((*lead, packed_len(n, 1)), torch.uint8)}
        spec.update({INNER + d: v for d, v in icls.data_spec(ishape, iattrs).items()})
        return spec

    # --- views ------------------------------------------------------------------------------------
    @property
    def inner(self) -> QuantizedTensor:
        meta = self.attrs["inner"]
        cls = _inner_class(meta)
        return cls(tuple(meta["shape"]), {d: self.data[INNER + d] for d in cls.names_for(meta)},
                   {a: meta[a] for a in cls.attr_names})

    def incoherence(self) -> Incoherence:
        *_, n, k = self.shape
        return Incoherence(sign_in=_unpack_signs(self.data["sign_in"], k),
                           sign_out=_unpack_signs(self.data["sign_out"], n), rule=self.transform)

    def select(self, index: int) -> "QuantizedTensor":
        if len(self.shape) < 3:
            raise ValueError(f"{self.format_id}: select() needs a leading expert dim, shape is {self.shape}")
        inner = self.inner.select(index)
        data = {n: t[index] for n, t in self.data.items()}
        return RotatedTensor(self.shape[1:], data, {**self.attrs, "inner": inner.meta()})

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        return RotatedTensor(self.shape, {n: t.to(device) for n, t in self.data.items()}, dict(self.attrs))

    # --- decoding -----------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w_rot = self.inner.dequantize(torch.float32)  # [..., N, K]
        return self.incoherence().weight_inverse(w_rot).to(dtype)

    def _runtime_views(self):
        """(inner view, ``Incoherence``), built once per instance and kept outside ``data`` (not saved): the
        signs are unpacked once, and a runtime cache the inner tensor's kernel keeps (a repacked weight)
        lives as long as this view. (``QuantLinear`` keeps one view while its buffers are unchanged.)"""
        cache = self.__dict__.setdefault("_runtime", {})
        if "rht_views" not in cache:
            import moequant.kernels.hadamard  # noqa: F401  (installs the C++ transform: codecs.hadamard)

            cache["rht_views"] = (self.inner, self.incoherence())
        return cache["rht_views"]

    def prepare_runtime(self) -> None:
        """The Hadamard factors of both sides, built now (a compiled graph reads them as constants)."""
        from moequant.codecs.hadamard import warm

        warm(self.shape[-1], rule=self.transform)
        warm(self.shape[-2], rule=self.transform)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., K] -> x Wᵀ + b [..., N]`` for a 2-D tensor, rotating the activations instead of
        decoding ``W``; the rotated product ``W̃ x̃`` is the inner tensor's ``linear`` (its fast path)."""
        if len(self.shape) != 2:
            raise ValueError(f"linear() needs a 2-D tensor, shape is {self.shape}; select an expert first")
        inner, inc = self._runtime_views()
        xr = inc.transform_input(x.to(torch.float32))  # [..., K]
        y = inc.restore_output(inner.linear(xr)).to(x.dtype)  # [..., N]: the inner format's fast path
        return y if bias is None else y + bias


def _inner_class(meta: dict[str, Any]) -> type[QuantizedTensor]:
    """The format class of an inner tensor: one of the methods' formats (``KeyError`` naming the known ones)."""
    if meta["format"] == RotatedTensor.format_id:
        raise ValueError("a rotated tensor cannot wrap another rotated tensor")
    return METHOD_FORMATS.get(meta["format"])
