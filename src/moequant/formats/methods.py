"""The one registration point of every quantization method: ``--method NAME`` -> config, CLI flags, LDLQ
column quantizer, packed tensor classes.

A :class:`Method` entry ties together everything the rest of the code used to dispatch on by
``isinstance``:

- ``config_type`` (and ``select``, the field values that single this method out when several methods
  share a config type, as nf4 and fp4 share ``LutConfig``);
- ``formats``: the packed tensor classes its weights are stored in, and ``pick``, which of them holds a
  given config (the checkpoint registry ``formats.registry.FORMATS`` is built from these);
- ``columns``: how GPTQ / BlockLDLQ drives the codec column block by column block
  (``codecs.columns``), or ``None`` when the codec cannot be driven by LDLQ;
- ``flags`` and ``from_flags``: the command-line options that belong to the method (a flag of another
  method is an error, not ignored) and how its config is built from their values. ``--method`` and
  ``--bits`` are common to all methods; ``from_flags`` reads ``bits`` when it uses it.

To add a method, define its entry next to its tensor class and append it to ``ALL_METHODS`` below::

    Q4_K = Method(
        name="q4_k", config_type=KQuantConfig, select={"qtype": "Q4_K"},
        formats=(KQuantTensor,),                      # one class: no ``pick`` needed
        columns=kquant_columns,                       # (config, w [R, K], hdiag [K] | None) -> ColumnQuantizer
        flags=(Flag("kq_imatrix", "q4_k: ...", switch=True),),
        from_flags=lambda get: KQuantConfig(qtype="Q4_K", imatrix=get("kq_imatrix", False)))

Its config type must also be in ``codecs.config.CONFIG_TYPES`` (recipes and checkpoints name configs
by type); registration checks that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from moequant.codecs.columns import ColumnQuantizer, lut_columns, trellis_columns, uniform_columns
from moequant.codecs.config import (CONFIG_TYPES, AdditiveConfig, GgufConfig, LutConfig, MethodConfig, TrellisConfig,
                                    UniformConfig)
from moequant.codecs.kquant import TYPES as GGML_TYPES
from moequant.codecs.kquant_columns import gguf_columns
from moequant.formats.additive import AdditiveTensor
from moequant.formats.base import QuantizedTensor
from moequant.formats.kquant import GGUF_CLASSES
from moequant.formats.lut import LutDqTensor, LutTensor
from moequant.formats.trellis import TrellisTensor
from moequant.formats.uniform import UniformAsymTensor, UniformTensor
from moequant.registry import Registry

FlagGetter = Callable[[str, Any], Any]  # get(dest, default): the flag's value, or default when it was not given
ColumnFactory = Callable[[Any, torch.Tensor, "torch.Tensor | None"], ColumnQuantizer]


@dataclass(frozen=True)
class Flag:
    """One command-line option of a method, ``--dest-with-dashes``. Value options default to ``None`` and
    switches to ``False``, so the CLI can tell a given flag from an absent one."""

    dest: str
    help: str
    type: type | None = None  # int or float; None keeps the string
    choices: tuple[str, ...] | None = None
    switch: bool = False


@dataclass(frozen=True)
class Method:
    """One quantization method (see the module docstring)."""

    name: str
    config_type: type[MethodConfig]
    formats: tuple[type[QuantizedTensor], ...]
    from_flags: Callable[[FlagGetter], MethodConfig]
    flags: tuple[Flag, ...] = ()
    columns: ColumnFactory | None = None
    pick: Callable[[Any], type[QuantizedTensor]] | None = None  # needed when ``formats`` has several classes
    select: Mapping[str, Any] = field(default_factory=dict)

    def claims(self, config: MethodConfig) -> bool:
        """Is ``config`` one of this method's configs?"""
        return isinstance(config, self.config_type) and all(getattr(config, k) == v for k, v in self.select.items())

    def tensor_class(self, config: MethodConfig) -> type[QuantizedTensor]:
        """The packed class that stores weights quantized under ``config``."""
        return self.formats[0] if self.pick is None else self.pick(config)


class MethodRegistry(Registry[Method]):
    """Methods by name, kept in registration order (the order of ``--method`` choices and flags)."""

    def __init__(self, methods: Iterable[Method] = ()) -> None:
        super().__init__("method")
        self._order: list[Method] = []
        for m in methods:
            self.register(m.name, m)

    def register(self, name: str, item: Method) -> Method:
        if name != item.name:
            raise ValueError(f"method {item.name!r} registered under another name {name!r}")
        if CONFIG_TYPES.get(item.config_type.__name__) is not item.config_type:
            raise ValueError(f"method {name!r}: {item.config_type.__name__} is not in codecs.config.CONFIG_TYPES")
        if len(item.formats) != 1 and item.pick is None:
            raise ValueError(f"method {name!r} stores {len(item.formats)} tensor classes and needs a pick")
        if name not in self:
            for other in self._order:
                if other.config_type is item.config_type and dict(other.select) == dict(item.select):
                    raise ValueError(f"methods {other.name!r} and {name!r} claim the same configs")
        super().register(name, item)
        self._order.append(item)
        return item

    def ordered(self) -> tuple[Method, ...]:
        return tuple(self._order)

    def find(self, config: MethodConfig) -> Method | None:
        """The method that ``config`` belongs to, or ``None``."""
        return next((m for m in self._order if m.claims(config)), None)

    def flags(self) -> tuple[Flag, ...]:
        """Every method flag once, in registration order (methods may share a flag)."""
        out: dict[str, Flag] = {}
        for m in self._order:
            for f in m.flags:
                if out.setdefault(f.dest, f) != f:
                    raise ValueError(f"method {m.name!r} redefines the flag --{f.dest.replace('_', '-')}")
        return tuple(out.values())


# ---- the built-in methods ----

_INT_FLAGS = (
    Flag("group_size", "int: input columns per scale, -1 = whole row (default 128; a partial last group is allowed)",
         type=int),
    Flag("asym", "int: asymmetric grid with an integer zero point (the default)", switch=True),
    Flag("sym", "int: symmetric midtread grid (q - 2^(b-1))*s, no zero point stored", switch=True),
    Flag("no_clip_search", "int: plain absmax/minmax scales (no MSE clip search)", switch=True),
    Flag("clip_steps", "int: shrink factors tried per group (default 16)", type=int),
    Flag("clip_min", "int: smallest shrink factor (default 0.65)", type=float),
    Flag("scale_dtype", "int: dtype of the stored group scales (default float16)",
         choices=("float16", "bfloat16", "float32")),
)


def _int_from_flags(get: FlagGetter) -> UniformConfig:
    if get("sym", False) and get("asym", False):
        raise ValueError("--sym and --asym contradict each other")
    return UniformConfig(bits=get("bits", 4), group_size=get("group_size", 128), symmetric=bool(get("sym", False)),
                         clip_search=not get("no_clip_search", False), clip_steps=get("clip_steps", 16),
                         clip_min=get("clip_min", 0.65), scale_dtype=get("scale_dtype", "float16"))


INT = Method(name="int", config_type=UniformConfig, formats=(UniformTensor, UniformAsymTensor),
             pick=lambda c: UniformTensor if c.symmetric else UniformAsymTensor,
             columns=uniform_columns, flags=_INT_FLAGS, from_flags=_int_from_flags)


_LUT_FLAGS = (
    Flag("block_size", "nf4/fp4: absmax block (default 64)", type=int),
    Flag("double_quant", "nf4/fp4: quantize the block scales to 8 bits", switch=True),
)


def _lut_method(lut: str) -> Method:
    def from_flags(get: FlagGetter) -> LutConfig:
        bits = get("bits", None)
        if bits is not None and bits != 4:
            raise ValueError(f"--method {lut} stores 4-bit codes; --bits {bits} does not apply "
                             f"(use --method int --bits {bits})")
        return LutConfig(lut=lut, block_size=get("block_size", 64), double_quant=get("double_quant", False))

    return Method(name=lut, config_type=LutConfig, select={"lut": lut}, formats=(LutTensor, LutDqTensor),
                  pick=lambda c: LutDqTensor if c.double_quant else LutTensor,
                  columns=lut_columns, flags=_LUT_FLAGS, from_flags=from_flags)


NF4 = _lut_method("nf4")
FP4 = _lut_method("fp4")


TRELLIS = Method(
    name="trellis", config_type=TrellisConfig, formats=(TrellisTensor,), columns=trellis_columns,
    flags=(
        Flag("trellis_l", "trellis: state bits L (default 16)", type=int),
        Flag("trellis_v", "trellis: weights per step V (default 2)", type=int),
        Flag("trellis_code", "trellis: state -> value code (default hyb; 1mad/3inst need --trellis-v 1)",
             choices=TrellisConfig.CODES),
        Flag("trellis_tile", "trellis: tile side, tile x tile weights per walk (default 16)", type=int),
        Flag("no_tail_biting", "trellis: store each tile's start state in full", switch=True),
    ),
    from_flags=lambda get: TrellisConfig(bits=get("bits", 2), L=get("trellis_l", 16), V=get("trellis_v", 2),
                                         code=get("trellis_code", "hyb"), tile=get("trellis_tile", 16),
                                         tail_biting=not get("no_tail_biting", False)))


_GGUF_FLAGS = (
    Flag("gguf_search_steps", "q2_k ... iq4_nl: candidate scales per block-parameter search (default 8)", type=int),
)


def _gguf_method(qtype: str) -> Method:
    """``--method q4_k`` etc.: one of llama.cpp's GGUF block types (``formats.kquant``)."""
    bits = GGML_TYPES[qtype].bits

    def from_flags(get: FlagGetter) -> GgufConfig:
        given = get("bits", None)
        if given is not None and given != bits:
            raise ValueError(f"--method {qtype} stores {bits}-bit codes; --bits {given} does not apply")
        return GgufConfig(qtype=qtype, search_steps=get("gguf_search_steps", 8))

    return Method(name=qtype, config_type=GgufConfig, select={"qtype": qtype}, formats=(GGUF_CLASSES[qtype],),
                  columns=gguf_columns, flags=_GGUF_FLAGS, from_flags=from_flags)


GGUF_METHODS: tuple[Method, ...] = tuple(_gguf_method(q) for q in GgufConfig.QTYPES)

def _additive_from_flags(get: FlagGetter) -> AdditiveConfig:
    spec = get("codebooks", "2x8")
    try:
        m, b = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"--codebooks {spec!r} is not MxB (M codebooks of 2^B codewords, e.g. 2x8 or 1x16)") from None
    cfg = AdditiveConfig(M=m, B=b, g=get("group", 8), beam=get("beam", 8), init=get("init", "oa-em"),
                         share=get("share", "expert"), search_rounds=get("search_rounds", 3),
                         codebook_bits=get("codebook_bits", 16))
    bits = get("bits", None)
    if bits is not None and bits != cfg.bits:
        raise ValueError(f"--method additive sets its width with --codebooks MxB and --group g ({m}x{b} in groups of "
                         f"{cfg.g}: {cfg.bits:g} code bits/weight); --bits {bits} does not apply")
    return cfg


# AQLM additive codebooks: no column quantizer; the solver hands the encoder the whole Hessian (solvers.solve).
ADDITIVE = Method(
    name="additive", config_type=AdditiveConfig, formats=(AdditiveTensor,),
    flags=(
        Flag("codebooks", "additive: M codebooks of 2^B codewords each, MxB (default 2x8; 1x16 too)"),
        Flag("group", "additive: input weights per codeword (default 8)", type=int),
        Flag("beam", "additive: beam width of the code search (default 8)", type=int),
        Flag("init", "additive: codebook initialisation, residual k-means or k-means + output-aware EM "
             "(default oa-em)", choices=AdditiveConfig.INITS),
        Flag("share", "additive: codebooks per expert (default) or one set for all experts of a fused tensor",
             choices=AdditiveConfig.SHARES),
        Flag("search_rounds", "additive: most rounds of Adam on codebooks and scales + beam search (default 3)",
             type=int),
        Flag("codebook_bits", "additive: codebook storage, 16 (float16, default) or 8 (int8 + a float16 step per "
             "codebook: half their bits, which counts on small matrices)", type=int),
    ),
    from_flags=_additive_from_flags)


ALL_METHODS: tuple[Method, ...] = (INT, NF4, FP4, TRELLIS, *GGUF_METHODS, ADDITIVE)
METHODS = MethodRegistry(ALL_METHODS)


def method_formats() -> tuple[type[QuantizedTensor], ...]:
    """Each registered method's tensor classes once (nf4 and fp4 share theirs), in registration order."""
    out: list[type[QuantizedTensor]] = []
    for m in METHODS.ordered():
        out += [cls for cls in m.formats if cls not in out]
    return tuple(out)


# The methods' own formats by ``format_id`` (a duplicate id raises): what a rotated tensor may wrap. The
# checkpoint registry ``formats.registry.FORMATS`` is these plus the rotated wrapper.
METHOD_FORMATS: Registry[type[QuantizedTensor]] = Registry("format")
for _cls in method_formats():
    METHOD_FORMATS.register(_cls.format_id, _cls)


def tensor_class_for(config: MethodConfig) -> type[QuantizedTensor]:
    """The packed class that stores weights quantized under ``config``."""
    m = METHODS.find(config)
    if m is None:
        raise ValueError(f"no packed format for {type(config).__name__}")
    return m.tensor_class(config)


def column_quantizer(config: MethodConfig, w: torch.Tensor, hdiag: torch.Tensor | None = None) -> ColumnQuantizer:
    """The column quantizer of ``config`` for one matrix ``w [R, K]`` (``hdiag`` ``[K]``: the Hessian diagonal)."""
    m = METHODS.find(config)
    if m is None or m.columns is None:
        raise ValueError(f"{type(config).__name__} has no column quantizer (it cannot be driven by LDLQ)")
    return m.columns(config, w, hdiag)
