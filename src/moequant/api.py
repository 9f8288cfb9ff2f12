"""The one orchestration entry: ``quantize(model, recipe) -> model``, ``save(model, dir)``, ``load(dir)`` (the last
two live in ``checkpoint_io``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from moequant.alloc.recipe import Recipe
from moequant.checkpoint_io import load, packed_modules, save  # noqa: F401  (re-exported: the public entry points)
from moequant.errors import MoequantError
from moequant.exact_gguf import decode_slow_tables
from moequant.kernels.cpp_ops import prepare as prepare_compiled_ops
from moequant.layerwise import Calibration, quantize_model
from moequant.nn.packed import packed_names
from moequant.report import QuantReport, TensorRecord  # noqa: F401  (re-exported)
from moequant.solvers.config import SolverConfig

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# quantize
# ------------------------------------------------------------------------------------------------

def quantize(model: nn.Module, recipe: Recipe, calib: Calibration | None = None, *,
             solver: SolverConfig | None = None, progress: bool = True, run: Any = None,
             source_gguf: str | Path | None = None) -> nn.Module:
    """Quantize ``model`` in place with ``recipe``, decoder layer by decoder layer.

    Every ``nn.Linear`` inside the decoder layers and every fused expert tensor is a target; the
    first matching rule decides its method or keeps it. ``solver`` (default RTN) says how rounding
    errors are handled; ``calib`` (token windows + Hessian options, see ``moequant.layerwise``) is
    needed for ``SolverConfig(solver="ldlq")``: each layer's Hessians are then accumulated on what
    the already-quantized layers before it produce. Afterwards every target a rule assigned a method
    is verified to be stored packed (``MoequantError`` otherwise). The report is attached as
    ``model.moequant_report``. ``run`` (a ``moequant.resume.RunProgress``, ``quantize --resume``) stores
    each finished layer and restores those it already holds. ``source_gguf``: the GGUF file the model was
    converted from; kept embedding / head tables whose blocks there decode to them exactly are stored in those
    blocks (``moequant.exact_gguf``).
    """
    report = quantize_model(model, recipe, calib, solver or SolverConfig(), progress, run=run,
                            source_gguf=None if source_gguf is None else Path(source_gguf))
    verify_quantized(model, report)
    report.record_kept(model)
    model.moequant_report = report
    model.moequant_recipe = recipe
    model.moequant_exact = tuple(t.name for t in report.exact)
    decode_slow_tables(model)
    prepare_compiled_ops(build=False)
    return model


def verify_quantized(model: nn.Module, report: QuantReport) -> None:
    """Every tensor the recipe assigned a method is stored packed in the model; fail loudly otherwise."""
    missing = []
    for t in report.quantized:
        module_name, _, param = t.name.rpartition(".")
        mod = model.get_submodule(module_name)
        if param not in packed_names(mod):
            missing.append(t.name)
    if missing:
        raise MoequantError(f"{len(missing)} targeted tensors are not stored quantized: {missing[:5]}")


# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------

def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (shared storage counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes() if t.device.type != "meta" else 0
    return total
