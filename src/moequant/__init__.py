"""moequant: quantize Hugging Face causal LMs (MoE first) to 2-4 bits, keep them packed, prove the loss.

The public entry points are imported lazily so that ``import moequant`` stays cheap and has no
side effects: ``moequant.quantize``, ``moequant.save``, ``moequant.load``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["quantize", "save", "load", "__version__"]


def __getattr__(name: str):
    if name in ("quantize", "save", "load"):
        from moequant import api

        return getattr(api, name)
    raise AttributeError(f"module 'moequant' has no attribute {name!r}")
