"""Incoherence processing (the random Hadamard transform) as the solvers use it.

The math lives in ``codecs.hadamard`` (pure torch: the transform of any size, random signs and the
``Incoherence`` sign pair); this module is its solver-facing name, and importing it installs the C++
transform of ``kernels.hadamard`` as ``Incoherence``'s run-time fast path."""

from __future__ import annotations

from moequant.codecs.hadamard import (Incoherence, hadamard_factors, hadamard_matrix, hadamard_transform,
                                      random_signs, set_fast_path)
from moequant.kernels import hadamard as _kernel  # noqa: F401  (installs the fast path on import)

__all__ = ["Incoherence", "hadamard_factors", "hadamard_matrix", "hadamard_transform", "random_signs",
           "set_fast_path"]
