"""4-bit lookup-table linear (NF4 / FP4) as an op: ``moequant::lut_linear`` (packed codes -> ``x Ŵᵀ + b``).

Schema (one 2-D matrix; expert stacks ``select(e)`` first)::

    lut_linear(Tensor x, Tensor codes, Tensor lut, Tensor? absmax, Tensor? absmax_codes,
               Tensor? absmax_scale, Tensor? absmax_offset, Tensor? bias, int in_features,
               int block_size, int dq_block_size) -> Tensor

- ``x`` ``[..., K]``; ``codes`` uint8 ``[N, packed_len(K, 4)]``; ``lut`` fp32 ``[16]`` (``codecs.lut.lut_values``);
- plain format (``lut4-packed``): ``absmax`` ``[N, K / block_size]`` (fp16 as stored, or fp32) and the three
  double-quant tensors ``None``; double quant (``lut4-dq-packed``): ``absmax`` ``None`` and ``absmax_codes``
  uint8 ``[N, NB]``, ``absmax_scale`` fp32 ``[D]``, ``absmax_offset`` fp32 ``[1]`` as stored;
- returns ``[..., N]`` in ``x.dtype``.

Implementations: ``reference`` (decode with ``codecs.lut``, then ``F.linear`` in ``x.dtype``: the
definition and the tests' oracle) and the CPU kernels of ``csrc/qgemv.cpp`` (GEMV up to
``uniform.GEMV_MAX_ROWS`` rows of ``x``, decode + GEMM beyond; fp32 arithmetic; the table lookup rebuilds
each value's exact fp32 bits from four byte-plane ``vpshufb``, 32 codes at a time). Double-quantized block scales are decoded inside the kernel, one multiply-add per block of
weights, with the reference's rounding (bit-identical absmax), so no decoded copy is cached anywhere.
Dispatch as in ``kernels.uniform``: eager calls go straight to the implementation, ``torch.compile``
traces the op.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moequant.codecs.lut import dq_dequantize, lut_dequantize, lut_values
from moequant.formats.base import QuantizedTensor
from moequant.formats.bitpack import unpack
from moequant.kernels import cpp_ops
from moequant.kernels.select import use_fast
from moequant.kernels.uniform import GEMV_MAX_ROWS, cached_args, extension, fast_activations, needs_grad

CODE_BITS = 4


@functools.lru_cache(maxsize=None)
def table(name: str) -> torch.Tensor:
    """The fp32 ``[16]`` table ``name`` (a constant; built once per process)."""
    return lut_values(name).contiguous()


def decoded_absmax(absmax: torch.Tensor | None, absmax_codes: torch.Tensor | None,
                   absmax_scale: torch.Tensor | None, absmax_offset: torch.Tensor | None,
                   dq_block_size: int) -> torch.Tensor:
    """fp32 ``[N, NB]`` block absmax from either stored form."""
    if absmax is not None:
        return absmax.to(torch.float32)
    return dq_dequantize(absmax_codes, absmax_scale, absmax_offset, dq_block_size)


def reference(x: torch.Tensor, codes: torch.Tensor, lut: torch.Tensor, absmax: torch.Tensor | None,
              absmax_codes: torch.Tensor | None, absmax_scale: torch.Tensor | None,
              absmax_offset: torch.Tensor | None, bias: torch.Tensor | None, in_features: int, block_size: int,
              dq_block_size: int) -> torch.Tensor:
    """Decode the whole matrix with torch ops, then ``F.linear`` in ``x.dtype`` -> ``[..., N]``."""
    a = decoded_absmax(absmax, absmax_codes, absmax_scale, absmax_offset, dq_block_size)  # [N, NB]
    w = lut_dequantize(unpack(codes, CODE_BITS, in_features), a, lut, block_size)  # [N, K] fp32
    return F.linear(x, w.to(x.dtype), bias)


def _opt(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def fast(x: torch.Tensor, codes: torch.Tensor, lut: torch.Tensor, absmax: torch.Tensor | None,
         absmax_codes: torch.Tensor | None, absmax_scale: torch.Tensor | None, absmax_offset: torch.Tensor | None,
         bias: torch.Tensor | None, in_features: int, block_size: int, dq_block_size: int) -> torch.Tensor | None:
    """The C++ kernel -> ``[..., N]`` in ``x.dtype``, or ``None`` without the extension."""
    ext = extension()
    if ext is None:
        return None
    # the extension takes x [..., K] and bias in any float dtype and returns [..., N] in x's dtype
    return ext.lut_linear(x, codes.contiguous(), lut.to(torch.float32).contiguous(), _opt(absmax), _opt(absmax_codes),
                          _opt(absmax_scale), _opt(absmax_offset), bias, in_features, block_size, dq_block_size,
                          GEMV_MAX_ROWS)


@torch.library.custom_op("moequant::lut_linear", mutates_args=())
def lut_linear(x: torch.Tensor, codes: torch.Tensor, lut: torch.Tensor, absmax: torch.Tensor | None,
               absmax_codes: torch.Tensor | None, absmax_scale: torch.Tensor | None,
               absmax_offset: torch.Tensor | None, bias: torch.Tensor | None, in_features: int, block_size: int,
               dq_block_size: int) -> torch.Tensor:
    return reference(x, codes, lut, absmax, absmax_codes, absmax_scale, absmax_offset, bias, in_features, block_size,
                     dq_block_size)


@lut_linear.register_kernel("cpu")
def _lut_linear_cpu(x, codes, lut, absmax, absmax_codes, absmax_scale, absmax_offset, bias, in_features, block_size,
                    dq_block_size):
    args = (x, codes, lut, absmax, absmax_codes, absmax_scale, absmax_offset, bias, in_features, block_size,
            dq_block_size)
    y = fast(*args) if use_fast() else None
    return reference(*args) if y is None else y


@lut_linear.register_fake
def _(x, codes, lut, absmax, absmax_codes, absmax_scale, absmax_offset, bias, in_features, block_size,
      dq_block_size):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def op_args(qt: QuantizedTensor, bias: torch.Tensor | None, x: torch.Tensor, cached: bool = True) -> tuple:
    """The op's arguments for ``x``, a 2-D ``LutTensor`` / ``LutDqTensor`` and ``bias`` (``cached``: the
    process-wide table tensor; a traced graph builds its own constant instead)."""
    d = qt.data
    lut = table(qt.attrs["lut"]) if cached else lut_values(qt.attrs["lut"])
    return (x, d["codes"], lut, d.get("absmax"), d.get("absmax_codes"), d.get("absmax_scale"),
            d.get("absmax_offset"), bias, qt.shape[-1], qt.attrs["block_size"], qt.attrs["dq_block_size"])


def linear(qt: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] -> x Ŵᵀ + b [..., N]`` for a 2-D LUT tensor, on the fastest path that applies."""
    if torch.compiler.is_compiling():  # the op is traced; fast or reference is decided when it runs
        if len(qt.shape) != 2 or needs_grad(x, bias):
            return QuantizedTensor.linear(qt, x, bias)
        args = op_args(qt, bias, x, cached=False)
        cpp = cpp_ops.op("lut_linear") if x.is_cpu and qt.data["codes"].is_cpu else None
        if cpp is not None and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            x_, codes, lut, *opt, b, k, block, dq_block = args
            opt = [None if t is None else t.contiguous() for t in opt]
            return cpp(x_, codes.contiguous(), lut, *opt, b, k, block, dq_block, GEMV_MAX_ROWS)  # C++ from the graph
        return lut_linear(*args)
    # ``uniform.fast_applies``' checks: the call's, then the tensor's (cached with its kernel arguments)
    args = cached_args(qt, kernel_args) if fast_activations(x, bias) else None
    if args is not None and x.shape[-1] == args[6]:
        ext = extension()
        if ext is not None:
            codes, lut, absmax, a_codes, a_scale, a_offset, k, block, dq_block = args
            return ext.lut_linear(x, codes, lut, absmax, a_codes, a_scale, a_offset, bias, k, block, dq_block,
                                  GEMV_MAX_ROWS)
    return QuantizedTensor.linear(qt, x, bias)


def kernel_args(qt: QuantizedTensor) -> tuple:
    """The op's arguments less ``x`` and ``bias``, contiguous, built once per instance and kept in its
    runtime cache (outside ``data``: not saved)."""
    cache = qt.__dict__.setdefault("_runtime", {})
    args = cache.get("qgemv")
    if args is None:
        _, codes, lut, absmax, a_codes, a_scale, a_offset, _, k, block, dq_block = op_args(qt, None, qt.data["codes"])
        args = cache["qgemv"] = (codes.contiguous(), lut, _opt(absmax), _opt(a_codes), _opt(a_scale), _opt(a_offset), k,
                                 block, dq_block)
    return args
