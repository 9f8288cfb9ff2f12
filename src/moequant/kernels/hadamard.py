"""The activation side of the random Hadamard transform as one op: ``moequant::rht_apply``.

Schema::

    rht_apply(Tensor x, Tensor signs_before, Tensor signs_after, Tensor block, bool transpose) -> Tensor

- ``x`` float32 ``[..., n]`` (``R`` rows: the product of the leading dims); ``signs_before`` /
  ``signs_after`` ±1 ``[n]`` or empty (none); ``block`` the ``[m, m]`` block ``B_m`` of
  ``H_n = H_p ⊗ B_m`` (``codecs.hadamard``), empty when ``m = 1``;
- returns ``((x · s_before) H_nᵀ) · s_after`` ``[..., n]`` (each row ``v ↦ H_n v``), or with ``transpose``
  ``((x · s_before) H_n) · s_after`` (``v ↦ H_nᵀ v``). ``Incoherence.transform_input`` (``H_K S_U x``) is
  ``rht_apply(x, S_U, -, B, False)`` and ``restore_output`` (``S_V H_Nᵀ y``) ``rht_apply(y, -, S_V, B, True)``.

``moequant::rht_apply_outer`` (same schema) is the transform of the rules with the block outside
(``"paley-outer"``, ``B_m ⊗ H_p``, and ``"hartley"``, ``C_o ⊗ H_p``): each row is viewed as ``[o, p]`` (element
``i = b · p + a``), ``H_p`` runs along the contiguous runs of ``p`` floats and the block mixes the ``o`` runs
(``o`` multiply-adds per element on whole vectors, 4 output runs at a time so that each vector loaded serves 4
of them) instead of the block applied to sub-rows of ``m`` floats. The two kernels at prefill shapes are
timed side by side by ``benchmarks/rht_transform_speed.py`` (BENCHMARKS.md, issue #10).

Implementations:
- ``reference``: torch ops (the block as a batched matmul, then ``hadamard_transform`` of the power of two);
- CPU: ``csrc/hadamard.cpp`` (extension ``rht``): per row, a sign-multiplying copy, an in-place butterfly FWHT
  (AVX2) and the block applied to 4 ``m``-float sub-rows at a time in registers, with the ``1/√p`` folded in
  (rows in parallel only for large ``R``). fp32 like the reference, in another summation order: within
  ~2e-7 of ``‖x‖`` measured (the tests allow 1e-5).

``fast(x, signs_before, signs_after, transpose)`` is what ``Incoherence`` calls: the extension directly (no
dispatcher, which costs more than the kernel at decode sizes), or ``None`` where it does not apply
(``MOEQUANT_KERNELS=reference``, no extension, not float32 / CPU, autograd, per-expert signs, tracing):
then the caller runs its torch path.

Measured here (AMD EPYC, 2 shared cores under other load, 1 thread, torch 2.13; best of 5 x 2000 calls of
``Incoherence.transform_input``, torch path -> kernel): x [1, 576] 39.7 -> 7.7 µs, [1, 1536] 66.4 -> 8.7,
[1, 4864] 92.9 -> 24.5, [8, 1536] 172 -> 23.6, [300, 1536] 7650 -> 720. At decode most of the remaining
~8 µs was the checks of ``fast`` (``use_fast``, ``MOEQUANT_NO_EXT``: ~2.5 µs, since dict probes:
``select.EnvSwitch``; [1, 576] 8.6 -> 5.8 µs CPU time) and the pybind call; the kernel is ~1.5 µs.
SmolLM2-135M RHT int4, greedy decode at batch 1: 15.7 -> 21.9 tok/s (plain int4: 27.7).
"""

from __future__ import annotations


import torch

from moequant.codecs.hadamard import (OUTER_RULES, _factor, block_kind, hadamard_factors, hadamard_transform,
                                      set_fast_path)
from moequant.kernels import cpp_build, cpp_ops
from moequant.kernels.select import use_fast

EXT_NAME = "rht"
EXT_SOURCES = ["hadamard.cpp"]
_SOURCES = tuple(EXT_SOURCES)  # the key cpp_build._load caches the module under
_NONE = torch.empty(0)  # "no signs" / "no block" for the extension


def extension():
    """The compiled ``rht`` kernel, or ``None`` (then the torch path runs)."""
    return cpp_build.load_extension(EXT_NAME, EXT_SOURCES)


_CPU = torch.device("cpu")


def block_for(n: int, rule: str = "paley") -> torch.Tensor:
    """The block of ``H_n`` under ``rule`` (``B_m`` of ``H_p ⊗ B_m``, or ``C_o`` of ``C_o ⊗ H_p``) float32 ``[m, m]``
    on the CPU, or an empty tensor when ``m = 1`` (``codecs.hadamard``'s cached factor: contiguous as built)."""
    _, m = hadamard_factors(n, rule)
    return _factor(m, torch.float32, _CPU, block_kind(rule)) if m > 1 else _NONE


def reference(x: torch.Tensor, signs_before: torch.Tensor, signs_after: torch.Tensor, block: torch.Tensor,
              transpose: bool) -> torch.Tensor:
    """The definition with torch ops: ``x [..., n] -> [..., n]`` (see the module docstring)."""
    n = x.shape[-1]
    m = block.shape[0] if block.numel() else 1
    y = x * signs_before if signs_before.numel() else x
    v = y.reshape(-1, n // m, m)  # [R, p, m]: element i = a * m + b
    if m > 1:
        v = v @ (block if transpose else block.T)  # each sub-row b -> B b (B^T b)
    v = hadamard_transform(v.transpose(1, 2)).transpose(1, 2)  # H_p along a (symmetric)
    y = v.reshape(x.shape)
    return y * signs_after if signs_after.numel() else y


def reference_outer(x: torch.Tensor, signs_before: torch.Tensor, signs_after: torch.Tensor, block: torch.Tensor,
                    transpose: bool) -> torch.Tensor:
    """``rht_apply_outer`` with torch ops: ``H_n = C ⊗ H_p`` (block outside), ``x [..., n] -> [..., n]``."""
    n = x.shape[-1]
    o = block.shape[0] if block.numel() else 1
    y = x * signs_before if signs_before.numel() else x
    v = hadamard_transform(y.reshape(-1, o, n // o))  # [R, o, p]: element i = b * p + a; H_p along a
    if o > 1:
        v = (block.T if transpose else block) @ v  # the rows mixed: C (C^T) along b
    y = v.reshape(x.shape)
    return y * signs_after if signs_after.numel() else y


@torch.library.custom_op("moequant::rht_apply", mutates_args=())
def rht_apply(x: torch.Tensor, signs_before: torch.Tensor, signs_after: torch.Tensor, block: torch.Tensor,
              transpose: bool) -> torch.Tensor:
    return reference(x, signs_before, signs_after, block, transpose)


def _cpu_kernel(name: str, ref):
    """The CPU implementation of op ``name``: the extension's function, or ``ref`` without it."""
    def run(x, signs_before, signs_after, block, transpose):
        ext = extension() if use_fast() and x.dtype == torch.float32 else None
        if ext is None:
            return ref(x, signs_before, signs_after, block, transpose)
        f32 = [t.to(torch.float32).contiguous() for t in (signs_before, signs_after, block)]
        return getattr(ext, name)(x, *f32, transpose)

    return run


rht_apply.register_kernel("cpu")(_cpu_kernel("rht_apply", reference))


@rht_apply.register_fake
def _(x, signs_before, signs_after, block, transpose):
    return torch.empty_like(x)


@torch.library.custom_op("moequant::rht_apply_outer", mutates_args=())
def rht_apply_outer(x: torch.Tensor, signs_before: torch.Tensor, signs_after: torch.Tensor, block: torch.Tensor,
                    transpose: bool) -> torch.Tensor:
    return reference_outer(x, signs_before, signs_after, block, transpose)


rht_apply_outer.register_kernel("cpu")(_cpu_kernel("rht_apply_outer", reference_outer))
rht_apply_outer.register_fake(lambda x, *rest: torch.empty_like(x))


def _signs(s: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``s`` as the extension takes it (float32 ``[n]``, or empty for none); ``None``: not for the kernel."""
    if s is None:
        return _NONE
    if s.dim() != 1 or s.shape[0] != n or not s.is_cpu:
        return None  # per-expert [E, n] signs, a shape error (the torch path reports it), another device
    return s if s.dtype == torch.float32 and s.is_contiguous() else s.to(torch.float32).contiguous()


def _extension():
    """``extension()`` at a lower cost per call (it runs twice per rotated linear at decode)."""
    return None if cpp_build._disabled() else cpp_build._load(EXT_NAME, _SOURCES)


def fast(x: torch.Tensor, signs_before: torch.Tensor | None, signs_after: torch.Tensor | None,
         transpose: bool, rule: str = "paley") -> torch.Tensor | None:
    """``x [..., n] -> [..., n]`` by the C++ kernel (``rht_apply`` semantics, ``H_n`` from ``n``), or ``None``
    where the fast path does not apply (see the module docstring). Every check here costs a fraction of a
    microsecond: at decode sizes the kernel itself takes 1-3 µs."""
    if x.dtype != torch.float32 or not x.is_cpu or x.dim() == 0 or not use_fast():
        return None
    if x.requires_grad and torch.is_grad_enabled():
        return None  # no backward here
    n = x.shape[-1]
    sb, sa = _signs(signs_before, n), _signs(signs_after, n)
    if sb is None or sa is None or n == 0:
        return None
    name = "rht_apply_outer" if rule in OUTER_RULES else "rht_apply"  # the block outside (B ⊗ H_p) or inside
    if torch.compiler.is_compiling():  # the C++ op from the graph, where prepared; else the torch path is traced
        cpp = cpp_ops.op(name)
        return None if cpp is None else cpp(x, sb, sa, block_for(n, rule), transpose)
    ext = _extension()
    return None if ext is None else getattr(ext, name)(x, sb, sa, block_for(n, rule), transpose)  # [..., n]


set_fast_path(fast)  # Incoherence.transform_input / restore_output try the kernel first (codecs.hadamard)
