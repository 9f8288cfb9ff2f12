"""Which implementation a packed op runs: the fast kernels (default) or the pure-torch reference.

Every packed-format op has a reference path (decode the whole matrix with torch ops, then a float
matmul: the definition, kept as the oracle) and, where one exists for the device, a fast path.
``MOEQUANT_KERNELS=reference`` in the environment, or ``with reference_kernels():`` in code, forces the
reference everywhere (tests compare the two; benchmarks measure both side by side in one process).

Environment switches (``MOEQUANT_KERNELS`` here, ``MOEQUANT_NO_EXT`` and ``MOEQUANT_INT4`` in the kernel
modules) are read through ``EnvSwitch``: every call sees the current value (tests set them at run time), at
the cost of one dict probe instead of ``os.environ.get``'s ~1 µs (an exception when the variable is unset).
A packed linear checks three of them per call at decode, 210 linears per SmolLM2 token. Under ``torch.compile``
both are read once, when the graph is traced (``assume_constant_result``): a compiled graph keeps the kernels
of its trace time.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Callable, Generic, Iterator, TypeVar

import torch

_FORCED: contextvars.ContextVar[str | None] = contextvars.ContextVar("moequant_kernels", default=None)
MODES = ("auto", "reference")

# ``os.environ`` keeps the process environment in ``_data`` (a dict of encoded names -> encoded values) and
# writes every change there (``os.environ[k] = v``, ``del``, ``monkeypatch.setenv``): a probe of it sees what
# ``os.environ.get`` would. Where an implementation lacks it, ``EnvSwitch`` falls back to ``os.environ.get``.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_ENCODE = getattr(os.environ, "encodekey", None)
_ENV_DECODE = getattr(os.environ, "decodevalue", None)
_ENV_PROBE = isinstance(_ENV_DATA, dict) and callable(_ENV_ENCODE) and callable(_ENV_DECODE)
_UNREAD = object()

T = TypeVar("T")


class EnvSwitch(Generic[T]):
    """Environment variable ``name`` as ``parse(value or None)``, re-parsed only when the value changes: a
    read costs one dict probe (~50 ns), and a change made at run time takes effect at the next read. A value
    that ``parse`` rejects (it raises) raises at every read."""

    __slots__ = ("name", "_parse", "_key", "_raw", "_value")

    def __init__(self, name: str, parse: Callable[[str | None], T]) -> None:
        self.name = name
        self._parse = parse
        self._key = _ENV_ENCODE(name) if _ENV_PROBE else name
        self._raw: object = _UNREAD
        self._value: T | None = None

    @torch.compiler.assume_constant_result  # under torch.compile: read once, at trace time (no cost in eager)
    def get(self) -> T:
        raw = _ENV_DATA.get(self._key) if _ENV_PROBE else os.environ.get(self.name)
        if raw is self._raw:  # a new value is a new object (os.environ encodes each one it stores)
            return self._value  # type: ignore[return-value]
        value = self._parse(None if raw is None else _ENV_DECODE(raw) if _ENV_PROBE else raw)
        self._raw, self._value = raw, value
        return value


def _parse_mode(value: str | None) -> str:
    mode = (value or "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"MOEQUANT_KERNELS={mode!r}: expected one of {', '.join(MODES)}")
    return mode


_ENV_MODE = EnvSwitch("MOEQUANT_KERNELS", _parse_mode)


def kernel_mode() -> str:
    """``"auto"`` (fast path where one applies) or ``"reference"``."""
    forced = _FORCED.get()
    return _ENV_MODE.get() if forced is None else forced


@torch.compiler.assume_constant_result  # a compiled graph is traced for the mode of its trace time
def use_fast() -> bool:
    forced = _FORCED.get()
    return (_ENV_MODE.get() if forced is None else forced) != "reference"


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
