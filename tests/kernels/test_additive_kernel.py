"""moequant::additive_linear: the C++ CPU kernels (``csrc/additive_gemv.cpp``) against the pure-torch reference
(decode with ``codecs.additive.reconstruct``, then ``F.linear``).

Tolerance: the GEMVs add the same products in another order (per-group dot products against each codeword, the
row scale applied to the sum), so each output is within ``RTOL · (|x| · |Ŵ|ᵀ)`` of the exact product computed in
float64 (a K-term fp32 sum in any order is within ~K·2^-24 of it, K <= 128 here); the reference itself is too.
A wrong codeword, code or scale is off by far more (``test_a_wrong_codeword_or_scale_is_caught``). The kernel's
decode (the GEMM path's tiles) is bit-identical to the reference's.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cpp_extensions_disabled, require_extension

from moequant.codecs.config import AdditiveConfig
from moequant.formats.additive import AdditiveTensor
from moequant.kernels import additive as ka
from moequant.kernels.select import reference_kernels
from moequant.kernels.uniform import GEMV_MAX_ROWS

RTOL = 1e-5
PATHS = {"table": ka.TABLE, "codeword": ka.CODEWORD, "gemm": ka.GEMM}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ext():
    return require_extension(ka.extension, "moequant-additive")


def _tensor(shape, m, b, g, share="expert", seed=0, book_dtype=torch.float16, codebook_bits=16) -> AdditiveTensor:
    """Random codes, fp16-exact codebooks and row scales in [0.5, 1.5) (no encoder run)."""
    gen = torch.Generator().manual_seed(seed)
    *lead, n, k = shape
    codes = torch.randint(1 << b, (*lead, n, k // g, m), generator=gen)  # [..., N, G, M]
    book_lead = () if share == "layer" else tuple(lead)
    books = torch.randn(*book_lead, m, 1 << b, g, generator=gen) * 0.3  # [..., M, 2^B, g]
    scale = torch.rand(*lead, n, generator=gen) + 0.5  # [..., N]
    qt = AdditiveTensor.from_parts(tuple(shape), {"codes": codes, "codebooks": books, "scale": scale},
                                   AdditiveConfig(M=m, B=b, g=g, share=share, codebook_bits=codebook_bits))
    if book_dtype != torch.float16:
        qt.data["codebooks"] = qt.data["codebooks"].to(book_dtype)
    return qt


def _x(t, k, seed=1, dtype=torch.float32):
    return (torch.randn(t, k, generator=torch.Generator().manual_seed(seed)) + 0.3).to(dtype)  # [T, K]


def _ratio(y, x, w, bias=None, rtol=RTOL) -> float:
    """Worst |y - x wᵀ (- bias)| / (rtol · (|x| · |w|ᵀ)) over the outputs, the exact product in float64."""
    want = x.double() @ w.double().T + (0 if bias is None else bias.double())
    bound = rtol * (x.double().abs() @ w.double().abs().T) + 1e-30
    return float(((y.double() - want).abs() / bound).max())


def _assert_close(y, x, w, bias=None, rtol=RTOL):
    ratio = _ratio(y, x, w, bias, rtol)
    assert ratio <= 1, f"worst error / bound {ratio:.3g}"


def _fast(qt, x, bias=None, path=ka.AUTO):
    return ka.fast(*ka.op_args(qt, x, bias), path=path)


# (N, K, M, B, g): the defaults 2x8 / 1x8 g8, 1x16 at small K, odd widths read across bytes (3x5 g4, 2x3 g16), a
# high part of 4 bits (1x12), codebooks of fewer than 8 codewords (1x2 g5), a group that is not a multiple of 8.
GEOMETRIES = [(40, 64, 2, 8, 8), (24, 48, 1, 8, 8), (20, 32, 1, 16, 8), (30, 60, 3, 5, 4), (17, 36, 1, 12, 4),
              (33, 64, 2, 3, 16), (9, 20, 1, 2, 5), (16, 72, 2, 4, 12)]


@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda v: "{}x{} {}x{} g{}".format(*v))
def test_every_path_matches_the_reference(ext, geo):
    n, k, m, b, g = geo
    qt = _tensor((n, k), m, b, g, seed=b)
    w = qt.dequantize()
    a = ka.op_args(qt, None, None)
    assert torch.equal(ext.additive_dequant(*a[1:4], m, b, g, k), w)  # the GEMM's tiles decode bit for bit
    bias = torch.randn(n)
    for t in range(1, GEMV_MAX_ROWS + 2):
        x = _x(t, k, seed=t)
        ref = ka.reference(x, *a[1:4], bias, m, b, g, k)
        _assert_close(ref, x, w, bias)
        for name, path in PATHS.items():
            y = _fast(qt, x, bias, path)
            assert y.shape == (t, n) and y.dtype == torch.float32, name
            _assert_close(y, x, w, bias)
        assert torch.equal(qt.linear(x), _fast(qt, x))  # the entry point runs the kernel


def test_decode_gemm_over_several_tiles(ext):
    # K = 4096: common.h's gemm_tile_rows gives 256 rows, so N = 600 is three tiles (256, 256, 88) of the GEMM
    # path, each written into its own columns of y. A 4096-term fp32 sum strays further than RTOL's K <= 128 bound
    # (~K·2^-24 worst case): 1e-4 here, still far below a misplaced tile's O(1).
    qt = _tensor((600, 4096), 2, 8, 8, seed=7)
    w = qt.dequantize()
    x = _x(GEMV_MAX_ROWS + 1, 4096, seed=8)
    bias = torch.randn(600, generator=torch.Generator().manual_seed(9))
    y = _fast(qt, x, bias, ka.GEMM)
    assert torch.equal(qt.linear(x, bias), y)  # beyond GEMV_MAX_ROWS rows the entry point takes this path
    _assert_close(y, x, w, bias, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_automatic_choice_and_both_branches(ext, dtype):
    # 2x4 codebooks (32 codewords) on 64 rows: the table pays at every T <= 8; on 40 rows at T = 1 only; beyond
    # GEMV_MAX_ROWS rows the tiles + GEMM
    for n, table_ts in ((64, set(range(1, 9))), (40, {1})):
        qt = _tensor((n, 32), 2, 4, 8, seed=n)
        assert {t for t in range(1, 9) if ext.table_pays(n, 32, 2, 4, 8, t)} == table_ts
        for t in range(1, GEMV_MAX_ROWS + 2):
            x = _x(t, 32, seed=t, dtype=dtype)
            want = ka.GEMM if t > GEMV_MAX_ROWS else (ka.TABLE if t in table_ts else ka.CODEWORD)
            y = qt.linear(x)
            assert y.dtype == dtype and torch.equal(y, _fast(qt, x, path=want)), (n, t)
            if dtype == torch.float32 and t <= GEMV_MAX_ROWS:  # the two GEMVs round differently: a real choice
                assert not torch.equal(y, _fast(qt, x, path=ka.CODEWORD if want == ka.TABLE else ka.TABLE))
    assert not ext.table_pays(1 << 20, 32, 1, 16, 8, 1)  # 1x16: never the table


def test_bf16_activations_and_bias(ext):
    qt = _tensor((40, 64), 2, 8, 8, seed=3)
    w = qt.dequantize()
    for t in (1, 5, GEMV_MAX_ROWS + 3):
        xb, bias = _x(t, 64, dtype=torch.bfloat16), torch.randn(40).to(torch.bfloat16)
        y = qt.linear(xb, bias)
        # computed in fp32 from the bf16 values, rounded to bf16 once at the end
        assert y.dtype == torch.bfloat16 and torch.equal(y, qt.linear(xb.float(), bias.float()).to(torch.bfloat16))
        ref = ka.reference(xb, *ka.op_args(qt, None, None)[1:4], bias, 2, 8, 8, 64)  # bf16 weights and matmul
        assert float((y.float() - ref.float()).abs().max() / ref.float().abs().max()) < 2e-2
        _assert_close(y.float(), xb.float(), w, bias.float(), rtol=8e-3)  # bf16 output rounding: 2^-8


@pytest.mark.parametrize("share", ["expert", "layer"])
def test_expert_views(ext, share):
    qt = _tensor((3, 24, 64), 2, 8, 8, share=share, seed=7)
    x = _x(3, 64).reshape(1, 3, 64)  # leading dims kept
    outs = []
    for e in range(3):
        view = qt.select(e)
        y = view.linear(x)
        assert y.shape == (1, 3, 24)
        _assert_close(y.reshape(3, 24), x.reshape(3, 64), qt.dequantize()[e])
        outs.append(y)
    assert not torch.equal(outs[0], outs[1])  # each expert's own codes (and codebooks)
    with pytest.raises(ValueError, match="needs a 2-D tensor"):
        qt.linear(x)


@pytest.mark.parametrize("book_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_codebooks_in_other_dtypes(ext, book_dtype):
    qt = _tensor((24, 64), 2, 8, 8, seed=2, book_dtype=book_dtype)
    a = ka.op_args(qt, None, None)
    assert torch.equal(ext.additive_dequant(*a[1:4], 2, 8, 8, 64), qt.dequantize())
    for t in (1, 4, 12):
        x = _x(t, 64)
        for path in PATHS.values():
            _assert_close(_fast(qt, x, path=path), x, qt.dequantize())


@pytest.mark.parametrize("share", ["expert", "layer"])
def test_int8_codebooks(ext, share):
    qt = _tensor((2, 24, 64), 2, 8, 8, share=share, seed=3, codebook_bits=8)
    assert qt.data["codebooks"].dtype == torch.int8
    for e in range(2):
        view = qt.select(e)
        w = view.dequantize()
        a = ka.op_args(view, None, None)
        assert torch.equal(ext.additive_dequant(*a[1:4], 2, 8, 8, 64), w)  # int8 x step, decoded as the reference
        for t in (1, 4, 12):
            x = _x(t, 64)
            _assert_close(view.linear(x), x, w)
            for path in PATHS.values():
                _assert_close(_fast(view, x, path=path), x, w)
    view = qt.select(0)
    x = _x(2, 64)
    before = view.linear(x)
    view.data["codebook_scale"] = view.data["codebook_scale"] * 2  # new steps, the same int8 codebooks
    assert torch.equal(view.linear(x), 2 * before)  # the cached run-time codebooks follow the steps


def test_a_wrong_codeword_or_scale_is_caught(ext):
    qt = _tensor((40, 64), 2, 8, 8, seed=5)
    x = _x(1, 64)
    a = list(ka.op_args(qt, x, None))
    code = int(qt.codes()[0, 0, 1])
    books = a[2].clone()
    books[1, code, 3] += 0.05  # one value of one codeword, used by row 0
    scale = a[3].clone()
    scale[7] *= 1.01  # one row scale
    w = qt.dequantize()
    for path in PATHS.values():
        assert _ratio(ka.fast(*a, path=path), x, w) <= 1
        assert _ratio(ka.fast(a[0], a[1], books, *a[3:], path=path), x, w) > 20
        assert _ratio(ka.fast(*a[:3], scale, *a[4:], path=path), x, w) > 20


def test_threads_do_not_change_the_gemvs(ext):
    qt = _tensor((300, 64), 2, 6, 8, seed=9)
    x = _x(3, 64)
    one = {p: _fast(qt, x, path=p) for p in (ka.TABLE, ka.CODEWORD)}
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert all(torch.equal(_fast(qt, x, path=p), y) for p, y in one.items())
    finally:
        torch.set_num_threads(n)


def test_reference_where_the_fast_path_does_not_apply(ext, monkeypatch):
    qt = _tensor((24, 64), 2, 8, 8, seed=4)
    x = _x(3, 64)
    ref = ka.reference(*ka.op_args(qt, x, None))
    assert torch.equal(ref, torch.nn.functional.linear(x, qt.dequantize()))
    assert not torch.equal(qt.linear(x), ref)  # the fast path is what the other tests compare

    def boom(*a, **k):
        raise AssertionError("fast path used")

    with monkeypatch.context() as mp:
        mp.setattr(ka, "extension", boom)
        with reference_kernels():
            assert torch.equal(qt.linear(x), ref)
            assert torch.equal(torch.ops.moequant.additive_linear(*ka.op_args(qt, x, None)), ref)
        xg = x.clone().requires_grad_(True)  # autograd: the reference, differentiable in x
        y = qt.linear(xg)
        y.sum().backward()
        assert torch.allclose(xg.grad, qt.dequantize().sum(0).expand(3, 64))
        assert qt.linear(x.double()).dtype == torch.float64  # float64 x: the reference
    with cpp_extensions_disabled(monkeypatch):
        assert ka.extension() is None
        assert torch.equal(qt.linear(x), ref)


def test_runtime_cache_follows_replaced_tensors(ext):
    qt = _tensor((24, 64), 2, 8, 8, seed=6)
    x = _x(2, 64)
    before = qt.linear(x)
    qt.data["scale"] = qt.data["scale"] * 2  # a new tensor (as a fine-tuning step may write)
    assert torch.equal(qt.linear(x), 2 * before)  # the scale multiplies each row's sum: exact


def test_op_schema_and_fake(ext):
    qt = _tensor((24, 32), 2, 4, 8, seed=8)
    x = _x(2, 32)
    args = ka.op_args(qt, x, torch.randn(24))
    _assert_close(torch.ops.moequant.additive_linear(*args), x, qt.dequantize(), args[4])
    torch.library.opcheck(torch.ops.moequant.additive_linear.default, args, test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = [torch.empty(5, 7, 32)] + [torch.empty(t.shape, dtype=t.dtype) for t in args[1:4]]
        assert torch.ops.moequant.additive_linear(*fake, None, *args[5:]).shape == (5, 7, 24)


@pytest.mark.slow
def test_torch_compile_traces_the_op(ext):
    # fullgraph: linear() may not break the graph; the compiled function runs the same kernel
    qt = _tensor((32, 64), 2, 8, 8, seed=10)
    q2 = _tensor((64, 32), 1, 8, 8, seed=11)

    def f(x):
        return q2.linear(torch.relu(qt.linear(x)))

    x = _x(3, 64)
    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))
