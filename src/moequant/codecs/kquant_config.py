"""``GgufConfig``: quantize to one of llama.cpp's GGUF block types (``codecs.kquant``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moequant.codecs.config import MethodConfig


@dataclass(frozen=True)
class GgufConfig(MethodConfig):
    """A GGUF block type, rounded by our weighted search (and LDLQ when calibrated) straight onto its grid.

    qtype: ``q2_k``, ``q3_k``, ``q4_k``, ``q5_k``, ``q6_k`` (super-blocks of 256 along a row) or ``q4_0``,
    ``q5_0``, ``q5_1``, ``q8_0``, ``iq4_nl`` (blocks of 32), or ``f16``. A row whose width is not a
    multiple of the type's block is stored in llama.cpp's fallback type (``codecs.kquant.stored_type``).
    (Named ``qtype``: ``type`` is the key ``to_dict`` writes the class name under.)
    search_steps: candidate scales tried per sub-block fit and per super-block scale grid.
    """

    qtype: str = "q4_k"
    search_steps: int = 8

    QTYPES: ClassVar[tuple[str, ...]] = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "q5_0", "q5_1", "q8_0",
                                         "iq4_nl", "f16")

    def validate(self) -> None:
        if self.qtype not in self.QTYPES:
            raise ValueError(f"GGUF type {self.qtype!r} is not supported (choose from {', '.join(self.QTYPES)})")
        if not 1 <= self.search_steps <= 64:
            raise ValueError(f"search_steps must be in 1..64, got {self.search_steps}")

    @property
    def short_name(self) -> str:
        return f"gguf-{self.qtype}"
