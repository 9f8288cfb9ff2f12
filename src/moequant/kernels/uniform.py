"""Uniform int-k linear as an op: ``moequant::uniform_linear`` (packed codes + scales -> ``x Ŵᵀ + b``).

Schema (one 2-D matrix; expert stacks ``select(e)`` first)::

    uniform_linear(Tensor x, Tensor codes, Tensor scale, Tensor? zero, Tensor? bias, int bits,
                   int group_size, int in_features, str grid) -> Tensor

- ``x`` ``[..., K]``; ``codes`` uint8 ``[N, packed_len(K, bits)]``, ``scale`` ``[N, G]`` (fp16 / bf16 / fp32),
  ``zero`` uint8 ``[N, packed_len(G, bits)]`` or ``None`` (symmetric), exactly as ``formats.uniform`` stores
  them; ``group_size`` is the effective one (``-1`` resolved to ``K``); ``grid`` is ``"midtread"`` or
  ``"midrise"`` (v1 symmetric; ignored when ``zero`` is given). Returns ``[..., N]`` in ``x.dtype``.

Implementations:
- ``reference``: decode the whole matrix with torch ops (``codecs.uniform.uniform_dequantize``), then
  ``F.linear`` in ``x.dtype``: the definition, and the oracle of the tests;
- CPU: the C++ kernels of ``csrc/qgemv.cpp`` read the stored layout directly. Up to ``GEMV_MAX_ROWS`` rows
  of ``x``: a GEMV that decodes each weight once per pass of up to 4 rows and never writes an ``N x K``
  matrix; more rows: the matrix is decoded to fp32 in tiles of rows (``csrc/common.h``'s ``gemm_tile_rows``:
  ~4 MiB, at least 256 rows; bit-identical to the reference decode), each multiplied by BLAS into its columns
  of ``y``. Arithmetic is fp32 (``x`` is
  converted), so the GEMV differs from the reference by summation order only:
  ``y = Σ_g s_g (Σ_k x_k q_k − z_g Σ_k x_k)``; the zero-point term cancels against the code term, which
  costs a few ulps of the output's scale when ``x`` has a large mean (measured: < 1e-6 of max |y| for
  zero-mean x, up to 7e-6 for x ~ N(0.5, 1); the tests allow 1e-5). Without the extension the CPU runs
  the reference.
- CPU, 4-bit codes, ``MOEQUANT_INT4=q8`` (opt-in): the GEMV of llama.cpp's Q4 x Q8 dot products
  (``uniform_linear_q8``): each row of x is quantized per 32 columns to int8 (``d = max |x| / 127``, round half
  to even), the codes' integer dot products are ``vpmaddubsw`` + ``vpmaddwd``, converted once per 32-block and
  scaled by ``s_g d_b``; the zero point is ``s_g z_g Σ_b d_b Σ a``. Applies to fp32 x of at most
  ``GEMV_MAX_ROWS`` rows with a group size that is a multiple of 32 (or one group per row), in an AVX2 build;
  every other call takes the fp32 kernel (switch unset: unchanged, bit for bit). Error: the int8 rounding of
  x, ~0.6% of ‖y‖ on Gaussian x (``tests/kernels/test_int4_q8.py``); an output does not depend on M or on the
  thread split. SmolLM2-135M int4 PPL on the first 4,096 PTB test tokens: 100.215 -> 100.437 (q8 on every row).
- CUDA: the Triton kernel of ``kernels/triton_uniform.py`` (decode in registers, float32 accumulation;
  registered with ``uniform_linear.register_kernel("cuda")``; the reference where Triton is missing). It is
  checked against the reference under ``TRITON_INTERPRET=1`` on CPU tensors, and on a GPU when one is lent.
  ``grouped_linear`` runs the routed experts of a 3-D uniform tensor on CUDA in one Triton launch.
Other devices run the reference. ``register_fake`` makes the op traceable by ``torch.compile``.

Entry point: ``linear(qt, x, bias)`` picks, per call: the reference (``not use_fast()``, a non-CPU
device, autograd needing gradients, no extension), torch's int4pack kernel for 4-bit tensors where it
applies (``kernels.int4pack``; ``MOEQUANT_INT4=native`` selects ours instead, ``INT4_DEFAULT`` sets the
default), the q8 GEMV for 4-bit tensors under ``MOEQUANT_INT4=q8``, else the C++ kernel.

Measured here (AMD EPYC Zen 3, AVX2, 1 thread, torch 2.13, CPU time; x fp32, asym g128, NF4 block 64):
- SmolLM2-135M-shaped decode, the 210 decoder linears once per token at M = 1 (weights streamed from
  DRAM like in the model): fp32 28.4 ms, int4 11.6 ms (2.44x), int3 13.5 ms (2.10x), int2 11.2 ms (2.55x),
  NF4 16.7 ms (1.70x); torch's int4pack on the same int4 tensors 32.1 ms (0.88x of fp32: slower than
  the native kernel by 2.8x on this CPU; a raw 4096^2 int4pack GEMV takes 2.4 ms vs 1.0 ms native).
  At M = 8: fp32 63 ms, int4 43.5 ms, int3 52 ms, int2 43 ms, NF4 54 ms.
- Prefill M = 512, decode + GEMM vs fp32 F.linear: 0.89-1.00x (576->1536, 1536->576, 4096->4096).
- ``GEMV_MAX_ROWS = 8``: the GEMV wins up to M = 8 on 4096^2 (6.8 vs 9.3 ms) and ties decode + GEMM at
  M = 8 on 576/1536-wide matrices; decode + GEMM wins from M = 12.

Dispatch cost (measured here, torch 2.13, 1 thread, M = 1, median of 9 x 4000 calls, CPU time): a 16 x 64
int4 matrix (kernel time negligible) costs 5.3 µs through ``fast`` (the pybind call included), 11.9 µs
through ``qt.linear`` (the checks of ``linear``) and 32.8 µs through ``torch.ops.moequant.uniform_linear``:
the op's Python dispatch adds ~27 µs per call, ~5.7 ms per SmolLM2 token (210 linears). So eager mode
calls the implementation directly; under ``torch.compile`` (``is_compiling()``) the op is what gets traced.

The per-call checks are kept cheap because at decode they are the cost (issue #10): the environment switches
are dict probes (``select.EnvSwitch``, not ``os.environ.get``: ~1 µs each), the tensor's own checks (2-D, on
the CPU) are cached with its kernel arguments (``cached_args``), and ``QuantLinear`` compares its buffers by
identity, version counter and data pointer (``nn.packed.buffers_unchanged``). Same 16 x 64 matrix, same
measurement, before -> after: ``fast`` 4.8 -> 2.8 µs, ``qt.linear`` 10.8 -> 3.8 µs, ``QuantLinear(x)``
22.5 -> 6.7 µs (an ``nn.Linear`` call costs 3-5 µs). SmolLM2-135M int4 (fp32 embeddings and head), greedy
decode at batch 1, 1 thread, A/B in one process: 28.6 -> 33.5 tok/s, fp32 21.1 (1.36x -> 1.59x).

``MOEQUANT_INT4=q8`` (issue #10; same machine, 1 thread, CPU time, the 2 cores shared with other jobs): the 210
decoder linears of a SmolLM2-135M token at M = 1, direct kernel calls: weights in cache 7.2 -> 4.2 ms, from
DRAM 8.8 -> 5.0 ms (53 MB of codes; a 53 MB read alone takes 2.7 ms); M = 2 / 4 / 8 in cache: 12.9 -> 7.6,
23.4 -> 13.2, 38.4 -> 18.8 ms. In the model, per token (CPU): linears 10.8 -> 7.2 ms, of 30.8 -> 27.3 ms, the
rest being the fp32 tied head (7.8 ms: 113 MB) and attention, norms and Python (12.3 ms). Greedy decode at
batch 1, 16 tokens, A/B/A/B in one process: fp32 20.5 tok/s, int4 32.6 (1.58x), int4 q8 36.3 (1.77x), the
same tokens. The head as packed int4 would take 1.1 ms with q8 (2.0 ms fp32 kernel, 7.4 ms fp32 F.linear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moequant.codecs.uniform import num_groups, resolve_group_size, uniform_dequantize
from moequant.formats.base import QuantizedTensor
from moequant.formats.bitpack import unpack
from moequant.kernels import cpp_build, cpp_ops
from moequant.kernels.select import EnvSwitch, use_fast
from moequant.kernels.triton_load import triton_module

EXT_NAME = "qgemv"
EXT_SOURCES = ["qgemv.cpp"]
# Rows of x up to which the GEMV beats decode + GEMM.
GEMV_MAX_ROWS = 8
# 4-bit tensors: "int4pack" (torch's kernel first, where it applies) or "native" (the qgemv kernel);
# MOEQUANT_INT4 overrides. See the measurements in the module docstring before changing it.
INT4_ENV = "MOEQUANT_INT4"
INT4_DEFAULT = "native"  # measured: our GEMV 12.0 ms vs int4pack 32.7 ms per SmolLM2-shaped pass (fp32 30.7), 1 thread
# "q8" (opt-in): 4-bit GEMVs (fp32 x, at most GEMV_MAX_ROWS rows, group size a multiple of 32) quantize x to
# int8 per 32 columns and multiply in integers (``uniform_linear_q8``; see the module docstring).
INT4_Q8 = "q8"
_INT4 = EnvSwitch(INT4_ENV, lambda v: (v or "").strip().lower())  # "" when unset: INT4_DEFAULT
_SOURCES = tuple(EXT_SOURCES)  # cpp_build._load's cache key
_FAST_DTYPES = frozenset((torch.float32, torch.bfloat16, torch.float16))
RUNTIME_KEY = "qgemv"  # the kernel arguments in a tensor's runtime cache (``qt.__dict__["_runtime"]``)


def extension():
    """The compiled ``qgemv`` kernels, or ``None`` (then the reference path runs). Called per linear: no
    more than an environment probe and a cache lookup (``cpp_build.load_extension`` inlined)."""
    return None if cpp_build._disabled() else cpp_build._load(EXT_NAME, _SOURCES)


def zero_point(bits: int, grid: str) -> float:
    """The fixed zero point of a symmetric grid: ``2^(b-1)`` (midtread) or ``(2^b - 1) / 2`` (midrise)."""
    if grid == "midtread":
        return float(1 << (bits - 1))
    if grid == "midrise":
        return ((1 << bits) - 1) / 2
    raise ValueError(f"unknown symmetric grid {grid!r}")


def reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              bias: torch.Tensor | None, bits: int, group_size: int, in_features: int, grid: str) -> torch.Tensor:
    """Decode the whole matrix with torch ops, then ``F.linear`` in ``x.dtype`` -> ``[..., N]``."""
    k = in_features
    q = unpack(codes, bits, k)  # [N, K]
    z = None if zero is None else unpack(zero, bits, num_groups(k, group_size))  # [N, G]
    w = uniform_dequantize(q, scale, z, group_size, bits, grid)  # [N, K] fp32
    return F.linear(x, w.to(x.dtype), bias)


def fast(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
         bias: torch.Tensor | None, bits: int, group_size: int, in_features: int, grid: str) -> torch.Tensor | None:
    """The C++ kernel (GEMV or decode + GEMM by the number of rows; the q8 GEMV for 4-bit codes under
    ``MOEQUANT_INT4=q8``) -> ``[..., N]`` in ``x.dtype``, or ``None`` without the extension."""
    ext = extension()
    if ext is None:
        return None
    zc = 0.0 if zero is not None else zero_point(bits, grid)
    kernel = ext.uniform_linear_q8 if bits == 4 and _INT4.get() == INT4_Q8 else ext.uniform_linear
    # the extension takes x [..., K] and bias in any float dtype and returns [..., N] in x's dtype
    return kernel(x, codes.contiguous(), scale.contiguous(), None if zero is None else zero.contiguous(),
                  bias, bits, group_size, in_features, zc, GEMV_MAX_ROWS)


@torch.library.custom_op("moequant::uniform_linear", mutates_args=())
def uniform_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   bias: torch.Tensor | None, bits: int, group_size: int, in_features: int, grid: str) -> torch.Tensor:
    return reference(x, codes, scale, zero, bias, bits, group_size, in_features, grid)


@uniform_linear.register_kernel("cpu")
def _uniform_linear_cpu(x, codes, scale, zero, bias, bits, group_size, in_features, grid):
    y = fast(x, codes, scale, zero, bias, bits, group_size, in_features, grid) if use_fast() else None
    return reference(x, codes, scale, zero, bias, bits, group_size, in_features, grid) if y is None else y


@uniform_linear.register_kernel("cuda")
def _uniform_linear_cuda(x, codes, scale, zero, bias, bits, group_size, in_features, grid):
    tri = triton_module("triton_uniform") if use_fast() else None
    if tri is None:
        return reference(x, codes, scale, zero, bias, bits, group_size, in_features, grid)
    zc = 0.0 if zero is not None else zero_point(bits, grid)
    return tri.linear(x, codes, scale, zero, bias, bits, group_size, in_features, zc)


UNIFORM_FORMATS = frozenset(("uniform-packed", "uniform-asym-packed"))  # formats.uniform's two classes


def grouped_linear(qt: QuantizedTensor, x: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor | None:
    """``x [S, K]`` sorted by expert (``counts[e]`` rows each) times each expert of the 3-D uniform tensor
    ``qt [E, N, K]`` -> ``[S, N]`` in one Triton launch on CUDA; ``None`` where that does not apply (other
    devices, gradients needed, reference mode, no Triton): the caller loops over experts."""
    if not (x.is_cuda and len(qt.shape) == 3 and use_fast()) or needs_grad(x, None):
        return None
    if qt.format_id not in UNIFORM_FORMATS:
        return None
    tri = triton_module("triton_uniform")
    if tri is None:
        return None
    codes, scale, zero, bits, gs, k, grid = op_args(qt)
    zc = 0.0 if zero is not None else zero_point(bits, grid)
    return tri.grouped(x, counts, codes, scale, zero, bits, gs, k, zc)


@uniform_linear.register_fake
def _(x, codes, scale, zero, bias, bits, group_size, in_features, grid):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def op_args(qt: QuantizedTensor) -> tuple:
    """``(codes, scale, zero, bits, group_size, in_features, grid)`` of a 2-D uniform tensor."""
    k = qt.shape[-1]
    bits = qt.attrs["bits"]
    return (qt.data["codes"], qt.data["scale"], qt.data.get("zero"), bits, resolve_group_size(k, qt.attrs["group_size"]),
            k, qt.attrs.get("grid", "midtread"))


def op_args_with_bias(qt: QuantizedTensor, bias: torch.Tensor | None) -> tuple:
    """``op_args`` with ``bias`` in its place in the op's schema (after ``zero``)."""
    codes, scale, zero, bits, gs, k, grid = op_args(qt)
    return codes, scale, zero, bias, bits, gs, k, grid


def fast_applies(qt: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The fast CPU path may run: fast kernels allowed, CPU tensors, float activations, no gradients needed."""
    if not use_fast() or len(qt.shape) != 2 or not x.is_cpu or not qt.data["codes"].is_cpu:
        return False
    if x.dtype not in _FAST_DTYPES or x.shape[-1] != qt.shape[-1]:
        return False
    return not needs_grad(x, bias)


def fast_activations(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """``fast_applies``' checks of the call (the tensor's own are ``cached_args``'): fast kernels allowed, a
    float CPU ``x``, no gradients needed. Ordered for the decode hot path (~0.4 µs)."""
    return (x.is_cpu and x.dtype in _FAST_DTYPES and use_fast()
            and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))))


def cached_args(qt: QuantizedTensor, build, key: str = RUNTIME_KEY) -> tuple | None:
    """``build(qt)`` for a 2-D tensor whose ``codes`` are on the CPU, kept in ``qt``'s runtime cache under ``key``
    (outside ``data``: not saved); ``None`` for other tensors. A hit costs two dict lookups."""
    try:
        return qt.__dict__["_runtime"][key]
    except KeyError:
        pass
    if len(qt.shape) != 2 or not qt.data["codes"].is_cpu:
        return None
    return build(qt)


def needs_grad(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Autograd needs this product's graph (the kernels have no backward; the reference path does)."""
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def _int4pack(qt: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    if qt.attrs["bits"] != 4 or (_INT4.get() or INT4_DEFAULT) != "int4pack":
        return None
    try:
        from moequant.kernels import int4pack
    except ImportError:
        return None
    return int4pack.linear(qt, x, bias)


def linear(qt: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] -> x Ŵᵀ + b [..., N]`` for a 2-D ``UniformTensor`` / ``UniformAsymTensor``, on the
    fastest path that applies (see the module docstring)."""
    if torch.compiler.is_compiling():  # the op is traced; fast or reference is decided when it runs
        if len(qt.shape) != 2 or needs_grad(x, bias):
            return QuantizedTensor.linear(qt, x, bias)
        codes, scale, zero, bits, gs, k, grid = op_args(qt)
        cpp = cpp_ops.op("uniform_linear") if x.is_cpu and codes.is_cpu and x.dtype in _FAST_DTYPES else None
        if cpp is not None and not (bits == 4 and (_INT4.get() or INT4_DEFAULT) != "native"):
            zc = 0.0 if zero is not None else zero_point(bits, grid)
            return cpp(x, codes.contiguous(), scale.contiguous(), None if zero is None else zero.contiguous(), bias,
                       bits, gs, k, zc, GEMV_MAX_ROWS)  # the C++ kernel straight from the graph
        return uniform_linear(x, codes, scale, zero, bias, bits, gs, k, grid)
    if x.is_cuda and len(qt.shape) == 2 and not needs_grad(x, bias):  # the op's CUDA kernel (Triton)
        return uniform_linear(x, *op_args_with_bias(qt, bias))
    # the checks of ``fast_applies``, split into the call's and the tensor's (cached with its kernel arguments)
    args = cached_args(qt, kernel_args) if fast_activations(x, bias) else None
    if args is not None and x.shape[-1] == args[5]:
        codes, scale, zero, bits, gs, k, zc = args
        mode = (_INT4.get() or INT4_DEFAULT) if bits == 4 else ""
        if mode == "int4pack":
            y = _int4pack(qt, x, bias)
            if y is not None:
                return y
        ext = extension()
        if ext is not None:
            kernel = ext.uniform_linear_q8 if mode == INT4_Q8 else ext.uniform_linear
            return kernel(x, codes, scale, zero, bias, bits, gs, k, zc, GEMV_MAX_ROWS)
    return QuantizedTensor.linear(qt, x, bias)


def kernel_args(qt: QuantizedTensor) -> tuple:
    """``(codes, scale, zero, bits, group_size, in_features, symmetric zero point)`` as the extension takes
    them, built once per instance and kept in its runtime cache (outside ``data``: not saved)."""
    cache = qt.__dict__.setdefault("_runtime", {})
    args = cache.get(RUNTIME_KEY)
    if args is None:
        codes, scale, zero, bits, gs, k, grid = op_args(qt)
        zc = 0.0 if zero is not None else zero_point(bits, grid)
        args = cache[RUNTIME_KEY] = (codes.contiguous(), scale.contiguous(), None if zero is None else zero.contiguous(),
                                 bits, gs, k, zc)
    return args
