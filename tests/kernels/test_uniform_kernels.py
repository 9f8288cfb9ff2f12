"""moequant::uniform_linear: the C++ CPU kernels (GEMV and decode + GEMM) against the pure-torch reference
(decode the whole matrix, then F.linear), over bit widths, grids, partial groups, scale dtypes and row counts.

Tolerance: the kernels compute in fp32 like the reference but sum in another order, and fold the zero point
as ``s (Σ x q − z Σ x)``; the cancellation of the two terms is the largest error source. Measured on these
cases (x = N(0.5, 1)): up to ~3e-6 of the output's scale; a wrong code, scale or zero is ~1e-2 or more.
"""

from __future__ import annotations


import pytest
import torch

from conftest import cpp_extensions_disabled, kernel_x, packed_uniform
from moequant.formats.base import QuantizedTensor
from moequant.formats.registry import from_state_dict
from moequant.formats.rotated import RotatedTensor
from moequant.kernels import uniform as ku
from moequant.kernels.select import reference_kernels

TOL = 1e-5  # max |fast - reference| / max |reference|

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ext(qgemv_ext):
    return qgemv_ext


@pytest.fixture(autouse=True)
def native_int4(monkeypatch):
    """4-bit tensors would go to torch's int4pack kernel (bf16 arithmetic): test ours."""
    monkeypatch.setenv(ku.INT4_ENV, "native")


_tensor = packed_uniform
_x = kernel_x


def _rel(y, ref):
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


def _reference(qt, x, bias=None):
    return QuantizedTensor.linear(qt, x, bias)  # decode, then F.linear


GEOMETRIES = [(576, 128), (100, 48), (1536, 64), (100, 32), (100, -1)]  # (K, group size): partial groups too


@pytest.mark.parametrize("k,gs", GEOMETRIES, ids=lambda v: str(v))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])  # 5, 6: the generic vector layout
@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
def test_fast_matches_reference(ext, bits, symmetric, k, gs, scale_dtype):
    qt = _tensor(40, k, bits, gs, symmetric, scale_dtype)
    codes, scale, zero, b, g, kk, grid = ku.op_args(qt)
    # the decode itself is bit-exact (same arithmetic: (q - z) * s in fp32)
    zc = 0.0 if zero is not None else ku.zero_point(bits, grid)
    assert torch.equal(ext.uniform_dequant(codes, scale, zero, bits, g, k, zc, False), qt.dequantize())
    for m in (1, 3, 64, 513):  # GEMV (one pass, 4 + 3 rows...) and decode + GEMM
        x = _x(m, k)
        ref = _reference(qt, x)
        y = ku.linear(qt, x)
        assert y.shape == (m, 40) and y.dtype == torch.float32
        assert _rel(y, ref) <= TOL, (m, _rel(y, ref))
        assert torch.equal(qt.linear(x), y)  # the format dispatches to the same kernel


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_decode_gemm_over_several_tiles(ext, symmetric):
    # K = 4096: common.h's gemm_tile_rows gives 256 rows, so N = 600 is three tiles (256, 256, 88), each written
    # into its own columns of y; a tile placed at the wrong columns or a partial last tile mishandled is off by O(1)
    qt = _tensor(600, 4096, 4, 128, symmetric)
    x = _x(ku.GEMV_MAX_ROWS + 1, 4096)
    bias = torch.randn(600, generator=torch.Generator().manual_seed(3))
    ref = _reference(qt, x, bias)
    assert _rel(ku.linear(qt, x, bias), ref) <= TOL


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_midrise_v1(ext, bits):
    # a v1 symmetric tensor (no grid in its metadata: midrise)
    qt = _tensor(24, 576, bits, 128, True)
    meta = {**qt.meta(), "format_version": 1}
    del meta["grid"]
    v1 = from_state_dict(qt.to_state_dict("p"), "p", meta)
    assert v1.attrs["grid"] == "midrise"
    for t in (qt, v1):
        for m in (1, 5, 40):
            x = _x(m, 576)
            assert _rel(ku.linear(t, x), _reference(t, x)) <= TOL
    assert not torch.allclose(ku.linear(v1, _x(1, 576)), ku.linear(qt, _x(1, 576)))


def test_a_wrong_code_is_caught(ext):
    # the tolerance is far below what one wrong code per row does
    qt = _tensor(32, 576, 4, 128, False)
    x = _x(1, 576)
    ref = _reference(qt, x)
    bad = type(qt)(qt.shape, {**qt.data, "codes": qt.data["codes"] ^ 1}, dict(qt.attrs))  # flip a bit per byte
    assert _rel(ku.linear(bad, x), ref) > 100 * TOL
    tiny = type(qt)(qt.shape, {**qt.data, "codes": qt.data["codes"].clone()}, dict(qt.attrs))
    tiny.data["codes"][:, 5] ^= 0x10  # one code of every row (column 11) off by one step
    assert _rel(ku.linear(tiny, x), ref) > 20 * TOL


def test_bias_shapes_dtypes_threads(ext):
    qt = _tensor(48, 576, 3, 64, False)
    bias = torch.randn(48)
    x = _x(6, 576).reshape(2, 3, 576)  # leading dims
    ref = _reference(qt, x, bias)
    y = ku.linear(qt, x, bias)
    assert y.shape == (2, 3, 48) and _rel(y, ref) <= TOL
    xb = x.to(torch.bfloat16)  # computed in fp32, returned in bf16
    yb = ku.linear(qt, xb, bias)
    assert yb.dtype == torch.bfloat16 and _rel(yb, _reference(qt, xb.float(), bias)) < 1e-2
    torch.set_num_threads(2)  # rows split across threads (the fixture restores the count)
    for m in (1, 9, 200):
        xm = _x(m, 576)
        assert _rel(ku.linear(qt, xm, bias), _reference(qt, xm, bias)) <= TOL


def test_gradients_take_the_reference_path(ext):
    qt = _tensor(16, 128, 4, 64, True)
    x = _x(2, 128).requires_grad_()
    y = ku.linear(qt, x)
    y.sum().backward()
    assert torch.allclose(x.grad, qt.dequantize().sum(0).expand(2, -1))


def test_reference_kernels_and_no_extension_force_the_reference(ext, monkeypatch):
    qt = _tensor(32, 576, 2, 64, False)
    x = _x(3, 576)
    ref = _reference(qt, x)
    assert not torch.equal(ku.linear(qt, x), ref)  # the fast path sums in another order

    def boom(*a, **k):
        raise AssertionError("fast path used")

    with monkeypatch.context() as mp:
        mp.setattr(ku, "extension", boom)
        with reference_kernels():
            assert torch.equal(ku.linear(qt, x), ref)
            assert torch.equal(torch.ops.moequant.uniform_linear(x, *ku.op_args(qt)[:3], None, *ku.op_args(qt)[3:]),
                               ref)
    with cpp_extensions_disabled(monkeypatch):
        assert ku.extension() is None
        assert torch.equal(ku.linear(qt, x), ref)
        assert torch.equal(qt.linear(x), ref)
    assert ku.extension() is not None


def test_op_matches_and_traces(ext):
    qt = _tensor(24, 100, 3, 32, False)
    codes, scale, zero, bits, gs, k, grid = ku.op_args(qt)
    x = _x(2, 100)
    bias = torch.randn(24)
    y = torch.ops.moequant.uniform_linear(x, codes, scale, zero, bias, bits, gs, k, grid)
    assert _rel(y, _reference(qt, x, bias)) <= TOL
    torch.library.opcheck(torch.ops.moequant.uniform_linear.default, (x, codes, scale, zero, bias, bits, gs, k, grid),
                          test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fx = torch.empty(5, 7, 100)
        out = torch.ops.moequant.uniform_linear(fx, torch.empty(codes.shape, dtype=torch.uint8),
                                                torch.empty(scale.shape, dtype=scale.dtype),
                                                torch.empty(zero.shape, dtype=torch.uint8), None, bits, gs, k, grid)
        assert out.shape == (5, 7, 24)


@pytest.mark.parametrize("bits", [2, 4])
def test_rotated_inner_fast_path(ext, bits):
    from moequant.solvers.incoherence import Incoherence

    inner = _tensor(48, 576, bits, 64, False)
    rot = RotatedTensor.wrap(inner, Incoherence.make((48, 576), seed=0))
    for m in (1, 70):
        x = _x(m, 576)
        with reference_kernels():
            ref = rot.linear(x)
        assert _rel(rot.linear(x), ref) <= TOL
        assert _rel(ref, x @ rot.dequantize().T) < 1e-4  # the rotation identity the reference relies on


@pytest.mark.slow
def test_torch_compile_traces_both_ops(ext):
    # fullgraph: nothing in linear() may break the graph (use_fast's context variable is read at run time,
    # inside the op); the compiled function runs the same kernels
    from moequant.codecs.config import LutConfig
    from moequant.formats.registry import encode

    qt = _tensor(64, 128, 3, 64, False)
    lq = encode(torch.randn(32, 64), LutConfig(lut="nf4", block_size=64, double_quant=True))

    def f(x):
        return lq.linear(torch.relu(qt.linear(x)))

    x = _x(3, 128)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))
