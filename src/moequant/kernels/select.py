"""Which implementation a packed op runs: the fast kernels (default) or the pure-torch reference.

Every packed-format op has a reference path (decode the whole matrix with torch ops, then a float
matmul: the definition, kept as the oracle) and, where one exists for the device, a fast path.
``MOEQUANT_KERNELS=reference`` in the environment, or ``with reference_kernels():`` in code, forces the
reference everywhere (tests compare the two; benchmarks measure both side by side in one process).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("moequant_kernels", default=None)
MODES = ("auto", "reference")


def kernel_mode() -> str:
    """``"auto"`` (fast path where one applies) or ``"reference"``."""
    forced = _FORCED.get()
    if forced is not None:
        return forced
    mode = os.environ.get("MOEQUANT_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"MOEQUANT_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def use_fast() -> bool:
    return kernel_mode() != "reference"


@contextlib.contextmanager
def kernels(mode: str) -> Iterator[None]:
    if mode not in MODES:
        raise ValueError(f"kernel mode {mode!r}: expected one of {', '.join(MODES)}")
    token = _FORCED.set(mode)
    try:
        yield
    finally:
        _FORCED.reset(token)


def reference_kernels() -> contextlib.AbstractContextManager[None]:
    """Force the pure-torch reference path inside the block."""
    return kernels("reference")
