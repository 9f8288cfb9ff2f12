"""Build and load moequant's C++ CPU kernels (``kernels/csrc/*.cpp``) with torch's ``cpp_extension``.

``load_extension(name, sources)`` compiles once per (sources, torch version, flags) into
``<cache>/ext/<name>-<hash>`` and returns the loaded module, or ``None`` — with one warning per
extension — where it cannot (no C++ compiler, a failed build, ``MOEQUANT_NO_EXT=1``). Callers then
take the pure-torch reference path, so a machine without a compiler still runs everything, only slower.

Flags: ``-O3``, plus AVX2/FMA/F16C when torch reports an AVX2 (or better) CPU; never ``-march=native``
(a binary built for one CPU must not fault on another one sharing the cache). The kernels use
``at::parallel_for``, so they follow ``torch.set_num_threads``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from moequant.kernels.select import EnvSwitch, use_fast

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
DISABLE_ENV = "MOEQUANT_NO_EXT"


def simd_flags() -> list[str]:
    """Vector ISA flags for this CPU, as torch detects it (``AVX2`` / ``AVX512`` → AVX2+FMA+F16C)."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        cap = "DEFAULT"
    return ["-mavx2", "-mfma", "-mf16c"] if cap in ("AVX2", "AVX512") else []


def openmp_flags() -> list[str]:
    """``-fopenmp`` when torch parallelises with OpenMP: ``at::parallel_for`` is inlined into the
    extension, so without it every kernel loop runs on one thread whatever ``torch.set_num_threads`` says."""
    info = torch.__config__.parallel_info()
    return ["-fopenmp"] if "ATen parallel backend: OpenMP" in info else []


def _cflags() -> list[str]:
    return ["-O3", "-std=c++17", *simd_flags(), *openmp_flags()]


def _build_tag(name: str, sources: list[Path], cflags: list[str]) -> str:
    """``name-<hash>`` of the sources, the headers of ``csrc`` they may include, torch's version and the flags."""
    h = hashlib.sha256()
    for s in [*sources, *sorted(CSRC.glob("*.h"))]:
        h.update(s.name.encode())
        h.update(s.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(cflags).encode())
    return f"{name}-{h.hexdigest()[:16]}"


def ext_dir() -> Path:
    from moequant.zoo.fetch import cache_root

    return cache_root() / "ext"


_DISABLE = EnvSwitch(DISABLE_ENV, lambda v: v is not None and v.strip() not in ("", "0"))


def _disabled() -> bool:
    """``MOEQUANT_NO_EXT`` is set (read at every call, ~50 ns: ``select.EnvSwitch``)."""
    return _DISABLE.get()


def load_extension(name: str, sources: list[str | Path] | tuple[str, ...]) -> ModuleType | None:
    """The compiled extension ``name`` built from ``sources`` (paths, or names under ``kernels/csrc``),
    or ``None`` with one warning when it cannot be built here. Cached per process (``_load``; a hot path
    passes ``sources`` as a tuple of ``str``, which is the cache key as is)."""
    if _DISABLE.get():
        return None
    if type(sources) is not tuple:
        sources = tuple(str(s) for s in sources)
    return _load(name, sources)


def float32_cpu_extension(name: str, sources: tuple[str, ...], *tensors: torch.Tensor) -> ModuleType | None:
    """The extension for a quantize-time kernel whose inputs are ``tensors``, or ``None`` when the torch code must
    run: the reference kernels are selected, ``torch.compile`` is tracing, an input is not a float32 CPU tensor, or
    ``MOEQUANT_NO_EXT`` is set (or the extension cannot be built)."""
    if not use_fast() or torch.compiler.is_compiling():
        return None
    if any(t.dtype != torch.float32 or not t.is_cpu for t in tensors):
        return None
    return None if _disabled() else _load(name, sources)


@functools.lru_cache(maxsize=None)
def _load(name: str, sources: tuple[str, ...]) -> ModuleType | None:
    paths = [Path(s) if Path(s).is_absolute() else CSRC / s for s in sources]
    cflags = _cflags()
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        log.warning("moequant: no C++ compiler (%s) found; %s kernels use the slower pure-torch path "
                    "(install g++ and rerun to build them)", compiler, name)
        return None
    tag = _build_tag(name, paths, cflags)
    build = ext_dir() / tag
    try:
        from torch.utils import cpp_extension

        from moequant.fsutil import file_lock

        build.mkdir(parents=True, exist_ok=True)
        with file_lock(ext_dir() / f"{tag}.lock", what=f"the build of the {name} C++ kernels") as held:
            if held:
                clear_stale_baton(build, name)
            with interpreter_tools_first():
                return cpp_extension.load(name=name.replace("-", "_") + "_" + tag[-8:],
                                          sources=[str(p) for p in paths], extra_cflags=cflags,
                                          extra_ldflags=openmp_flags(), build_directory=str(build), verbose=False)
    except Exception as e:  # a compiler error, a missing ninja, a read-only cache ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("moequant: could not build the %s C++ kernels (%s); using the slower pure-torch path "
                    "(build log under %s)", name, first[:200], build)
        return None


@contextlib.contextmanager
def interpreter_tools_first() -> Iterator[None]:
    """While inside, ``PATH`` starts with the running interpreter's own folder when a ``ninja`` lies there.
    torch runs ``ninja`` from ``PATH``; the setup installs it into the environment's folder, which is on ``PATH``
    only when the environment is activated. ``.venv/bin/python`` or ``.venv/bin/moequant`` run as they are found
    another ``ninja`` (whose log differs: every switch between the two rebuilt all the kernels, minutes each time)
    or none (no kernels at all)."""
    bindir = str(Path(sys.executable).parent)
    old = os.environ.get("PATH")
    if not (Path(bindir) / "ninja").is_file() or (old or "").split(os.pathsep)[0] == bindir:
        yield
        return
    os.environ["PATH"] = bindir + os.pathsep + old if old else bindir
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


def clear_stale_baton(build: Path, name: str) -> bool:
    """Remove torch's ``lock`` file from the build directory ``build``; call only while holding the build's
    ``file_lock``. ``cpp_extension.load`` creates that file while it builds or loads and, where it finds one,
    waits for it to go, with no time limit; a process killed inside ``load`` (a Ctrl-C during the first compile,
    a session's end) leaves it behind, and every later moequant process then hung there without a word. Every
    moequant process enters that directory under the ``flock``, which dies with its holder, so a ``lock`` found
    while holding it is stale. True when one was removed."""
    baton = build / "lock"
    if not baton.exists():
        return False
    log.warning("moequant: removing %s, left by a process that was stopped while it built or loaded the %s C++ "
                "kernels", baton, name)
    baton.unlink(missing_ok=True)
    return True


def is_built(name: str, sources: list[str | Path] | tuple[str, ...]) -> bool:
    """A build of these sources (with this torch and these flags) is in the cache already: loading it compiles
    nothing."""
    paths = [Path(s) if Path(s).is_absolute() else CSRC / s for s in sources]
    tag = _build_tag(name, paths, _cflags())
    return any((ext_dir() / tag).glob("*.so"))


def available(name: str, sources: list[str | Path]) -> bool:
    return load_extension(name, sources) is not None


def all_extensions() -> list[tuple[str, tuple[str, ...]]]:
    """(name, sources) of every C++ kernel extension, in the order the setup builds them."""
    from moequant.kernels import additive, additive_encode, bcjr, gguf, hadamard, trellis, uniform, viterbi

    return [(uniform.EXT_NAME, tuple(uniform.EXT_SOURCES)), (trellis.EXTENSION, tuple(trellis.SOURCES)),
            (hadamard.EXT_NAME, tuple(hadamard.EXT_SOURCES)), (additive.EXT_NAME, tuple(additive.EXT_SOURCES)),
            (viterbi.EXT_NAME, tuple(viterbi.EXT_SOURCES)), (gguf.EXT_NAME, tuple(gguf.EXT_SOURCES)),
            (bcjr.EXT_NAME, tuple(bcjr.EXT_SOURCES)), (additive_encode.EXT_NAME, tuple(additive_encode.EXT_SOURCES))]


def build_all() -> dict[str, bool]:
    """Build (or find built) every C++ kernel extension; ``{name: available}``. The setup script runs it
    so the first model load does not pay the compile."""
    return {name: load_extension(name, sources) is not None for name, sources in all_extensions()}


if __name__ == "__main__":
    import time

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for ext, sources in all_extensions():  # one line per extension as it is done: a stall shows where it is
        t0 = time.perf_counter()
        ok = load_extension(ext, sources) is not None
        state = "built" if ok else "not available (the pure-torch path will be used)"
        print(f"{ext}: {state} ({time.perf_counter() - t0:.0f} s)", flush=True)
