"""Trellis ops: ``moequant::trellis_dequant`` (packed words -> dense weight) and ``moequant::trellis_linear``
(``x Ŵᵀ + b`` from the packed words).

Schemas (one matrix; leading expert dims are the caller's loop)::

    trellis_dequant(Tensor words, Tensor scale, Tensor? lut, int bits, int L, int V, int tile,
                    str code, int Q, bool tail_biting) -> Tensor
    trellis_linear(Tensor x, Tensor words, Tensor scale, Tensor? lut, Tensor? bias, int bits, int L, int V,
                   int tile, str code, int Q, bool tail_biting) -> Tensor

- ``words``: uint16 ``[N/tile, K/tile, W]`` (format ``trellis-packed``), ``scale``: fp16 ``[N]``,
  ``lut``: fp16 ``[2^Q, 2]`` for ``code == "hyb"``, else ``None``; ``x [..., K]``, ``bias [N]``;
- ``trellis_dequant`` returns float32 ``[N, K]``, bit-identical to the encoder's reconstruction;
  ``trellis_linear`` returns ``[..., N]`` in ``x``'s dtype.

Implementations:

- ``reference`` (pure torch, one uint8 per stream bit: the definition, slow) and ``linear_reference``
  (``trellis_dequant`` + ``F.linear``): the oracles;
- the torch path (states from joined words, ``formats.trellis_bits.unpack_tile_states``): the default kernel
  of ``trellis_dequant`` on every device;
- the C++ extension ``moequant-trellis`` (``csrc/trellis_gemv.cpp``, built on first use by
  ``cpp_build``): ``decode`` (bit-identical to the torch path; the CPU kernel of ``trellis_dequant``),
  ``gemv`` (fused decode-and-multiply for a few rows: per tile row, each tile's values are decoded 8 at
  a time in registers and multiplied into per-row sums; the ``[N, K]`` matrix never exists) and
  ``Packed`` (one matrix prepared once, cached on the tensor: ``linear``, ``gemv``, ``decode``). It is used
  on CPU unless ``select.use_fast()`` is off (``MOEQUANT_KERNELS=reference``, ``reference_kernels()``) or
  it cannot be built (``MOEQUANT_NO_EXT=1``, no compiler: one warning, then the torch path).

``linear`` chooses: the reference where the fast path does not apply (reference mode, no extension, a
non-CPU tensor); float32 activations with at most ``GEMV_MAX_ROWS`` rows take the fused GEMV; more rows
decode ~16 MiB blocks of weight rows into a scratch buffer and multiply each with torch's GEMM (no
full-precision copy of the matrix); other dtypes decode the whole matrix with the C++ kernel and call
``F.linear`` (bit-identical to the reference). The GEMV sums in another order than ``F.linear`` (8 partial
sums per row, the scale applied to the sum rather than to each weight): float32 reordering, within
``1e-5 · (|x| · |Ŵ|ᵀ)`` of the reference (``tests/kernels/test_trellis_linear.py``).

Threshold, measured (1 thread, 2-bit hyb, ms, GEMV / blocked decode + GEMM): 1536x576: M=1 0.24/0.39,
M=4 0.32/0.53, M=8 0.60/0.67, M=12 3.8/0.71 (the GEMV is specialised for 1-8 rows); 4096x4096: M=1
4.4/7.9, M=8 10.6/15.1, M=12 71/17.

CUDA: the Triton kernels of ``kernels/triton_trellis.py`` (registered with ``register_kernel("cuda")`` on both
ops; the reference where Triton is missing or ``select.use_fast()`` is off): a decode bit-identical to the
reference, and a linear that decodes ``[64, 64]`` weight blocks in registers into a float32 accumulator (IEEE
dots for float32 ``x``). Checked against the reference under ``TRITON_INTERPRET=1`` on CPU tensors
(``tests/kernels/test_triton_trellis.py``), and on a GPU when one is lent. ``grouped_linear`` runs the routed
experts of a 3-D trellis tensor on CUDA in one Triton launch (``tests/kernels/test_triton_trellis_grouped.py``).
``register_fake`` gives the outputs' shapes, so both ops trace under ``torch.compile``.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from moequant.codecs.config import TrellisConfig
from moequant.codecs.trellis import code_values, reconstruct
from moequant.formats.trellis_bits import unpack_tile_states, unpack_tile_states_bitwise
from moequant.kernels import cpp_build
from moequant.kernels.select import use_fast
from moequant.kernels.triton_load import triton_module
from moequant.kernels.uniform import needs_grad

EXTENSION = "moequant-trellis"
SOURCES = ["trellis_gemv.cpp"]
GEMV_MAX_ROWS = 8  # activation rows up to which the fused GEMV beats decode + GEMM (measured: module docstring)
_SOURCES = tuple(SOURCES)  # cpp_build._load's cache key


def extension() -> ModuleType | None:
    """The compiled ``moequant-trellis`` kernels, or None where they cannot be built (one warning). Called per
    linear: an environment probe and a cache lookup (``cpp_build.load_extension`` inlined)."""
    return None if cpp_build._disabled() else cpp_build._load(EXTENSION, _SOURCES)


def fast_extension() -> ModuleType | None:
    """The extension when fast kernels are selected (``select.use_fast()``), else None."""
    return extension() if use_fast() else None


def _config(bits: int, L: int, V: int, tile: int, code: str, Q: int, tail_biting: bool) -> TrellisConfig:
    return TrellisConfig(bits=bits, L=L, V=V, tile=tile, code=code, Q=Q, tail_biting=tail_biting)


def _values(cfg: TrellisConfig, lut: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    values = code_values(cfg, None if lut is None else lut.to(torch.float32).cpu())  # [2^L, V]
    return values.to(device)


def reference(words: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor | None, cfg: TrellisConfig) -> torch.Tensor:
    """Pure-torch definition of the op (bit-by-bit unpacking) -> float32 ``[N, K]``."""
    states = unpack_tile_states_bitwise(words.reshape(-1, words.shape[-1]), cfg)  # [B, S]
    states = states.reshape(*words.shape[:-1], states.shape[-1])  # [N/t, K/t, S]
    return reconstruct(states, _values(cfg, lut, words.device), scale, cfg.tile)


def _torch_dequant(words: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor | None, cfg: TrellisConfig
                   ) -> torch.Tensor:
    """States from joined words (``unpack_tile_states``), then ``reconstruct`` -> float32 ``[N, K]``."""
    states = unpack_tile_states(words.reshape(-1, words.shape[-1]), cfg)  # [B, S]
    states = states.reshape(*words.shape[:-1], states.shape[-1])  # [N/t, K/t, S]
    return reconstruct(states, _values(cfg, lut, words.device), scale, cfg.tile)


@torch.library.custom_op("moequant::trellis_dequant", mutates_args=())
def trellis_dequant(words: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor | None, bits: int, L: int, V: int,
                    tile: int, code: str, Q: int, tail_biting: bool) -> torch.Tensor:
    return _torch_dequant(words, scale, lut, _config(bits, L, V, tile, code, Q, tail_biting))


@trellis_dequant.register_kernel("cpu")
def _(words, scale, lut, bits, L, V, tile, code, Q, tail_biting):
    ext = fast_extension()
    if ext is not None:  # bit-identical to the torch path (tests/kernels/test_trellis_linear.py)
        return ext.decode(words, scale, lut, bits, L, V, tile, code, Q, tail_biting)
    return _torch_dequant(words, scale, lut, _config(bits, L, V, tile, code, Q, tail_biting))


@trellis_dequant.register_kernel("cuda")
def _(words, scale, lut, bits, L, V, tile, code, Q, tail_biting):
    tri = triton_module("triton_trellis") if use_fast() else None
    if tri is None:
        return _torch_dequant(words, scale, lut, _config(bits, L, V, tile, code, Q, tail_biting))
    return tri.dequant(words, scale, lut, bits, L, V, tile, code, Q, tail_biting)


@trellis_dequant.register_fake
def _(words, scale, lut, bits, L, V, tile, code, Q, tail_biting):
    n_tiles, k_tiles = words.shape[-3], words.shape[-2]
    return words.new_empty((n_tiles * tile, k_tiles * tile), dtype=torch.float32)


def dequant(words: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor | None, cfg: TrellisConfig) -> torch.Tensor:
    """``trellis_dequant`` with a ``TrellisConfig`` -> float32 ``[N, K]``."""
    return trellis_dequant(words, scale, lut, cfg.bits, cfg.L, cfg.V, cfg.tile, cfg.code, cfg.Q, cfg.tail_biting)


# --- linear ---------------------------------------------------------------------------------------
CACHE_KEY = "trellis"  # entry in a tensor's runtime cache (``qt.__dict__["_runtime"]``, never saved)


def linear_reference(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor | None,
                     bias: torch.Tensor | None, cfg: TrellisConfig) -> torch.Tensor:
    """The definition: decode the whole matrix (``trellis_dequant``), then ``F.linear`` -> ``[..., N]``."""
    return F.linear(x, dequant(words, scale, lut, cfg).to(x.dtype), bias)


def linear_packed(packed, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Through a prepared C++ matrix (``ext.Packed``): the fused GEMV for float32 ``x`` with at most
    ``GEMV_MAX_ROWS`` rows, else the C++ decode and ``F.linear`` in ``x``'s dtype -> ``[..., N]``."""
    return packed.linear(x, bias, GEMV_MAX_ROWS)


@torch.library.custom_op("moequant::trellis_linear", mutates_args=())
def trellis_linear(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor | None,
                   bias: torch.Tensor | None, bits: int, L: int, V: int, tile: int, code: str, Q: int,
                   tail_biting: bool) -> torch.Tensor:
    return linear_reference(x, words, scale, lut, bias, _config(bits, L, V, tile, code, Q, tail_biting))


@trellis_linear.register_kernel("cpu")
def _(x, words, scale, lut, bias, bits, L, V, tile, code, Q, tail_biting):
    ext = fast_extension()
    if ext is None:
        return linear_reference(x, words, scale, lut, bias, _config(bits, L, V, tile, code, Q, tail_biting))
    return linear_packed(ext.Packed(words, scale, lut, bits, L, V, tile, code, Q, tail_biting), x, bias)


@trellis_linear.register_kernel("cuda")
def _(x, words, scale, lut, bias, bits, L, V, tile, code, Q, tail_biting):
    tri = triton_module("triton_trellis") if use_fast() else None
    if tri is None:
        return linear_reference(x, words, scale, lut, bias, _config(bits, L, V, tile, code, Q, tail_biting))
    return tri.linear(x, words, scale, lut, bias, bits, L, V, tile, code, Q, tail_biting)


@trellis_linear.register_fake
def _(x, words, scale, lut, bias, bits, L, V, tile, code, Q, tail_biting):
    return x.new_empty((*x.shape[:-1], words.shape[-3] * tile))


TRELLIS_FORMAT = "trellis-packed"  # formats.trellis.TrellisTensor


def grouped_linear(qt, x: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor | None:
    """``x [S, K]`` sorted by expert (``counts[e]`` rows each) times each expert of the 3-D trellis tensor
    ``qt [E, N, K]`` -> ``[S, N]`` in one Triton launch on CUDA; ``None`` where that does not apply (other
    devices, gradients needed, reference mode, no Triton): the caller loops over experts."""
    if not (x.is_cuda and len(qt.shape) == 3 and use_fast()) or needs_grad(x, None):
        return None
    if qt.format_id != TRELLIS_FORMAT or not qt.data["words"].is_cuda:
        return None
    tri = triton_module("triton_trellis")
    if tri is None:
        return None
    a = qt.attrs
    return tri.grouped(x, counts, qt.data["words"], qt.data["scale"], qt.data.get("lut"), a["bits"], a["L"], a["V"],
                       a["tile"], a["code"], a["Q"], a["tail_biting"])


def _packed(qt, ext: ModuleType):
    """``ext.Packed`` for a 2-D trellis tensor, cached on the instance; rebuilt when its tensors are replaced or
    changed in place (``_version``), e.g. a LUT being fine-tuned."""
    words, scale, lut = qt.data["words"], qt.data["scale"], qt.data.get("lut")
    versions = (words._version, scale._version, None if lut is None else lut._version)
    cache = qt.__dict__.setdefault("_runtime", {})
    hit = cache.get(CACHE_KEY)
    if (hit is not None and hit[0] is ext and hit[1] is words and hit[2] is scale and hit[3] is lut
            and hit[4] == versions):
        return hit[5]
    a = qt.attrs
    packed = ext.Packed(words, scale, lut, a["bits"], a["L"], a["V"], a["tile"], a["code"], a["Q"], a["tail_biting"])
    cache[CACHE_KEY] = (ext, words, scale, lut, versions, packed)
    return packed


def linear(qt, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] -> x Ŵᵀ + b [..., N]`` for a 2-D ``TrellisTensor`` ``qt``, by the fastest applicable path.

    Eager calls skip the dispatcher and call the implementation directly, with the prepared C++ matrix cached
    on ``qt``: measured at M = 1 on a 64x64 matrix (1 thread, a shared machine under load), a call through
    ``torch.ops.moequant.trellis_linear`` took 50-100 µs (custom ops defined in Python pay for their
    wrapper, schema checks and dispatch, and the op rebuilds the C++ matrix each call), this function 10-18
    µs, 3-5 µs of it the C++ GEMV itself. Under ``torch.compile`` the op is called, so that it traces.
    """
    words, scale, lut = qt.data["words"], qt.data["scale"], qt.data.get("lut")
    if torch.compiler.is_compiling() or (x.is_cuda and words.is_cuda and not needs_grad(x, bias)):  # traced / CUDA
        a = qt.attrs
        return trellis_linear(x, words, scale, lut, bias, a["bits"], a["L"], a["V"], a["tile"], a["code"], a["Q"],
                              a["tail_biting"])
    if x.is_cpu and words.is_cpu and use_fast():
        ext = extension()
        if ext is not None:
            return linear_packed(_packed(qt, ext), x, bias)
    return linear_reference(x, words, scale, lut, bias, qt.config)
