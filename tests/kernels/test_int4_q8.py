"""``MOEQUANT_INT4=q8``: 4-bit GEMVs against int8-quantized activations (``qgemv.uniform_linear_q8``).

x is quantized per block of 32 columns (``d = max |x| / 127``, ``a = round(x * 127 / max |x|)``, half to
even), the block's integer dot product with the codes is exact, and the fp32 kernel accumulates
``s_g (Σ_b d_b Σ q a − z_g Σ_b d_b Σ a)``. Two references:

- ``exact_q8``: the same quantization of x in torch, then the integer products in float64: the kernel differs
  by fp32 accumulation only (measured ≤ 1.5e-5 of max |y| over these cases, where the zero-point term cancels
  most of the code term; bound 1e-4);
- the fp32 path (``QuantizedTensor.linear``: decode, then ``F.linear``): the error of quantizing x to int8.
  Each output's error is a sum of K rounding errors, ~ N(0, σ²) with σ² = Σ_k ŵ_k² d_b(k)² / 12: measured
  ≤ 4.2 σ over all ~154k outputs of these cases (bound 6 σ; a wrong code, scale or zero costs far more), and
  ≤ 0.57% of ‖y‖ over the 576 outputs of a matrix (bound 1%; single outputs of the N = 1, 7 matrices reach
  1.8% of |y| where the product happens to be small).

With the switch unset (or any other value) 4-bit tensors take the fp32 kernel as before, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import kernel_x, packed_uniform
from moequant.codecs.uniform import num_groups
from moequant.formats.base import QuantizedTensor
from moequant.formats.bitpack import unpack
from moequant.kernels import uniform as ku

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT_TOL = 1e-4  # max |y - exact_q8| / max |exact_q8|
FP32_TOL = 1e-2  # ‖y - fp32 path‖ / ‖fp32 path‖ over the N = 576 outputs of a row of x
SIGMAS = 6.0  # |y - fp32 path| / σ of the int8 rounding, per output

# (K, group size): SmolLM2's widths (group 128: 2 pairs of blocks per group, unrolled), a partial last group
# (600 = 4 x 128 + 88: a half-empty last pair; 576 = 2 x 256 + 64), a partial last 32-block (K % 32 != 0),
# one group per row, groups of 64 / 256 (1 / 4 pairs, unrolled), groups of an odd number of blocks (32, 96:
# the block layout)
GEOMETRIES = [(64, 32), (576, 128), (1536, 128), (4864, 128), (600, 128), (100, 32), (100, -1), (576, 64),
              (576, 256), (480, 96), (200, 64)]


@pytest.fixture(scope="module")
def ext(qgemv_ext):
    if not qgemv_ext.q8_applies(4, 128, 576):
        pytest.skip("no AVX2 in this build: q8 falls back to the fp32 kernel")
    return qgemv_ext


@pytest.fixture
def q8(monkeypatch):
    monkeypatch.setenv(ku.INT4_ENV, ku.INT4_Q8)


def _tensor(n, k, gs, symmetric, seed=0, scale_dtype="float16", bits=4):
    return packed_uniform(n, k, bits, gs, symmetric, scale_dtype, seed)


_x = kernel_x


def quantize_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp32 -> (int8 values as float [M, nb, 32] (zero-padded), block scales d [M, nb] fp32)."""
    m, k = x.shape
    nb = -(-k // 32)
    xb = F.pad(x, (0, nb * 32 - k)).view(m, nb, 32)
    amax = xb.abs().amax(-1)  # [M, nb]
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))  # fp32, as the kernel computes it
    return torch.round(xb * inv.unsqueeze(-1)), amax / 127.0


def exact_q8(qt, x: torch.Tensor, grid: str | None = None) -> torch.Tensor:
    """y [M, N] from the int8-quantized x and the stored codes, scales and zeros (a symmetric tensor: on
    ``grid``, default its own): exact in float64."""
    codes, scale, zero, bits, gs, k, own_grid = ku.op_args(qt)
    grid = grid or own_grid
    n = codes.shape[0]
    a, d = quantize_x(x)  # [M, nb, 32], [M, nb]
    nb = a.shape[1]
    q = F.pad(unpack(codes, bits, k).double(), (0, nb * 32 - k)).view(n, nb, 32)  # [N, nb, 32]
    if zero is None:
        z = torch.full((n, num_groups(k, gs)), ku.zero_point(bits, grid), dtype=torch.float64)  # [N, G]
    else:
        z = unpack(zero, bits, num_groups(k, gs)).double()
    grp = torch.arange(nb) * 32 // gs  # group of each block
    s_b, z_b = scale.double()[:, grp], z[:, grp]  # [N, nb]
    dot = torch.einsum("mbk,nbk->mnb", a.double(), q)  # [M, N, nb] integer dot products
    sa = a.double().sum(-1)  # [M, nb]
    return (s_b * (dot - z_b * sa.unsqueeze(1)) * d.double().unsqueeze(1)).sum(-1)  # [M, N]


def q8_sigma(qt, x: torch.Tensor) -> torch.Tensor:
    """[M, N]: the standard deviation of an output's int8 rounding error, ``sqrt(Σ_k ŵ_k² d_b(k)² / 12)``."""
    k = x.shape[-1]
    d = quantize_x(x)[1].double().repeat_interleave(32, -1)[:, :k]  # [M, K] block scale of each column
    return ((qt.dequantize().double() ** 2) @ (d**2).T / 12).sqrt().T


def _max_rel(y, ref):
    return float((y.double() - ref.double()).abs().max() / ref.double().abs().max())


def _norm_rel(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("k,gs", GEOMETRIES, ids=lambda v: str(v))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_q8_matches_exact_and_fp32(ext, q8, k, gs, symmetric):
    for n in (1, 7, 576):
        qt = _tensor(n, k, gs, symmetric, seed=n + k)
        for m in (1, 3, 8):
            x = _x(m, k, seed=m)
            y = ku.linear(qt, x)
            assert y.shape == (m, n) and y.dtype == torch.float32
            ex = exact_q8(qt, x)
            assert _max_rel(y, ex) <= EXACT_TOL, (n, m, _max_rel(y, ex))
            ref = QuantizedTensor.linear(qt, x)  # fp32 x
            err = (y.double() - ref.double()).abs()
            sigmas = float((err / (q8_sigma(qt, x) + 1e-5 * float(ref.abs().max()))).max())
            assert sigmas <= SIGMAS, (n, m, sigmas)
            if n == 576:
                assert _norm_rel(y, ref) <= FP32_TOL, (n, m, _norm_rel(y, ref))
            assert torch.equal(qt.linear(x), y)  # the format dispatches to the same kernel


@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float32"])
def test_q8_scale_dtypes_bias_and_shapes(ext, q8, scale_dtype):
    qt = _tensor(96, 576, 128, False, scale_dtype=scale_dtype)
    bias = torch.randn(96)
    x = _x(6, 576).view(2, 3, 576)  # leading dims
    y = ku.linear(qt, x, bias)
    assert y.shape == (2, 3, 96)
    ex = exact_q8(qt, x.reshape(6, 576)) + bias.double()
    assert _max_rel(y.reshape(6, 96), ex) <= EXACT_TOL
    # the op path (torch.ops / torch.compile) takes the same kernel
    codes, scale, zero, bits, gs, k, grid = ku.op_args(qt)
    assert torch.equal(ku.fast(x, codes, scale, zero, bias, bits, gs, k, grid), y)


def test_q8_zero_blocks_and_midrise(ext, q8):
    qt = _tensor(40, 256, 64, True)
    x = _x(2, 256)
    x[:, 32:96] = 0.0  # all-zero blocks: d = 0
    codes, scale, zero, bits, gs, k, _ = ku.op_args(qt)
    for grid in ("midtread", "midrise"):  # midrise: a half-integer zero point
        y = ku.fast(x, codes, scale, zero, None, bits, gs, k, grid)
        assert _max_rel(y, exact_q8(qt, x, grid)) <= EXACT_TOL


def test_q8_falls_back_where_it_does_not_apply(ext, q8):
    """More rows than the GEMV takes, a group size that is not whole 32-blocks, other widths, non-fp32 x:
    the fp32 kernel, bit for bit."""
    cases = [(_tensor(24, 576, 128, False), _x(9, 576)),  # M > GEMV_MAX_ROWS: decode + GEMM
             (_tensor(24, 100, 48, False), _x(2, 100)),  # group size 48
             (_tensor(24, 576, 128, False, bits=3), _x(2, 576)),
             (_tensor(24, 576, 128, True), _x(2, 576).bfloat16())]
    for qt, x in cases:
        codes, scale, zero, bits, gs, k, grid = ku.op_args(qt)
        zc = 0.0 if zero is not None else ku.zero_point(bits, grid)
        old = ext.uniform_linear(x, codes, scale, zero, None, bits, gs, k, zc, ku.GEMV_MAX_ROWS)
        assert torch.equal(ku.linear(qt, x), old)
    assert not ext.q8_applies(4, 48, 100) and not ext.q8_applies(3, 128, 576) and ext.q8_applies(4, 100, 100)


@pytest.mark.parametrize("value", [None, "native", "NATIVE "])
def test_switch_off_is_the_fp32_kernel(ext, monkeypatch, value):
    if value is None:
        monkeypatch.delenv(ku.INT4_ENV, raising=False)
    else:
        monkeypatch.setenv(ku.INT4_ENV, value)
    for k, gs, sym in [(576, 128, False), (100, 32, True), (1536, 128, True)]:
        qt = _tensor(40, k, gs, sym)
        codes, scale, zero, bits, g, kk, grid = ku.op_args(qt)
        zc = 0.0 if zero is not None else ku.zero_point(bits, grid)
        for m in (1, 3, 8):
            x = _x(m, k)
            old = ext.uniform_linear(x, codes, scale, zero, None, bits, g, kk, zc, ku.GEMV_MAX_ROWS)
            assert torch.equal(ku.linear(qt, x), old)
            assert torch.equal(ku.fast(x, codes, scale, zero, None, bits, g, kk, grid), old)


def test_switch_follows_the_environment_at_run_time(ext, monkeypatch):
    qt = _tensor(64, 576, 128, False)
    x = _x(1, 576)
    monkeypatch.delenv(ku.INT4_ENV, raising=False)
    y_fp32 = ku.linear(qt, x)
    monkeypatch.setenv(ku.INT4_ENV, "q8")
    y_q8 = ku.linear(qt, x)
    assert not torch.equal(y_q8, y_fp32) and _max_rel(y_q8, exact_q8(qt, x)) <= EXACT_TOL
    monkeypatch.delenv(ku.INT4_ENV)
    assert torch.equal(ku.linear(qt, x), y_fp32)


def test_q8_threads_agree(ext, q8):
    """Rows split over threads: each output row is computed the same way whatever the split."""
    qt = _tensor(1536, 576, 128, False)
    x = _x(1, 576)
    y1 = ku.linear(qt, x)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y2 = ku.linear(qt, x)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("k,gs", [(576, 128), (600, 128), (480, 96)], ids=lambda v: str(v))
def test_q8_rows_of_x_do_not_depend_on_m(ext, q8, k, gs):
    """Each output sums in one order whatever the pass: a row of x gives the same y alone or among 8."""
    qt = _tensor(37, k, gs, False)
    x = _x(8, k)
    y = ku.linear(qt, x)
    for m in range(8):
        assert torch.equal(ku.linear(qt, x[m : m + 1]), y[m : m + 1])
