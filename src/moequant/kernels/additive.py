"""AQLM additive-codebook linear as an op: ``moequant::additive_linear`` (packed codes -> ``x Ŵᵀ + b``).

Schema (one 2-D matrix; expert stacks ``select(e)`` first, as ``QuantExperts`` does)::

    additive_linear(Tensor x, Tensor codes, Tensor codebooks, Tensor scale, Tensor? bias, int M, int B, int g,
                    int in_features) -> Tensor

- ``x`` ``[..., K]``; ``codes`` uint8 ``[N, R]`` as ``formats.additive`` stores them; ``codebooks`` ``[M, 2^B, g]``
  (fp16 as stored; fp32 — int8 codebooks times their steps — and bf16 accepted); ``scale`` ``[N]``; returns ``[..., N]`` in ``x.dtype``.

Implementations: ``reference`` (decode with ``codecs.additive.reconstruct``, then ``F.linear`` in ``x.dtype``: the
definition and the tests' oracle) and the CPU kernels of ``csrc/additive_gemv.cpp`` (fp32 arithmetic, codes read
from the packed bytes in the kernel, OpenMP over output rows):

- up to ``GEMV_MAX_ROWS`` rows of ``x``, a GEMV that never forms a weight: the **table** path (per block of up
  to 8 rows of ``x``, ``P[j, m, c] = x_j · C_m[c]`` for every input group and codeword, built 128 KiB of
  (group, codebook) slots at a time and swept over every row; each output is ``s_n`` times the sum of the
  ``G·M`` entries its codes pick) or the **codeword** path (each group's codewords summed in registers and
  multiplied into per-row sums). The table costs ``T·K·M·2^B`` multiply-adds per call and pays only when enough
  rows share it; the kernel takes it (``ext.table_pays``) for ``2·M·2^B <= N`` at every ``T <= 8``, for
  ``M·2^B <= 2N`` at ``T = 1``, never for more than 4,096 codewords per codebook (1x16: one row's table is
  ``K·2^16`` multiply-adds, ~40x a dense 1536x576 GEMV);
- more rows: tiles of rows (``common.h``'s ``gemm_tile_rows``: ~4 MiB, at least 256 rows) decoded to fp32
  (bit-identical to the reference decode) and multiplied by BLAS, never the whole matrix at once.

The GEMVs add in another order than ``F.linear`` on the decoded matrix (per-group dot products, the row scale
applied to the sum): float32 reordering, within ``1e-5 · (|x| · |Ŵ|ᵀ)`` of the exact product elementwise, as the
reference is (``tests/kernels/test_additive_kernel.py``); bf16 / fp16 ``x`` is computed in fp32 and rounded once.

Measured by hand (AMD EPYC, AVX2, 1 thread, torch 2.13, fp32 x, thread CPU time, ms per call; the 2 cores were
shared with another job, so the figures are indicative, ±30% between runs), 2x8 g8 unless said:

- table chunk, T = 1, 1536x576: 32 KiB 0.21, 128 KiB 0.18-0.20, 1 MiB 0.28;
- table / codeword GEMV: 1536x576 T=1 0.18 / 0.39, T=2 0.31-0.43 / 0.35-0.40, T=8 0.66-0.74 / 0.60-0.74;
  576x1536 T=1 0.21-0.26 / 0.31-0.38, T=2 0.50-0.61 / 0.29-0.39, T=8 1.0-1.2 / 0.62-1.0; 1x8 1536x576 T=1
  0.08 / 0.26-0.31, T=8 0.38-0.42 / 0.62-0.67; 1x16 1536x576 T=1 20.8 / 0.39 (AVX2 gathers for the T=1 table
  lookups were slower than scalar loads here: 0.30 vs 0.24);
- decode + GEMM, decoded tile 128 KiB / 512 KiB / 4 MiB, 1536x576: T=9 0.87 / 0.88 / 1.21, T=512 13.3 / 12.3 /
  11.2 (fp32 F.linear 11.3);
- the entry point against fp32 ``F.linear`` on the decoded matrix, 1536x576: T=1 0.16 vs 0.085 with the 3.5 MB
  fp32 matrix hot in cache, 0.17 vs 0.31 when cycling through 48 distinct matrices (weights streamed from memory,
  as in a model); T=8 0.58 vs 0.29; the reference (decode + F.linear) 3.6-11 ms. 576x1536: T=1 0.20 vs 0.07 hot,
  0.30 vs 0.23 streamed.

Entry point ``linear(qt, x, bias)``: the reference where the fast path does not apply (``not use_fast()``, a
non-CPU device, gradients needed for ``x``, ``bias``, the codebooks or the scales, a float64 ``x``, no
extension: ``cpp_build`` warns once); eager calls go straight to the extension (the op's Python dispatch costs
~27 µs a call, ``kernels.uniform``); under ``torch.compile`` the op is traced (``register_fake``). Other devices
run the reference (the op's default); a GPU kernel registers on the op with ``register_kernel("cuda")``.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from moequant.codecs.additive import reconstruct
from moequant.formats.additive import unpack_codes
from moequant.formats.base import QuantizedTensor
from moequant.kernels import cpp_build
from moequant.kernels.select import use_fast
from moequant.kernels.uniform import GEMV_MAX_ROWS, fast_activations, needs_grad

EXT_NAME = "moequant-additive"
EXT_SOURCES = ["additive_gemv.cpp"]
_SOURCES = tuple(EXT_SOURCES)  # cpp_build._load's cache key
CACHE_KEY = "additive"  # entry in a tensor's runtime cache (``qt.__dict__["_runtime"]``, never saved)
# The extension's path argument: 0 chooses by the number of rows; 1-3 force the table GEMV, the codeword GEMV,
# decode + GEMM (tests).
AUTO, TABLE, CODEWORD, GEMM = 0, 1, 2, 3


def extension() -> ModuleType | None:
    """The compiled ``moequant-additive`` kernels, or None where they cannot be built (one warning). Called per
    linear: an environment probe and a cache lookup (``cpp_build.load_extension`` inlined)."""
    return None if cpp_build._disabled() else cpp_build._load(EXT_NAME, _SOURCES)


def reference(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None, M: int, B: int, g: int, in_features: int) -> torch.Tensor:
    """Decode the whole matrix (``codecs.additive.reconstruct``), then ``F.linear`` in ``x.dtype`` -> ``[..., N]``."""
    n = codes.shape[0]
    G = in_features // g
    b = unpack_codes(codes, B, G * M).reshape(1, n, G, M)  # [1, N, G, M]
    w = reconstruct(b, codebooks, scale.reshape(1, n))[0]  # [N, K] fp32
    return F.linear(x, w.to(x.dtype), bias)


def fast(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor,
         bias: torch.Tensor | None, M: int, B: int, g: int, in_features: int, path: int = AUTO) -> torch.Tensor | None:
    """The C++ kernel (``path``: ``AUTO`` or a forced one) -> ``[..., N]`` in ``x.dtype``, or None without the
    extension."""
    ext = extension()
    if ext is None:
        return None
    return ext.additive_linear(x, codes.contiguous(), codebooks.contiguous(), scale.contiguous(), bias, M, B, g,
                               in_features, GEMV_MAX_ROWS, path)


@torch.library.custom_op("moequant::additive_linear", mutates_args=())
def additive_linear(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None, M: int, B: int, g: int, in_features: int) -> torch.Tensor:
    return reference(x, codes, codebooks, scale, bias, M, B, g, in_features)


@additive_linear.register_kernel("cpu")
def _additive_linear_cpu(x, codes, codebooks, scale, bias, M, B, g, in_features):
    runs = use_fast() and x.dtype != torch.float64  # the kernel computes in fp32: float64 x keeps the reference
    y = fast(x, codes, codebooks, scale, bias, M, B, g, in_features) if runs else None
    return reference(x, codes, codebooks, scale, bias, M, B, g, in_features) if y is None else y


@additive_linear.register_fake
def _(x, codes, codebooks, scale, bias, M, B, g, in_features):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def op_args(qt: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """The op's arguments for ``x``, a 2-D ``AdditiveTensor`` and ``bias``."""
    d, a = qt.data, qt.attrs
    return x, d["codes"], qt.codebook_values(), d["scale"], bias, a["M"], a["B"], a["g"], qt.shape[-1]


def _kernel_args(qt: QuantizedTensor) -> tuple | None:
    """``(codes, codebooks, scale, M, B, g, K)`` as the extension takes them, kept in ``qt``'s
    runtime cache while its data tensors stay the same objects; None for a tensor the kernel cannot take
    (not 2-D, not on the CPU, trainable codebooks or scales)."""
    d = qt.data
    codes, books, scale, step = d["codes"], d["codebooks"], d["scale"], d.get("codebook_scale")
    hit = qt.__dict__.get("_runtime", {}).get(CACHE_KEY)
    if hit is not None and hit[0] is codes and hit[1] is books and hit[2] is scale and hit[3] is step:
        args = hit[4]
    else:
        if len(qt.shape) != 2 or not (codes.is_cpu and books.is_cpu and scale.is_cpu):
            return None
        a = qt.attrs
        values = qt.codebook_values()  # float16 as stored, or int8 codebooks times their steps in float32
        args = (codes.contiguous(), values.contiguous(), scale.contiguous(), a["M"], a["B"], a["g"], qt.shape[-1])
        qt.__dict__.setdefault("_runtime", {})[CACHE_KEY] = (codes, books, scale, step, args)
    if torch.is_grad_enabled() and (books.requires_grad or scale.requires_grad):
        return None
    return args


def linear(qt: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] -> x Ŵᵀ + b [..., N]`` for a 2-D ``AdditiveTensor``, on the fastest path that applies."""
    if len(qt.shape) != 2:
        raise ValueError(f"{qt.format_id}: linear() needs a 2-D tensor, shape is {qt.shape}; select an expert")
    if torch.compiler.is_compiling():  # the op is traced; fast or reference is decided when it runs
        d = qt.data
        if needs_grad(x, bias) or d["codebooks"].requires_grad or d["scale"].requires_grad:
            return reference(*op_args(qt, x, bias))
        return additive_linear(*op_args(qt, x, bias))
    args = _kernel_args(qt) if fast_activations(x, bias) else None
    if args is not None and x.shape[-1] == args[6]:
        ext = extension()
        if ext is not None:
            codes, books, scale, m, bits, g, k = args
            return ext.additive_linear(x, codes, books, scale, bias, m, bits, g, k, GEMV_MAX_ROWS, AUTO)
    return reference(*op_args(qt, x, bias))
