"""Registering moequant's transformers quantizer without importing transformers (``sys`` only: even
``importlib.abc`` or ``typing`` would add tens of milliseconds to ``import moequant``).

``import moequant`` calls ``install()``. transformers keeps its quantization registry in
``transformers.quantizers.auto`` and has no plugin entry point, so the quantizer must be registered
by the time that module is imported — importing it ourselves costs seconds (it pulls in torch and every
quantizer transformers ships). Instead:

- if ``transformers.quantizers.auto`` is already imported, register now
  (``moequant.export.hf_quantizer.register``);
- otherwise put a one-shot finder at the front of ``sys.meta_path``: when that module is imported (by
  ``from_pretrained``, ``AutoQuantizationConfig``, lm-eval, ...), the real loader runs it, then the
  quantizer is registered before the import returns, and the finder removes itself.

A failure to register (an incompatible transformers) is logged, never raised: it must not break the
import of transformers itself. This is the one import-time side effect of ``moequant`` (``DESIGN.md``
otherwise has none): a finder in ``sys.meta_path`` that answers for one module name only.
"""

from __future__ import annotations

import sys

TARGET = "transformers.quantizers.auto"
QUANTIZER = "moequant.export.hf_quantizer"


def install() -> None:
    """Register the quantizer now if transformers' quantizer registry is loaded, else when it is imported."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def _register() -> None:
    module = sys.modules.get(QUANTIZER)
    if module is not None and not hasattr(module, "register"):
        return  # its own import of transformers' quantizers brought us here: it registers as its last step
    try:
        from moequant.export.hf_quantizer import register

        register()
    except Exception as e:  # noqa: BLE001  (an incompatible transformers must still import)
        import logging

        logging.getLogger(__name__).warning("moequant: could not register the transformers quantizer (%s: %s); from_pretrained will not "
                    "read moequant checkpoints, moequant.load will", type(e).__name__, e)


class _RegisterOnImport:
    """Answers for ``TARGET`` only: the spec the other finders give, its loader wrapped to register after it."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> object:
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, self)
                return spec
        return None


class _RegisteringLoader:
    """``inner``'s module, then ``_register()``; every other attribute is ``inner``'s (``get_source``, ...)."""

    def __init__(self, inner: object, finder: _RegisterOnImport) -> None:
        self._inner = inner
        self._finder = finder

    def create_module(self, spec: object) -> object:
        return self._inner.create_module(spec)

    def exec_module(self, module: object) -> None:
        self._inner.exec_module(module)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        _register()

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)
