"""The temperature schedule of BCJR-QAT: a cosine anneal of ``τ`` from ``start`` to ``end`` over the steps.

Step ``i`` of ``n`` (0-based) trains at ``τ_i = end + (start − end) · (1 + cos(π · i / (n − 1))) / 2``: ``start``
at the first step, ``end`` at the last, slow at both ends (one step: ``start``). A pure function of its
arguments, so a resumed run trains at the same temperatures as an uninterrupted one.
"""

from __future__ import annotations

import math


def cosine_tau(step: int, steps: int, start: float, end: float) -> float:
    """``τ`` of 0-based ``step`` of ``steps`` (see the module docstring)."""
    if not 0 <= step < steps:
        raise ValueError(f"step {step} is outside 0..{steps - 1}")
    if steps == 1:
        return start
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * step / (steps - 1)))


def parse_tau(spec: str) -> tuple[float, float]:
    """``"0.3:0.05"`` -> ``(0.3, 0.05)`` (start, end; both > 0); ``ValueError`` naming ``--tau`` otherwise."""
    parts = spec.split(":")
    try:
        start, end = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--tau {spec!r} is not START:END (e.g. 0.3:0.05)") from None
    if not (start > 0 and end > 0 and math.isfinite(start) and math.isfinite(end)):
        raise ValueError(f"--tau {spec!r}: both temperatures must be finite and > 0")
    return start, end
