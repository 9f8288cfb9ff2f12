"""moequant: quantize Hugging Face causal LMs (MoE first) to 2-4 bits, keep them packed, prove the loss.

The public entry points are imported lazily so that ``import moequant`` stays cheap: ``moequant.quantize``,
``moequant.save``, ``moequant.load``. Its one side effect: transformers' ``from_pretrained`` learns to read
moequant checkpoints (``quant_method: "moequant"``) — registered when transformers' quantizer registry is
imported, without importing transformers here (``moequant.export.hf_hook``).
"""

from __future__ import annotations

from moequant.export.hf_hook import install as _install_hf_quantizer

__version__ = "0.1.0"

__all__ = ["quantize", "save", "load", "__version__"]

_install_hf_quantizer()


def __getattr__(name: str):
    if name in ("quantize", "save", "load"):
        from moequant import api

        return getattr(api, name)
    raise AttributeError(f"module 'moequant' has no attribute {name!r}")
