"""Packed tiny models of every architecture on a GPU (marked ``gpu``; skipped without CUDA): the model moved to
CUDA runs its packed linears and routed experts through the Triton kernels (counted), and its logits equal the
CPU reference path's (decode the whole matrix, then ``F.linear``) within 1e-4 of their scale: float32
activations, IEEE dots, only the order of the float32 sums differs (measured on an H200: BENCHMARKS.md "GPU
kernels")."""

from __future__ import annotations

import collections

import pytest
import torch

from conftest import ARCHS, MOE_ARCHS, tiny_model
from moequant import api
from moequant.alloc.recipe import Recipe
from moequant.codecs.config import LutConfig, TrellisConfig, UniformConfig
from moequant.kernels.select import reference_kernels
from moequant.kernels.triton_load import triton_module

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
pytest.importorskip("triton")  # without it every packed layer takes the reference path (tested elsewhere)

IDS = torch.tensor([[1, 5, 9, 77, 3, 200, 31, 8, 15, 99, 4, 250, 17, 60], [2, 7, 7, 7, 90, 12, 0, 3, 1, 1, 5, 6,
                                                                           8, 9]])
METHODS = {
    "int4": UniformConfig(bits=4, group_size=32),
    "int3-sym": UniformConfig(bits=3, group_size=32, symmetric=True),
    "trellis2": TrellisConfig(bits=2, L=12, V=2, code="hyb", Q=9),
    "nf4": LutConfig(lut="nf4", block_size=32),  # no Triton kernel: the reference decode on CUDA tensors
}
TRITON = {"int4": "triton_uniform", "int3-sym": "triton_uniform", "trellis2": "triton_trellis"}


def _count_triton_calls(monkeypatch) -> collections.Counter:
    """Count calls of the Triton modules' entry points (the ops look them up at call time)."""
    calls: collections.Counter = collections.Counter()
    for name in ("triton_uniform", "triton_trellis"):
        mod = triton_module(name)
        for fn in ("linear", "grouped"):
            orig = getattr(mod, fn)

            def spy(*a, _orig=orig, _key=f"{name}.{fn}", **kw):
                calls[_key] += 1
                return _orig(*a, **kw)

            monkeypatch.setattr(mod, fn, spy)
    return calls


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_model_on_cuda_matches_the_cpu_reference(arch, method, monkeypatch):
    model = tiny_model(arch)
    api.quantize(model, Recipe.uniform(METHODS[method]), progress=False)
    with torch.no_grad(), reference_kernels():
        want = model(IDS).logits  # [2, T, V] on the CPU, whole-matrix decode
    calls = _count_triton_calls(monkeypatch)
    model.cuda()
    with torch.no_grad():
        got = model(IDS.cuda()).logits.cpu()
    mod = TRITON.get(method)
    if mod is not None:
        assert calls[f"{mod}.linear"] > 0, calls  # attention (and dense MLP) projections
        if arch in MOE_ARCHS:
            assert calls[f"{mod}.grouped"] > 0, calls  # routed experts, one launch per stack
    else:
        assert not calls, calls
    err = float((got - want).abs().max() / want.abs().max())
    assert err < 1e-4, (arch, method, err)
