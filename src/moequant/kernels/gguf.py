"""GGUF block linear as an op: ``moequant::gguf_linear`` (ggml block bytes -> ``x Ŵᵀ + b``).

Schema (one 2-D matrix; expert stacks ``select(e)`` first)::

    gguf_linear(Tensor x, Tensor blocks, int type_id, int in_features, Tensor? bias) -> Tensor

- ``x`` ``[..., K]``; ``blocks`` uint8 ``[N, K / block * block_bytes]`` exactly as ``formats.kquant`` stores them
  (ggml's ``block_*`` structs); ``type_id`` the *stored* type's ggml id (``GgufTensor.stored``); returns
  ``[..., N]`` in ``x.dtype``.

Implementations:
- ``reference``: decode the whole matrix with torch ops (``codecs.kquant``), then ``F.linear`` in ``x.dtype``: the
  definition and the tests' oracle;
- CPU: ``csrc/gguf_gemv.cpp`` (extension ``gguf``) for Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q4_0, Q5_0, Q5_1, Q8_0 and
  IQ4_NL. Each block is unpacked to a byte per weight, then turned into floats with ggml's arithmetic (so
  ``dequantize`` is bit-identical to the reference). Up to ``uniform.GEMV_MAX_ROWS`` rows of ``x``: a GEMV that
  decodes each row of W once into a K-float buffer and dots it with every row of ``x`` (the reference's
  products in another summation order: within ~1e-6 of ``|x| |W|ᵀ`` measured, the tests allow 1e-5); more rows:
  tiles of rows of W (``common.h``'s ``gemm_tile_rows``: ~4 MiB, at least 256 rows) decoded and multiplied by BLAS. Arithmetic is fp32 (``x`` is converted). F16 rows
  (the fallback of a width no block divides) and builds without the extension take the reference.

Why: a model converted from a GGUF file keeps its output head and embedding table in the source file's block
types when they decode to the loaded values bit for bit (``exact_gguf``); Qwen2.5-Coder-1.5B's head is Q6_K
151,936 x 1,536: 183 MiB as blocks, 890 MiB as float32. Without this kernel the head was decoded once and kept
in float32 beside its blocks (``QuantLinear.keep_decoded``); now it is multiplied from the blocks.

Dispatch as in ``kernels.uniform``: eager calls go straight to the implementation, ``torch.compile`` traces the op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moequant.formats.base import QuantizedTensor
from moequant.kernels import cpp_build, cpp_ops
from moequant.kernels.select import use_fast
from moequant.kernels.uniform import GEMV_MAX_ROWS, fast_activations, needs_grad

EXT_NAME = "gguf"
EXT_SOURCES = ["gguf_gemv.cpp"]
_SOURCES = tuple(EXT_SOURCES)
# ggml type ids the extension decodes (csrc/gguf_gemv.cpp kTypes): Q2_K..Q6_K, Q4_0, Q5_0, Q5_1, Q8_0, IQ4_NL.
KERNEL_TYPES = frozenset((10, 11, 12, 13, 14, 2, 6, 7, 8, 20))


def extension():
    """The compiled ``gguf`` kernels, or ``None`` (then the reference path runs)."""
    return None if cpp_build._disabled() else cpp_build._load(EXT_NAME, _SOURCES)


def _stored(type_id: int):
    from moequant.codecs.kquant import TYPES

    return next(t for t in TYPES.values() if t.type_id == type_id)


def reference(x: torch.Tensor, blocks: torch.Tensor, type_id: int, in_features: int,
              bias: torch.Tensor | None) -> torch.Tensor:
    """Decode the whole matrix with torch ops, then ``F.linear`` in ``x.dtype`` -> ``[..., N]``."""
    from moequant.codecs.kquant import dequantize
    from moequant.codecs.kquant_pack import unpack_blocks, unpack_f16

    t = _stored(type_id)
    if t.kind == "float":
        w = unpack_f16(blocks).to(torch.float32)  # [N, K]
    else:
        codes, p = unpack_blocks(t, blocks)
        w = dequantize(t, codes, p)  # [N, K]
    return F.linear(x, w.to(x.dtype), bias)


@torch.library.custom_op("moequant::gguf_linear", mutates_args=())
def gguf_linear(x: torch.Tensor, blocks: torch.Tensor, type_id: int, in_features: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    return reference(x, blocks, type_id, in_features, bias)


@gguf_linear.register_kernel("cpu")
def _gguf_linear_cpu(x, blocks, type_id, in_features, bias):
    y = _fast(x, blocks, type_id, in_features, bias) if use_fast() else None
    return reference(x, blocks, type_id, in_features, bias) if y is None else y


@gguf_linear.register_fake
def _(x, blocks, type_id, in_features, bias):
    return x.new_empty((*x.shape[:-1], blocks.shape[0]))


def _fast(x: torch.Tensor, blocks: torch.Tensor, type_id: int, in_features: int,
          bias: torch.Tensor | None) -> torch.Tensor | None:
    """The C++ kernel -> ``[..., N]`` in ``x.dtype``, or ``None`` where it does not apply."""
    if type_id not in KERNEL_TYPES or not blocks.is_cpu or blocks.dim() != 2:
        return None
    ext = extension()
    if ext is None:
        return None
    xf = x if x.dtype == torch.float32 else x.to(torch.float32)
    b = None if bias is None else bias.to(torch.float32).contiguous()
    y = ext.gguf_linear(xf, blocks.contiguous(), type_id, in_features, b, GEMV_MAX_ROWS)  # [..., N]
    return y if y.dtype == x.dtype else y.to(x.dtype)


def applies(qt: QuantizedTensor) -> bool:
    """The kernel covers this tensor (2-D, CPU, a stored type it decodes) and the extension is built."""
    return (len(qt.shape) == 2 and qt.data["blocks"].is_cpu and qt.stored.type_id in KERNEL_TYPES
            and use_fast() and extension() is not None)


def linear(qt: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] -> x Ŵᵀ + b [..., N]`` for a 2-D ``GgufTensor``: the C++ kernel where it applies, else the
    reference (``QuantizedTensor.linear``)."""
    if len(qt.shape) == 2 and not needs_grad(x, bias):
        blocks, type_id, k = qt.data["blocks"], qt.stored.type_id, qt.shape[-1]
        if torch.compiler.is_compiling():
            cpp = cpp_ops.op("gguf_linear") if x.is_cpu and blocks.is_cpu and type_id in KERNEL_TYPES else None
            if cpp is None:
                return gguf_linear(x, blocks, type_id, k, bias)
            b = None if bias is None else bias.to(torch.float32).contiguous()
            y = cpp(x.to(torch.float32), blocks.contiguous(), type_id, k, b, GEMV_MAX_ROWS)  # C++ from the graph
            return y.to(x.dtype)
        if fast_activations(x, bias) and x.shape[-1] == k:
            y = _fast(x, blocks, type_id, k, bias)
            if y is not None:
                return y
    return QuantizedTensor.linear(qt, x, bias)


def dequantize(qt: QuantizedTensor) -> torch.Tensor | None:
    """fp32 ``[..., N, K]`` decoded by the extension (bit-identical to the reference), or ``None`` where it does
    not apply (another type, no extension, ``MOEQUANT_KERNELS=reference``, not on the CPU)."""
    blocks = qt.data["blocks"]
    type_id = qt.stored.type_id
    if type_id not in KERNEL_TYPES or not blocks.is_cpu or not use_fast():
        return None
    ext = extension()
    if ext is None:
        return None
    rows = blocks.reshape(-1, blocks.shape[-1]).contiguous()  # [R, bytes]
    return ext.gguf_dequant(rows, type_id, qt.shape[-1]).reshape(qt.shape)
