"""Typed, frozen, versioned method configs. Each serialises to ``{"type": ClassName, "version": v, ...}``.

Nothing below the CLI sees argv or loose option dicts: it sees one of these.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. Subclasses are frozen dataclasses with a ``VERSION``."""

    VERSION: ClassVar[int] = 1

    def validate(self) -> None:
        """Raise ``ValueError`` naming the option when a field is out of range."""

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": type(self).__name__, "version": self.VERSION}
        for f in dataclasses.fields(self):
            out[f.name] = getattr(self, f.name)
        return out

    @property
    def short_name(self) -> str:
        """A human label such as ``int4-g128``."""
        return type(self).__name__


@dataclass(frozen=True)
class UniformConfig(MethodConfig):
    """Uniform integer grid, one scale (and zero point when asymmetric) per group of ``group_size``
    consecutive input columns.

    symmetric: midrise grid ``(q - (2^b - 1)/2) * s`` with ``s`` from the group's absmax (no zero
    point stored); asymmetric: ``(q - z) * s`` with an integer zero point ``z`` stored at ``bits`` bits.
    clip_search: per group, try ``clip_steps`` shrink factors evenly spaced in ``[clip_min, 1]`` of the
    range and keep the one with the smallest squared error (optionally Hessian-diagonal weighted).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    clip_search: bool = True
    clip_steps: int = 16
    clip_min: float = 0.65
    scale_dtype: str = "float16"

    SUPPORTED_BITS: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 8)

    def validate(self) -> None:
        if self.bits not in self.SUPPORTED_BITS:
            raise ValueError(f"--bits {self.bits} is not supported by the int codec (choose from {self.SUPPORTED_BITS})")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"--group-size must be positive or -1 (whole row), got {self.group_size}")
        if self.clip_steps < 1:
            raise ValueError(f"clip_steps must be >= 1, got {self.clip_steps}")
        if not 0.0 < self.clip_min <= 1.0:
            raise ValueError(f"clip_min must be in (0, 1], got {self.clip_min}")
        if self.scale_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"scale_dtype must be float16, bfloat16 or float32, got {self.scale_dtype}")

    @property
    def short_name(self) -> str:
        g = "row" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits}{'' if self.symmetric else 'a'}-{g}{'-clip' if self.clip_search else ''}"


@dataclass(frozen=True)
class LutConfig(MethodConfig):
    """A 1-D lookup table (NF4, FP4, or any named LUT) with blockwise absmax scaling along the input dim.

    double_quant: the per-block absmax scales are themselves quantized to 8 bits in blocks of
    ``dq_block_size`` (QLoRA's double quantization), with one fp32 scale per such block.
    """

    lut: str = "nf4"
    block_size: int = 64
    double_quant: bool = False
    dq_block_size: int = 256

    KNOWN_LUTS: ClassVar[tuple[str, ...]] = ("nf4", "fp4")

    def validate(self) -> None:
        if self.lut not in self.KNOWN_LUTS:
            raise ValueError(f"unknown LUT {self.lut!r} (choose from {self.KNOWN_LUTS})")
        if self.block_size <= 0:
            raise ValueError(f"--block-size must be positive, got {self.block_size}")
        if self.dq_block_size <= 0:
            raise ValueError(f"dq_block_size must be positive, got {self.dq_block_size}")

    @property
    def short_name(self) -> str:
        return f"{self.lut}-b{self.block_size}{'-dq' if self.double_quant else ''}"


@dataclass(frozen=True)
class TrellisConfig(MethodConfig):
    """QTIP bitshift-trellis code (Tseng et al., NeurIPS 2024).

    A tile of ``tile x tile`` weights (``T = tile²``, default 16 x 16 = 256) is a walk on a trellis whose
    state has ``L`` bits; each step emits ``V`` weights and shifts in ``bits * V`` new bits, so a
    tail-biting tile costs exactly ``bits * T`` bits. ``code`` maps a state to ``V`` values: ``hyb``
    (hash + a learned ``2^Q x 2`` LUT), ``1mad`` or ``3inst`` (computed, no LUT). Each row has one
    scale (fp16) that brings it to the code's unit variance.
    """

    bits: int = 2
    L: int = 16
    V: int = 2
    tile: int = 16
    code: str = "hyb"
    Q: int = 9
    tail_biting: bool = True

    CODES: ClassVar[tuple[str, ...]] = ("hyb", "1mad", "3inst")

    def validate(self) -> None:
        if self.bits not in (1, 2, 3, 4):
            raise ValueError(f"--bits {self.bits} is not supported by the trellis codec (choose from 1, 2, 3, 4)")
        if self.code not in self.CODES:
            raise ValueError(f"--trellis-code {self.code!r} is not one of {self.CODES}")
        if self.V not in (1, 2):
            raise ValueError(f"--trellis-v must be 1 or 2, got {self.V}")
        if not self.bits * self.V < self.L <= 24:
            raise ValueError(f"--trellis-l {self.L} must exceed bits*V={self.bits * self.V} and be at most 24")
        if self.tile <= 0 or (self.tile * self.tile) % self.V:
            raise ValueError(f"tile {self.tile}: tile*tile must be a positive multiple of V={self.V}")
        if self.code == "hyb" and (self.V != 2 or not 1 <= self.Q <= 15):
            raise ValueError(f"the hyb code needs V=2 and 1 <= Q <= 15 (got V={self.V}, Q={self.Q})")

    @property
    def short_name(self) -> str:
        return f"trellis{self.bits}-{self.code}-L{self.L}"


@dataclass(frozen=True)
class GgufConfig(MethodConfig):
    """One of llama.cpp's GGUF block types (``codecs.kquant``), rounded by our weighted block-parameter
    search (and LDLQ when calibrated) straight onto its grid, stored as the exact GGUF bytes.

    qtype: ``q2_k``, ``q3_k``, ``q4_k``, ``q5_k``, ``q6_k`` (super-blocks of 256 along a row) or ``q4_0``,
    ``q5_0``, ``q5_1``, ``q8_0``, ``iq4_nl`` (blocks of 32). A row whose width the type's block does not
    divide is stored in llama.cpp's fallback type (``codecs.kquant.stored_type``). (The field is
    ``qtype``: ``to_dict`` writes the class name under ``type``.)
    search_steps: candidate scales tried per sub-block fit and per super-block scale grid.
    """

    qtype: str = "q4_k"
    search_steps: int = 8

    QTYPES: ClassVar[tuple[str, ...]] = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "q5_0", "q5_1", "q8_0",
                                         "iq4_nl")

    def validate(self) -> None:
        if self.qtype not in self.QTYPES:
            raise ValueError(f"GGUF type {self.qtype!r} is not supported (choose from {', '.join(self.QTYPES)})")
        if not 1 <= self.search_steps <= 64:
            raise ValueError(f"--gguf-search-steps must be in 1..64, got {self.search_steps}")

    @property
    def short_name(self) -> str:
        return f"gguf-{self.qtype}"


@dataclass(frozen=True)
class AdditiveConfig(MethodConfig):
    """AQLM additive codebooks (``codecs.additive``): each group of ``g`` consecutive input weights of a row is
    the sum of ``M`` codewords, one from each of ``M`` codebooks of ``2^B`` vectors of length ``g``, times the
    row's scale; ``M·B/g`` code bits per weight plus the codebooks and float16 row scales.

    beam: beam width of the code search under the full calibration Hessian. init: ``kmeans`` (residual
    k-means, Hessian-diagonal weighted) or ``oa-em`` (k-means, then ``em_rounds`` output-aware EM rounds
    under the Hessian's ``g x g`` diagonal blocks). share: ``expert`` (every expert of a fused ``[E, N, K]``
    tensor has its own codebooks) or ``layer`` (one codebook set for all of them). kmeans_iters: Lloyd
    iterations per codebook. search_rounds: most (Adam on codebooks and scales, beam search) rounds after
    the first beam search; the search stops earlier when a round improves the output error by less than
    ``tol`` (relative). adam_steps / lr: Adam steps per M-step or search round, and its learning rate
    (relative to the codebooks' RMS). seed: k-means starts. codebook_bits: how the codebooks are stored,
    ``16`` (float16) or ``8`` (int8 with one float16 step per codebook; the encoder fits on that grid).
    """

    M: int = 2
    B: int = 8
    g: int = 8
    beam: int = 8
    init: str = "oa-em"
    share: str = "expert"
    em_rounds: int = 3
    kmeans_iters: int = 16
    search_rounds: int = 3
    tol: float = 1e-3
    adam_steps: int = 50
    lr: float = 1e-2
    seed: int = 0
    codebook_bits: int = 16

    INITS: ClassVar[tuple[str, ...]] = ("kmeans", "oa-em")
    SHARES: ClassVar[tuple[str, ...]] = ("expert", "layer")

    def validate(self) -> None:
        if not 1 <= self.M <= 8:
            raise ValueError(f"--codebooks {self.M}x{self.B}: the number of codebooks must be in 1..8")
        if not 1 <= self.B <= 16:
            raise ValueError(f"--codebooks {self.M}x{self.B}: bits per codebook must be in 1..16")
        if not 1 <= self.g <= 64:
            raise ValueError(f"--group {self.g} must be in 1..64")
        if not 1 <= self.beam <= 64:
            raise ValueError(f"--beam {self.beam} must be in 1..64")
        if self.init not in self.INITS:
            raise ValueError(f"--init {self.init!r} is not one of {', '.join(self.INITS)}")
        if self.share not in self.SHARES:
            raise ValueError(f"--share {self.share!r} is not one of {', '.join(self.SHARES)}")
        if self.codebook_bits not in (16, 8):
            raise ValueError(f"--codebook-bits {self.codebook_bits} is not 16 (float16) or 8 (int8 + a step per "
                             f"codebook)")
        for name in ("em_rounds", "search_rounds"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"{name} must be in 0..100, got {getattr(self, name)}")
        if not 1 <= self.kmeans_iters <= 1000:
            raise ValueError(f"kmeans_iters must be in 1..1000, got {self.kmeans_iters}")
        if not 0 <= self.adam_steps <= 100_000:
            raise ValueError(f"adam_steps must be in 0..100000, got {self.adam_steps}")
        if not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    @property
    def bits(self) -> float:
        """Code bits per weight, ``M·B/g`` (codebooks and scales not counted)."""
        return self.M * self.B / self.g

    @property
    def short_name(self) -> str:
        return (f"additive{self.M}x{self.B}-g{self.g}-{self.init}{'-shared' if self.share == 'layer' else ''}"
                f"{'-cb8' if self.codebook_bits == 8 else ''}")


CONFIG_TYPES: dict[str, type[MethodConfig]] = {
    "UniformConfig": UniformConfig,
    "LutConfig": LutConfig,
    "TrellisConfig": TrellisConfig,
    "GgufConfig": GgufConfig,
    "AdditiveConfig": AdditiveConfig,
}


def config_from_dict(d: dict[str, Any]) -> MethodConfig:
    """Inverse of ``MethodConfig.to_dict``; rejects unknown types and newer versions."""
    d = dict(d)
    name = d.pop("type", None)
    version = d.pop("version", 1)
    if name not in CONFIG_TYPES:
        raise ValueError(f"unknown method config type {name!r} (known: {sorted(CONFIG_TYPES)})")
    cls = CONFIG_TYPES[name]
    if version > cls.VERSION:
        raise ValueError(f"{name} version {version} is newer than this moequant supports ({cls.VERSION})")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"{name}: unknown fields {sorted(unknown)}")
    return cls(**d)
