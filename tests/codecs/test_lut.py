"""NF4 / FP4 lookup-table codec and double quantization of the block scales."""

from __future__ import annotations

import pytest
import torch

from conftest import sqnr
from moequant.codecs.lut import (LUTS, block_absmax, dq_dequantize, dq_quantize, lut_assign, lut_dequantize,
                                 lut_quantize, lut_values)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gauss() -> torch.Tensor:
    return torch.randn(256, 512, generator=torch.Generator().manual_seed(0))  # [N, K]


def test_tables() -> None:
    nf4, fp4 = lut_values("nf4"), lut_values("fp4")
    assert nf4.shape == fp4.shape == (16,)
    assert torch.all(nf4[1:] > nf4[:-1]) and nf4[0] == -1 and nf4[7] == 0 and nf4[15] == 1
    assert nf4[8].item() == pytest.approx(0.07958029955625534)
    # bitsandbytes e2m1 / 12, sign in bit 3
    expect = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3]) / 12
    assert torch.allclose(fp4[:8], expect) and torch.allclose(fp4[8:], -expect)
    assert fp4.abs().max() == 1 and sorted(LUTS) == ["fp4", "nf4"]
    with pytest.raises(ValueError, match="af4"):
        lut_values("af4")


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_nearest_assignment(name: str) -> None:
    lut = lut_values(name)
    x = torch.linspace(-1.2, 1.2, 1000).reshape(1, 1000)  # [1, 1000]
    codes = lut_assign(x, lut, torch.ones(1, 1), 1000)
    brute = (x.unsqueeze(-1) - lut).abs()  # [1, 1000, 16]
    chosen = (x - lut[codes.long()]).abs()
    assert torch.allclose(chosen, brute.amin(-1))


def test_nf4_sqnr_and_exact_decode(gauss) -> None:
    lut = lut_values("nf4")
    codes, absmax = lut_quantize(gauss, lut, 64)
    assert codes.shape == (256, 512) and codes.dtype == torch.uint8 and absmax.shape == (256, 8)
    assert torch.equal(absmax, absmax.half().float())
    w_hat = lut_dequantize(codes, absmax, lut, 64)
    assert sqnr(gauss, w_hat) >= 20.6  # measured 20.72 dB
    # the block's largest magnitude is reproduced up to the fp16 rounding of its absmax
    top = gauss.reshape(256, 8, 64).abs().amax(-1)
    assert torch.allclose(w_hat.reshape(256, 8, 64).abs().amax(-1), top, rtol=1e-3)


def test_fp4_sqnr(gauss) -> None:
    lut = lut_values("fp4")
    codes, absmax = lut_quantize(gauss, lut, 64)
    assert sqnr(gauss, lut_dequantize(codes, absmax, lut, 64)) >= 18.1  # measured 18.27 dB


def test_block_absmax_expert_dims() -> None:
    w = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(1))  # [E, N, K]
    a = block_absmax(w, 16)
    assert a.shape == (3, 4, 2)
    assert torch.equal(a[2, 1, 1], w[2, 1, 16:].abs().max())


def test_zero_block() -> None:
    w = torch.zeros(2, 8)
    codes, absmax = lut_quantize(w, lut_values("nf4"), 4)
    assert (codes == 7).all()
    assert torch.equal(lut_dequantize(codes, absmax, lut_values("nf4"), 4), w)


def test_block_must_divide_k() -> None:
    with pytest.raises(ValueError, match="block size 48 .*K=100"):
        lut_quantize(torch.randn(2, 100), lut_values("nf4"), 48)


def test_double_quant_layout_and_error(gauss) -> None:
    absmax = block_absmax(gauss, 64)  # [256, 8]: 2048 scales -> 8 dq blocks of 256
    codes, scale, offset = dq_quantize(absmax, 256)
    assert codes.shape == (256, 8) and codes.dtype == torch.uint8
    assert scale.shape == (8,) and offset.shape == (1,)
    assert offset.item() == pytest.approx(absmax.mean().item(), rel=1e-6)
    assert int(codes.min()) >= 1  # symmetric int8 uses codes 1..255
    back = dq_dequantize(codes, scale, offset, 256)
    block_max = (absmax - offset).reshape(8, 256).abs().amax(-1)  # [8]
    err = (back - absmax).reshape(8, 256).abs().amax(-1)
    assert (err <= block_max / 127 / 2 * 1.0001).all()  # half a step of linear int8


def test_double_quant_padding_and_expert_dims() -> None:
    a = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(5)) + 1  # [E, N, NB]: 35 scales per expert
    codes, scale, offset = dq_quantize(a, 16)
    assert codes.shape == (3, 5, 7) and scale.shape == (3, 3) and offset.shape == (3, 1)
    back = dq_dequantize(codes, scale, offset, 16)
    assert (back - a).abs().max() < 0.01
    # each expert's blocks only see that expert's scales
    c1, s1, o1 = dq_quantize(a[1], 16)
    assert torch.equal(c1, codes[1]) and torch.equal(s1, scale[1]) and torch.equal(o1, offset[1])
    # the last, padded block scales to its own 3 real scales: scales 32..34 row-major
    tail = (a[0].reshape(-1)[32:] - offset[0]).abs().max() / 127
    assert scale[0, 2].item() == pytest.approx(tail.item(), rel=1e-6)


def test_double_quant_keeps_sqnr(gauss) -> None:
    lut = lut_values("nf4")
    codes, absmax = lut_quantize(gauss, lut, 64)
    plain = sqnr(gauss, lut_dequantize(codes, absmax, lut, 64))
    a_hat = dq_dequantize(*dq_quantize(block_absmax(gauss, 64), 256), 256)
    dq = sqnr(gauss, lut_dequantize(lut_assign(gauss, lut, a_hat, 64), a_hat, lut, 64))
    assert abs(dq - plain) < 0.1
