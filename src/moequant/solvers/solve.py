"""One weight tensor, one method: (optionally) rotate it incoherent, quantize it with RTN or LDLQ, pack
it. Experts of a fused ``[E, N, K]`` tensor are solved one at a time, each with its own Hessian.

A method without a column quantizer (additive codebooks) cannot be driven by LDLQ; with a Hessian (solver
``ldlq``, what ``--solver auto`` picks for it) its encoder gets the whole damped Hessian and searches its codes
under it (``formats.registry.encode(w, config, hessian)``)."""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass

import torch

from moequant.calib.hessian import damp
from moequant.codecs.config import MethodConfig
from moequant.errors import MoequantError, UnrepresentableError
from moequant.formats.base import QuantizedTensor
from moequant.formats.methods import METHODS, column_quantizer
from moequant.formats.registry import encode, tensor_class_for
from moequant.solvers.config import SolverConfig
from moequant.solvers.ldlq import ldlq, proxy_loss

log = logging.getLogger(__name__)


@dataclass
class SolveInfo:
    """What solving one tensor measured: the proxy loss ``tr(ΔHΔᵀ)/tr(WHWᵀ)`` (per expert for 3-D
    tensors; None without a Hessian) in the original basis, and the seconds it took."""

    proxy: list[float] | None = None
    seconds: float = 0.0

    @property
    def mean_proxy(self) -> float | None:
        return None if self.proxy is None else sum(self.proxy) / len(self.proxy)


def tensor_seed(base: int, name: str) -> int:
    """A per-tensor seed for sign vectors: stable across runs and machines (CRC32 of the name)."""
    return (base * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 31)


def solve_tensor(w: torch.Tensor, config: MethodConfig, solver: SolverConfig, hessian: torch.Tensor | None,
                 where: str, h_eval: torch.Tensor | None = None) -> tuple[QuantizedTensor, SolveInfo]:
    """Quantize ``w [N, K]`` or ``[E, N, K]`` under ``config``.

    ``hessian``: ``[K, K]`` (shared by every expert) or ``[E, K, K]``, undamped, float64; None for RTN
    without calibration. ``h_eval`` (default ``hessian``): the Hessian the reported proxy loss is
    measured with — for the Hessian ablation, each expert's own ``H_e`` whatever it was solved with. With ``solver.incoherence == "rht"`` the weight and Hessian are rotated
    (``W̃ = H_N S_V W S_U H_Kᵀ``), the rotated weight is quantized and the result is wrapped so that
    decoding and the runtime undo the rotation.
    """
    try:
        return _solve(w, config, solver, hessian, where, h_eval)
    except UnrepresentableError as e:  # e.g. 1e30 weights: a group scale overflows float16
        raise UnrepresentableError(f"{where} {tuple(w.shape)}: {e}") from None


def _solve(w: torch.Tensor, config: MethodConfig, solver: SolverConfig, hessian: torch.Tensor | None,
           where: str, h_eval: torch.Tensor | None) -> tuple[QuantizedTensor, SolveInfo]:
    t0 = time.time()
    check_finite(w, where)
    w = w.detach().to(torch.float32)
    h = None if hessian is None else hessian.to(torch.float64)
    h_ev = h if h_eval is None else h_eval.to(torch.float64)
    inc = None
    if solver.incoherence == "rht":
        from moequant.solvers.incoherence import Incoherence  # the kernel-accelerated transform installed

        inc = Incoherence.make(tuple(w.shape), seed=tensor_seed(solver.seed, where), per_expert=True,
                               rule=solver.rht_transform)
        w = inc.weight(w)
        h = None if h is None else inc.hessian(h)
        h_ev = h if h_eval is None else inc.hessian(h_ev)
    info = SolveInfo()
    whole = _searches_whole_matrix(config)
    if whole and inc is not None and w.dim() == 3 and getattr(config, "share", None) == "layer":
        raise MoequantError(f"{where}: --incoherence rht rotates every expert differently, which codebooks shared "
                            f"across experts cannot follow; use --incoherence none or --share expert")
    if solver.solver == "rtn" or h is None or whole:
        if solver.needs_hessian and h is None:
            raise MoequantError(f"{where}: solver {solver.solver!r} needs a calibration Hessian")
        if whole and solver.act_order:
            raise MoequantError(f"{where}: --act-order orders LDLQ's columns; {config.short_name} has no columns "
                                f"to order (drop --act-order)")
        # a method without a column quantizer takes the whole damped Hessian into its own search
        inner = encode(w, config, damp(h, solver.damp, where=where) if whole and solver.needs_hessian else None)
        if h is not None:
            w_hat = inner.dequantize()
            info.proxy = _per_expert(lambda e: proxy_loss(_at(w, e), _at(w_hat, e), _at_h(h_ev, e)), w)
    else:
        parts, proxies = [], []
        for e in range(w.shape[0] if w.dim() == 3 else 1):
            we, he = _at(w, e), _at_h(h, e)
            label = where if w.dim() == 2 else f"{where} expert {e}"
            q = column_quantizer(config, we, hdiag=torch.diagonal(he).to(torch.float32))
            if solver.act_order and q.block != 1:
                raise MoequantError(f"{where}: --act-order needs a scalar codec (int, nf4, fp4); {config.short_name} "
                                    f"quantizes {q.block} columns jointly")
            res = ldlq(we, damp(he, solver.damp, where=label), q, lazy=solver.lazy, act_order=solver.act_order,
                       h_proxy=_at_h(h_ev, e), where=label)
            parts.append(q.parts())
            proxies.append(res.proxy)
        stacked = parts[0] if w.dim() == 2 else {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
        inner = tensor_class_for(config).from_parts(tuple(w.shape), stacked, config)
        info.proxy = proxies
    qt = inner
    if inc is not None:
        from moequant.formats.rotated import RotatedTensor

        qt = RotatedTensor.wrap(inner, inc)
    info.seconds = time.time() - t0
    return qt, info


def _searches_whole_matrix(config: MethodConfig) -> bool:
    """A registered method without a column quantizer: its encoder takes the Hessian itself."""
    m = METHODS.find(config)
    return m is not None and m.columns is None


def check_finite(w: torch.Tensor, where: str) -> None:
    """Refuse a weight holding NaN or ±Inf before it is quantized: every codec would turn it into NaN
    rows or silently zeroed groups. One pass over the tensor; the message names it and counts the values."""
    finite = torch.isfinite(w)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(w).sum())
    n_inf = int((~finite).sum()) - n_nan
    first = tuple(int(i) for i in (~finite).nonzero()[0])
    raise MoequantError(f"{where} {tuple(w.shape)}: {n_nan + n_inf} non-finite values ({n_nan} NaN, {n_inf} Inf; "
                        f"first at index {first}) of {w.numel()}: the source weights are corrupt")


def _at(w: torch.Tensor, e: int) -> torch.Tensor:
    return w if w.dim() == 2 else w[e]


def _at_h(h: torch.Tensor, e: int) -> torch.Tensor:
    return h if h.dim() == 2 else h[e]


def _per_expert(fn, w: torch.Tensor) -> list[float]:
    return [fn(e) for e in range(w.shape[0] if w.dim() == 3 else 1)]
