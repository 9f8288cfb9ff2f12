"""torch's int4pack CPU kernel behind our 4-bit uniform tensors: same weights, bf16 arithmetic."""

import pytest
import torch

from moequant.codecs.config import UniformConfig
from moequant.formats.registry import tensor_class_for
from moequant.formats.bitpack import unpack
from moequant.formats.uniform import UniformTensor
from moequant.kernels import int4pack

# bf16 activations and scales: ~2^-9 relative per operand; outputs agree with the fp32 decode to < 0.5%
# of their scale (measured 0.19-0.48% over the cases below).
TOL = 8e-3


def _tensor(n, k, gs, symmetric, seed=0, scale_dtype="float16"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (1 + torch.rand(n, 1, generator=g))
    cfg = UniformConfig(bits=4, group_size=gs, symmetric=symmetric, scale_dtype=scale_dtype)
    return tensor_class_for(cfg).encode(w, cfg)


def _rel(y, ref):
    return float((y.float() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("n,k,gs", [(64, 128, 64), (1536, 576, 128), (48, 100, 32), (32, 576, -1), (40, 256, 256)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("m", [1, 3, 65])
def test_matches_reference_decode(n, k, gs, symmetric, m):
    qt = _tensor(n, k, gs, symmetric)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    ref = x @ qt.dequantize().T
    y = int4pack.linear(qt, x)
    assert y is not None and y.shape == (m, n) and y.dtype == torch.float32
    assert _rel(y, ref) < TOL
    # element-wise against the same arithmetic emulated in fp32 (bf16 x, scales and zeros; bf16 output)
    emul = _bf16_emulation(qt, x)
    assert torch.all((y - emul).abs() <= 2**-7 * emul.abs() + 1e-3 * emul.abs().max())
    # a weight one code off in 8 columns is far outside the tolerance
    w = qt.dequantize()
    w[:, :8] += qt.data["scale"].float()[:, :1]
    assert _rel(x @ w.T, ref) > 4 * TOL


def _bf16_emulation(qt, x):
    n, k = qt.shape
    codes = unpack(qt.data["codes"], 4, k).float()
    gs = k if qt.attrs["group_size"] == -1 else qt.attrs["group_size"]
    s = qt.data["scale"].float()
    m = ((8.0 - int4pack.zero_points(qt)) * s).bfloat16().float()
    s = s.bfloat16().float()
    w = (codes - 8) * s.repeat_interleave(gs, 1)[:, :k] + m.repeat_interleave(gs, 1)[:, :k]
    return (x.bfloat16().float() @ w.T).bfloat16().float()


def test_midrise_v1_grid_and_bias():
    qt = _tensor(32, 128, 64, True)
    v1 = UniformTensor(qt.shape, dict(qt.data), {**qt.attrs, "grid": "midrise"})
    x = torch.randn(2, 5, 128)
    b = torch.randn(32)
    ref = x @ v1.dequantize().T + b
    y = int4pack.linear(v1, x, b)
    assert y.shape == (2, 5, 32) and _rel(y, ref) < TOL


def test_repack_cached_once_and_not_saved():
    qt = _tensor(64, 128, 64, False)
    x = torch.randn(1, 128)
    int4pack.linear(qt, x)
    first = qt.__dict__["_runtime"][int4pack.CACHE_KEY][0]
    int4pack.linear(qt, x)
    assert qt.__dict__["_runtime"][int4pack.CACHE_KEY][0] is first
    assert int4pack.runtime_nbytes(qt) == 64 * 64 + 2 * 2 * 64 * 2  # codes K/2 bytes a row + bf16 scale/zero pairs
    assert set(qt.to_state_dict("w.")) == {"w._codes", "w._scale", "w._zero"}  # the repack is not saved


def test_not_applicable_returns_none():
    x = torch.randn(1, 96)
    assert int4pack.linear(_tensor(32, 96, 48, False), x) is None  # no allowed divisor of 48
    cfg = UniformConfig(bits=3, group_size=32, symmetric=False)
    assert int4pack.linear(tensor_class_for(cfg).encode(torch.randn(32, 96), cfg), x) is None


def test_plan():
    assert int4pack.plan(576, 128) == (128, 640, 128)
    assert int4pack.plan(576, -1) == (576, 576, 64)
    assert int4pack.plan(100, -1) == (128, 128, 128)
    assert int4pack.plan(96, 96) == (96, 96, 32)
    assert int4pack.plan(96, 48) is None
