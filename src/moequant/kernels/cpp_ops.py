"""The C++ kernels as dispatcher ops (``torch.ops.moequant_ext.*``) for ``torch.compile`` graphs.

Eager calls go to the extensions' pybind functions directly (cheapest). A compiled graph cannot call those, and
calling the Python ``torch.library.custom_op`` wrappers (``moequant::uniform_linear`` ...) from a graph costs a
trip through Python per call (~27 µs: 5.7 ms per SmolLM2 token). So each extension also registers its linear
kernels with the dispatcher under ``moequant_ext`` (``TORCH_LIBRARY_FRAGMENT`` in ``csrc/*.cpp``), and this
module gives them their shape functions (``register_fake``) once the extension is loaded.

``prepare()`` loads the extensions and registers (``api.load`` and ``api.quantize`` call ``prepare(build=False)``);
``op(name)`` is what a
kernel module's ``torch.compile`` branch asks for at trace time: the op, or ``None`` (not prepared, no extension,
``MOEQUANT_KERNELS=reference``) — then it traces the Python op as before.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from moequant.kernels.select import use_fast


def _linear_like(x: torch.Tensor, rows_of: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], rows_of.shape[0]))


# op name -> (the module holding the extension, its shape function)
_FAKES: dict[str, tuple[str, Callable[..., torch.Tensor]]] = {
    "uniform_linear": ("uniform", lambda x, codes, *rest: _linear_like(x, codes)),
    "lut_linear": ("uniform", lambda x, codes, *rest: _linear_like(x, codes)),
    "rht_apply": ("hadamard", lambda x, *rest: torch.empty_like(x)),
    "rht_apply_outer": ("hadamard", lambda x, *rest: torch.empty_like(x)),
    "gguf_linear": ("gguf", lambda x, blocks, *rest: _linear_like(x, blocks)),
}


# name -> op, filled by ``prepare`` (outside any trace: loading a library and registering are not traceable)
OPS: dict[str, Any] = {}


def prepare(build: bool = True) -> dict[str, bool]:
    """Load the extensions that define the ``moequant_ext`` ops and give each op its shape function (once per
    process); -> ``{op: available}``. ``build=False`` (what ``api.load`` / ``api.quantize`` do, so that a model
    they return compiles onto the C++ ops) only loads extensions already built in the cache, never compiles;
    call ``prepare()`` yourself before ``torch.compile`` on a fresh cache or a model built another way."""
    import importlib

    from moequant.kernels import cpp_build

    for name, (module, fake) in _FAKES.items():
        if name in OPS:
            continue
        mod = importlib.import_module(f"moequant.kernels.{module}")
        if not build and not cpp_build.is_built(mod.EXT_NAME, mod.EXT_SOURCES):
            continue
        if mod.extension() is None:
            continue
        try:
            found = getattr(torch.ops.moequant_ext, name)
        except (AttributeError, RuntimeError):  # an extension built before the registration existed
            continue
        torch.library.register_fake(f"moequant_ext::{name}")(fake)
        OPS[name] = found
    from moequant.formats import kquant, lut, uniform

    for fmt in (uniform, lut, kquant):  # their lazy kernel imports done now: a trace must not be the one to set them
        fmt._kernels()  # (dynamo would guard on the global being None and recompile at the next call)
    return {name: name in OPS for name in _FAKES}


def op(name: str) -> Any:
    """``torch.ops.moequant_ext.<name>`` for a compiled graph, or ``None`` (not prepared, no extension, or the
    reference kernels asked for at trace time): then the caller traces its Python op."""
    return OPS.get(name) if use_fast() else None
