"""moequant::lut_linear: the C++ CPU kernels for NF4 / FP4 (plain and double-quantized block scales) against
the pure-torch reference (decode, then F.linear).

Tolerance as for the uniform kernels (fp32, another summation order; no zero-point term here): measured
below ~1e-6 of the output's scale; a wrong table entry or block scale is ~1e-2 or more. The decode itself
(double-quantized absmax included) is bit-exact.
"""

from __future__ import annotations


import pytest
import torch

from conftest import cpp_extensions_disabled
from moequant.codecs.config import LutConfig
from moequant.formats.base import QuantizedTensor
from moequant.formats.registry import encode
from moequant.formats.rotated import RotatedTensor
from moequant.kernels import lut as kl
from moequant.kernels.select import reference_kernels

TOL = 1e-5  # max |fast - reference| / max |reference|

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ext(qgemv_ext):
    return qgemv_ext


def _tensor(n, k, lut, block, dq, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.5 + torch.rand(n, 1, generator=g))  # [N, K]
    return encode(w, LutConfig(lut=lut, block_size=block, double_quant=dq, dq_block_size=100))


def _x(m, k, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) + 0.5  # [M, K]


def _rel(y, ref):
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


GEOMETRIES = [(576, 64), (1536, 64), (545, 109), (256, 16), (128, 128)]  # (K, block): odd K, scalar blocks too


@pytest.mark.parametrize("k,block", GEOMETRIES, ids=lambda v: str(v))
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("lut", ["nf4", "fp4"])
def test_fast_matches_reference(ext, lut, dq, k, block):
    qt = _tensor(40, k, lut, block, dq)
    d = qt.data
    scales = (d.get("absmax"), d.get("absmax_codes"), d.get("absmax_scale"), d.get("absmax_offset"))
    assert torch.equal(ext.lut_dequant(d["codes"], kl.table(lut), *scales, k, block, 100, False), qt.dequantize())
    for m in (1, 3, 64, 513):
        x = _x(m, k)
        ref = QuantizedTensor.linear(qt, x)
        y = kl.linear(qt, x)
        assert y.shape == (m, 40) and _rel(y, ref) <= TOL, (m, _rel(y, ref))
        assert torch.equal(qt.linear(x), y)


def test_fp32_absmax_bias_and_shapes(ext):
    qt = _tensor(48, 576, "nf4", 64, False)
    codes, absmax = qt.data["codes"], qt.data["absmax"]
    bias = torch.randn(48)
    x = _x(6, 576).reshape(3, 2, 576)
    ref = QuantizedTensor.linear(qt, x, bias)
    for a in (absmax, absmax.float()):  # the op takes the stored fp16 or an fp32 absmax
        y = torch.ops.moequant.lut_linear(x, codes, kl.table("nf4"), a, None, None, None, bias, 576, 64, 0)
        assert y.shape == (3, 2, 48) and _rel(y, ref) <= TOL
    torch.set_num_threads(2)
    for m in (1, 9, 200):
        xm = _x(m, 576)
        assert _rel(kl.linear(qt, xm, bias), QuantizedTensor.linear(qt, xm, bias)) <= TOL


def test_a_wrong_table_or_scale_is_caught(ext):
    qt = _tensor(32, 576, "nf4", 64, True)
    x = _x(1, 576)
    ref = QuantizedTensor.linear(qt, x)
    args = list(kl.op_args(qt, None, x))
    args[2] = kl.table("nf4").clone()
    args[2][15] = 0.99  # one table entry (the largest) slightly off
    assert _rel(kl.fast(*args), ref) > 20 * TOL
    args = list(kl.op_args(qt, None, x))
    args[4] = args[4].clone()
    args[4][:, 3] += 1  # one double-quantized block scale per row one step off
    assert _rel(kl.fast(*args), ref) > 20 * TOL


def test_reference_kernels_and_no_extension_force_the_reference(ext, monkeypatch):
    qt = _tensor(32, 576, "fp4", 64, True)
    x = _x(3, 576)
    ref = QuantizedTensor.linear(qt, x)
    assert not torch.equal(kl.linear(qt, x), ref)

    def boom(*a, **k):
        raise AssertionError("fast path used")

    with monkeypatch.context() as mp:
        mp.setattr(kl, "extension", boom)
        with reference_kernels():
            assert torch.equal(kl.linear(qt, x), ref)
            assert torch.equal(torch.ops.moequant.lut_linear(*kl.op_args(qt, None, x)), ref)
    with cpp_extensions_disabled(monkeypatch):
        assert kl.extension() is None
        assert torch.equal(qt.linear(x), ref)


def test_op_traces(ext):
    qt = _tensor(24, 128, "nf4", 64, True)
    x = _x(2, 128)
    args = kl.op_args(qt, torch.randn(24), x)
    torch.library.opcheck(torch.ops.moequant.lut_linear.default, args, test_utils=("test_schema", "test_faketensor"))


def test_rotated_lut_inner(ext):
    from moequant.solvers.incoherence import Incoherence

    rot = RotatedTensor.wrap(_tensor(48, 576, "nf4", 64, True), Incoherence.make((48, 576), seed=1))
    for m in (1, 70):
        x = _x(m, 576)
        with reference_kernels():
            ref = rot.linear(x)
        assert _rel(rot.linear(x), ref) <= TOL
