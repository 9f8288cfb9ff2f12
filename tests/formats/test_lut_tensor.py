"""Packed NF4 / FP4 tensors, with and without double quantization of the block scales."""

from __future__ import annotations

import pytest
import torch

from conftest import sqnr
from moequant.codecs.config import LutConfig
from moequant.codecs.lut import lut_dequantize, lut_quantize, lut_values
from moequant.formats.lut import LutDqTensor, LutTensor
from moequant.formats.registry import encode, from_state_dict, tensor_class_for


pytestmark = pytest.mark.usefixtures("one_thread")


def _gauss(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CASES = [
    ((3, 96, 320), LutConfig(lut="nf4", block_size=64)),
    ((3, 96, 320), LutConfig(lut="fp4", block_size=32, double_quant=True, dq_block_size=100)),
    ((830, 544), LutConfig(lut="nf4", block_size=32, double_quant=True)),
    ((830, 545), LutConfig(lut="fp4", block_size=109)),  # odd K: the last byte of each row is half padding
    ((2, 2, 6, 64), LutConfig(lut="nf4", block_size=16, double_quant=True, dq_block_size=7)),
]


@pytest.mark.parametrize("shape,cfg", CASES, ids=[f"{c.short_name}-{len(s)}d" for s, c in CASES])
def test_state_dict_round_trip(shape, cfg) -> None:
    w = _gauss(*shape)
    qt = encode(w, cfg)
    assert type(qt) is tensor_class_for(cfg)
    sd = qt.to_state_dict("m.w")
    names = {"codes", "absmax_codes", "absmax_scale", "absmax_offset"} if cfg.double_quant else {"codes", "absmax"}
    assert set(sd) == {f"m.w_{n}" for n in names}
    back = from_state_dict({k: v.clone() for k, v in sd.items()}, "m.w", qt.meta())
    assert type(back) is type(qt) and back.attrs == qt.attrs
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert qt.bits_per_weight() == type(qt).expected_bits_per_weight(shape, cfg)
    assert sqnr(w, qt.dequantize()) > 17


@pytest.mark.parametrize("dq", [False, True])
def test_select_expert(dq: bool) -> None:
    qt = encode(_gauss(3, 96, 320, seed=1), LutConfig(block_size=64, double_quant=dq, dq_block_size=64))
    full = qt.dequantize()
    for e in range(3):
        assert torch.equal(qt.select(e).dequantize(), full[e])


def test_plain_matches_codec_and_layout() -> None:
    w = _gauss(3, 96, 320)
    qt = encode(w, LutConfig(block_size=64))
    assert qt.format_id == "lut4-packed"
    assert qt.data["codes"].shape == (3, 96, 160) and qt.data["absmax"].dtype == torch.float16
    codes, absmax = lut_quantize(w, lut_values("nf4"), 64)
    assert torch.equal(qt.dequantize(), lut_dequantize(codes, absmax, lut_values("nf4"), 64))


def test_dq_layout() -> None:
    qt = encode(_gauss(3, 96, 320), LutConfig(block_size=64, double_quant=True, dq_block_size=256))
    assert qt.format_id == "lut4-dq-packed"
    assert qt.data["absmax_codes"].shape == (3, 96, 5) and qt.data["absmax_codes"].dtype == torch.uint8
    assert qt.data["absmax_scale"].shape == (3, 2) and qt.data["absmax_scale"].dtype == torch.float32  # 480 scales
    assert qt.data["absmax_offset"].shape == (3, 1)
    assert qt.meta()["double_quant"] is True and qt.meta()["dq_block_size"] == 256


def test_nf4_quality_and_double_quant_cost() -> None:
    w = _gauss(256, 512)
    plain = encode(w, LutConfig(lut="nf4", block_size=64))
    dq = encode(w, LutConfig(lut="nf4", block_size=64, double_quant=True))
    s_plain, s_dq = sqnr(w, plain.dequantize()), sqnr(w, dq.dequantize())
    assert s_plain >= 20.6  # measured 20.72 dB
    assert abs(s_dq - s_plain) < 0.1
    assert plain.bits_per_weight() == 4.25
    # 4 + 8/64 + one fp32 per 256 scales + one fp32 mean: 4 + 0.125 + 256/131072 + 32/131072
    assert dq.bits_per_weight() == 4 + 0.125 + (8 * 32 + 32) / (256 * 512)
    assert dq.bits_per_weight() == pytest.approx(4.1272, abs=1e-4)
    fp4 = encode(w, LutConfig(lut="fp4", block_size=64))
    assert 18.1 <= sqnr(w, fp4.dequantize()) < s_plain  # measured 18.27 dB: NF4 fits a Gaussian better


def test_errors() -> None:
    with pytest.raises(ValueError, match="block size 48 .*K=100"):
        encode(_gauss(4, 100), LutConfig(block_size=48))
    with pytest.raises(ValueError, match="block size 48 .*K=100"):
        LutDqTensor.expected_bits_per_weight((4, 100), LutConfig(block_size=48, double_quant=True))
    with pytest.raises(ValueError, match="double_quant"):
        LutTensor.encode(_gauss(4, 64), LutConfig(double_quant=True))
    with pytest.raises(ValueError, match="af4"):
        LutConfig(lut="af4")
    with pytest.raises(KeyError, match="absmax_scale"):
        qt = encode(_gauss(4, 64), LutConfig(double_quant=True))
        sd = qt.to_state_dict("p")
        del sd["p_absmax_scale"]
        from_state_dict(sd, "p", qt.meta())
