"""Import a Triton kernel module on demand, or say once why it cannot be used.

Triton reads ``TRITON_INTERPRET`` when a ``@triton.jit`` function is defined, i.e. when its module is
imported; importing through here, only when a kernel is first needed, lets tests set the variable first
(``TRITON_INTERPRET=1`` runs the kernels on CPU tensors, slowly: how CI checks them without a GPU).
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def triton_module(name: str) -> ModuleType | None:
    """``moequant.kernels.<name>`` (a module of Triton kernels), or ``None`` with one warning when Triton is
    not installed (then the callers run the pure-torch reference)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        log.warning("moequant: Triton is not installed; packed GPU layers use the slower pure-torch path "
                    "(pip install triton, the version your torch build names)")
        return None
    return importlib.import_module(f"moequant.kernels.{name}")
