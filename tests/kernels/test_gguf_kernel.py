"""moequant::gguf_linear: the C++ GGUF block kernels (kernels/gguf.py, csrc/gguf_gemv.cpp) against the torch
decode of codecs.kquant.

Decoding is ggml's arithmetic, so the kernel's ``dequantize`` must equal the reference bit for bit on every type.
The product is the same values times x summed in fp32 in another order (the GEMV factors each sub-block's scale
out of its sum): measured max |kernel - reference| <= ~1e-6 of ``|x| |W|ᵀ`` here; the tests allow 1e-5. A wrong
field offset, nibble, sign or scale is off by O(1) of it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import require_extension
from moequant.codecs.config import GgufConfig
from moequant.formats.kquant import GGUF_CLASSES
from moequant.kernels import gguf as kg
from moequant.kernels.select import kernels
from moequant.kernels.uniform import GEMV_MAX_ROWS

pytestmark = pytest.mark.usefixtures("one_thread")

TYPES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "q5_0", "q5_1", "q8_0", "iq4_nl"]
TOL = 1e-5


@pytest.fixture(scope="module")
def ext():
    return require_extension(kg.extension, "gguf")


def _tensor(qtype: str, n: int = 37, k: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.1 + 3 * torch.rand(n, 1, generator=g))  # rows of different scales
    return GGUF_CLASSES[qtype].encode(w, GgufConfig(qtype=qtype))


def _reference_weight(qt):
    with kernels("reference"):
        return qt.dequantize(torch.float32)


def _rel_err(y, x, w):
    return float(((y - F.linear(x, w)).abs() / (x.abs() @ w.abs().T).clamp_min(1e-30)).max())


@pytest.mark.parametrize("qtype", TYPES)
def test_decode_is_the_reference_bit_for_bit(ext, qtype):
    qt = _tensor(qtype)
    ref = _reference_weight(qt)
    assert torch.equal(kg.dequantize(qt), ref)
    assert torch.equal(qt.dequantize(torch.float32), ref)  # the format's own dequantize takes the kernel


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1, 40])  # GEMV, then tiles + BLAS
def test_product_matches_the_reference(ext, qtype, rows):
    qt = _tensor(qtype, seed=rows)
    w = _reference_weight(qt)
    g = torch.Generator().manual_seed(100 + rows)
    x = torch.randn(rows, 512, generator=g) + 0.5  # a mean: the min types' offset term does not cancel away
    bias = torch.randn(37, generator=g)
    y = qt.linear(x, bias)
    assert y.shape == (rows, 37)
    assert _rel_err(y - bias, x, w) <= TOL


@pytest.mark.parametrize("qtype", ["q4_k", "q8_0"])
def test_decode_gemm_over_several_tiles(ext, qtype):
    # K = 4096: common.h's gemm_tile_rows gives 256 rows, so N = 600 is three tiles (256, 256, 88) of the decode +
    # BLAS path, each written into its own columns of y
    qt = _tensor(qtype, n=600, k=4096)
    w = _reference_weight(qt)
    x = torch.randn(GEMV_MAX_ROWS + 1, 4096, generator=torch.Generator().manual_seed(5)) + 0.5
    bias = torch.randn(600, generator=torch.Generator().manual_seed(6))
    y = qt.linear(x, bias)
    assert y.shape == (GEMV_MAX_ROWS + 1, 600)
    assert _rel_err(y - bias, x, w) <= TOL


def test_leading_dims_dtypes_and_the_op(ext):
    qt = _tensor("q6_k")
    w = _reference_weight(qt)
    x = torch.randn(2, 3, 512)
    y = qt.linear(x)
    assert y.shape == (2, 3, 37) and _rel_err(y.reshape(6, 37), x.reshape(6, 512), w) <= TOL
    yb = qt.linear(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    assert (yb.float() - F.linear(x.to(torch.bfloat16).float(), w)).abs().max() <= 0.02 * y.abs().max()
    op = torch.ops.moequant.gguf_linear(x, qt.data["blocks"], qt.stored.type_id, 512, None)
    assert torch.equal(op, y)
    with kernels("reference"):
        assert torch.equal(qt.linear(x), F.linear(x, w))  # the definition


def test_a_width_no_block_divides_takes_the_reference(ext):
    qt = GGUF_CLASSES["q6_k"].encode(torch.randn(5, 40), GgufConfig(qtype="q6_k"))  # stored as F16
    assert qt.stored.name == "f16" and kg.dequantize(qt) is None
    x = torch.randn(1, 40)
    assert torch.equal(qt.linear(x), F.linear(x, qt.dequantize()))


def test_gradients_take_the_reference(ext):
    qt = _tensor("q4_k")
    x = torch.randn(2, 512, requires_grad=True)
    qt.linear(x).sum().backward()
    assert torch.allclose(x.grad, _reference_weight(qt).sum(0).expand(2, -1))


def test_bad_arguments_are_refused(ext):
    qt = _tensor("q4_k")
    blocks = qt.data["blocks"]
    with pytest.raises(RuntimeError, match="bytes per row"):
        ext.gguf_linear(torch.randn(1, 512), blocks[:, :-1].contiguous(), 12, 512, None, 8)
    with pytest.raises(RuntimeError, match="not a multiple"):
        ext.gguf_dequant(blocks, 12, 500)
    with pytest.raises(RuntimeError, match="no decoder"):
        ext.gguf_dequant(blocks, 1, 512)  # F16 has no blocks to decode


@pytest.mark.parametrize("qtype", TYPES)
def test_decode_of_random_bytes_is_the_reference_bit_for_bit(ext, qtype):
    """Every field of every block at every bit pattern (scales' high bits, NaN / Inf / subnormal fp16 scales),
    not only what an encoder writes: every decoded value equals the reference's (NaN where it is NaN; a NaN's
    payload is not compared)."""
    t = GGUF_CLASSES[qtype].ggml
    k = 2 * t.block
    raw = torch.randint(0, 256, (64, k // t.block * t.block_bytes), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(7))
    qt = GGUF_CLASSES[qtype]((64, k), {"blocks": raw}, {"qtype": qtype})
    got, ref = kg.dequantize(qt), _reference_weight(qt)
    nan = ref.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), ref[~nan].view(torch.int32))  # bit for bit, signed zeros too
