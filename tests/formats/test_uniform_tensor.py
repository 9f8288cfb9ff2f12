"""Packed uniform tensors: state-dict round trips, expert slicing, bit counting, quality, errors."""

from __future__ import annotations

import pytest
import torch

from conftest import sqnr
from moequant.codecs.config import UniformConfig
from moequant.codecs.uniform import uniform_dequantize, uniform_quantize
from moequant.formats.registry import FORMATS, encode, from_state_dict, tensor_class_for
from moequant.formats.uniform import UniformAsymTensor, UniformTensor


pytestmark = pytest.mark.usefixtures("one_thread")


def _gauss(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CASES = [
    ((3, 96, 320), UniformConfig(bits=4, group_size=64)),
    ((3, 96, 320), UniformConfig(bits=3, group_size=64, symmetric=False)),
    ((830, 544), UniformConfig(bits=3, group_size=32, clip_steps=4)),
    ((830, 544), UniformConfig(bits=5, group_size=32, symmetric=False, clip_search=False)),
    ((2, 2, 24, 48), UniformConfig(bits=6, group_size=-1, scale_dtype="bfloat16")),
    ((2, 40, 64), UniformConfig(bits=2, group_size=16, symmetric=False, scale_dtype="float32")),
    ((2, 40, 64), UniformConfig(bits=8, group_size=64)),
    # partial last groups: 545 = 4 * 128 + 33, 100 = 2 * 48 + 4
    ((830, 545), UniformConfig(bits=4, group_size=128)),
    ((3, 20, 100), UniformConfig(bits=3, group_size=48, symmetric=False)),
]


@pytest.mark.parametrize("shape,cfg", CASES, ids=[c.short_name for _, c in CASES])
def test_state_dict_round_trip(shape, cfg) -> None:
    w = _gauss(*shape)
    qt = encode(w, cfg)
    assert type(qt) is tensor_class_for(cfg)
    sd = qt.to_state_dict("layer.weight")
    expected_names = {"layer.weight_codes", "layer.weight_scale"} | (set() if cfg.symmetric else {"layer.weight_zero"})
    assert set(sd) == expected_names
    meta = qt.meta()
    back = from_state_dict({k: v.clone() for k, v in sd.items()}, "layer.weight", meta)
    assert type(back) is type(qt) and back.attrs == qt.attrs and back.shape == qt.shape
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert back.dequantize(torch.bfloat16).dtype == torch.bfloat16
    # matches the pure codec bit for bit
    codes, scale, zero = uniform_quantize(w, cfg.bits, cfg.group_size, cfg.symmetric, cfg.clip_search,
                                          cfg.clip_steps, cfg.clip_min,
                                          scale_dtype=getattr(torch, cfg.scale_dtype))
    assert torch.equal(qt.dequantize(), uniform_dequantize(codes, scale, zero, cfg.group_size, cfg.bits))
    assert qt.bits_per_weight() == pytest.approx(type(qt).expected_bits_per_weight(shape, cfg), abs=0)


@pytest.mark.parametrize("cfg", [UniformConfig(bits=3, group_size=64),
                                 UniformConfig(bits=2, group_size=32, symmetric=False)])

def test_select_expert(cfg) -> None:
    w = _gauss(3, 96, 320, seed=1)  # [E, N, K]
    qt = encode(w, cfg)
    full = qt.dequantize()
    for e in range(3):
        sub = qt.select(e)
        assert sub.shape == (96, 320)
        assert torch.equal(sub.dequantize(), full[e])


def test_stored_layout() -> None:
    qt = encode(_gauss(3, 96, 320), UniformConfig(bits=3, group_size=64, symmetric=False))
    assert qt.format_id == "uniform-asym-packed"
    assert qt.data["codes"].shape == (3, 96, 120) and qt.data["codes"].dtype == torch.uint8  # 320 * 3 / 8
    assert qt.data["scale"].shape == (3, 96, 5) and qt.data["scale"].dtype == torch.float16
    assert qt.data["zero"].shape == (3, 96, 3) and qt.data["zero"].dtype == torch.uint8  # 5 codes -> one 3-byte chunk
    assert qt.meta() == {"format": "uniform-asym-packed", "format_version": 2, "shape": [3, 96, 320], "bits": 3,
                         "group_size": 64, "symmetric": False, "scale_dtype": "float16"}


def test_bits_per_weight_hand_count() -> None:
    w = _gauss(256, 512)
    qt = encode(w, UniformConfig(bits=4, group_size=128))
    assert qt.bits_per_weight() == 4 + 16 / 128 == 4.125
    qa = encode(w, UniformConfig(bits=2, group_size=128, symmetric=False))
    assert qa.bits_per_weight() == 2 + (16 + 2) / 128
    assert UniformAsymTensor.expected_bits_per_weight((256, 512), UniformConfig(bits=2, symmetric=False)) == 2 + 18 / 128
    # 3-bit zero points of 5 groups occupy one whole 3-byte chunk: padding counts
    cfg = UniformConfig(bits=3, group_size=64, symmetric=False)
    assert UniformAsymTensor.expected_bits_per_weight((96, 320), cfg) == (120 * 8 + 5 * 16 + 24) / 320
    # bf16 / fp32 scales
    assert UniformTensor.expected_bits_per_weight((8, 256), UniformConfig(bits=4, scale_dtype="float32")) == 4.25
    assert UniformTensor.expected_bits_per_weight((4, 8, 256), UniformConfig(bits=4, group_size=-1)) == 4 + 16 / 256


def test_partial_group_bits_counted_in_full() -> None:
    # K = 576, group 128: 4 full groups + one of 64 columns, each with a 16-bit scale (and a 4-bit zero)
    cfg = UniformConfig(bits=4, group_size=128)
    assert UniformTensor.expected_bits_per_weight((8, 576), cfg) == (576 * 4 + 5 * 16) / 576
    acfg = UniformConfig(bits=4, group_size=128, symmetric=False)
    qt = encode(_gauss(8, 576), acfg)
    assert qt.data["scale"].shape == (8, 5) and qt.data["zero"].shape == (8, 3)  # 5 zero points: 3 bytes
    assert qt.bits_per_weight() == (576 * 4 + 5 * 16 + 24) / 576 == UniformAsymTensor.expected_bits_per_weight(
        (8, 576), acfg)


def test_v1_symmetric_checkpoint_decodes_midrise() -> None:
    # a v1 'uniform-packed' tensor (no 'grid' in its metadata) keeps its midrise decoding
    from moequant.formats.bitpack import pack

    codes = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0]], dtype=torch.uint8)
    sd = {"p_codes": pack(codes, 2), "p_scale": torch.tensor([[2.0]], dtype=torch.float16)}
    v1 = {"format": "uniform-packed", "format_version": 1, "shape": [1, 8], "bits": 2, "group_size": -1,
          "symmetric": True, "scale_dtype": "float16"}
    qt = from_state_dict(sd, "p", v1)
    assert qt.attrs["grid"] == "midrise"
    assert qt.dequantize().tolist() == [[-3.0, -1.0, 1.0, 3.0, 3.0, 1.0, -1.0, -3.0]]
    v2 = {**v1, "format_version": 2, "grid": "midtread"}
    assert from_state_dict(sd, "p", v2).dequantize().tolist() == [[-4.0, -2.0, 0.0, 2.0, 2.0, 0.0, -2.0, -4.0]]
    with pytest.raises(ValueError, match="lacks 'grid'"):
        from_state_dict(sd, "p", {**v1, "format_version": 2})
    # re-saved, a v1 tensor says what it is: its metadata carries grid = midrise
    assert from_state_dict(sd, "p", v1).meta()["grid"] == "midrise"


def test_quality_through_format() -> None:
    w = _gauss(256, 512)
    got = {b: sqnr(w, encode(w, UniformConfig(bits=b, symmetric=b != 2)).dequantize()) for b in (2, 3, 4)}
    assert got[4] >= 19.85 and got[3] >= 14.1 and got[2] >= 8.4  # measured 19.89 / 14.16 / 8.51 dB


def test_hessian_full_and_diag_agree() -> None:
    w = _gauss(2, 32, 64, seed=2)  # [E, N, K]
    x = _gauss(2, 200, 64, seed=3) * torch.linspace(0.1, 3, 64)
    h = x.transpose(-1, -2) @ x / 200  # [E, K, K]
    cfg = UniformConfig(bits=3, group_size=32)
    a = encode(w, cfg, hessian=h)
    b = encode(w, cfg, hessian=torch.diagonal(h, dim1=-2, dim2=-1))
    c = encode(w, cfg)
    assert torch.equal(a.dequantize(), b.dequantize())
    assert not torch.equal(a.dequantize(), c.dequantize())
    with pytest.raises(ValueError, match="hessian"):
        encode(w, cfg, hessian=torch.ones(2, 63))


def test_errors() -> None:
    for bits in (1, 7):
        with pytest.raises(ValueError, match=f"--bits {bits}"):
            UniformConfig(bits=bits)
    with pytest.raises(ValueError, match="symmetric"):
        UniformTensor.encode(_gauss(4, 128), UniformConfig(symmetric=False))
    with pytest.raises(ValueError, match="format 'uniform-packed' is not 'uniform-asym-packed'"):
        qt = encode(_gauss(4, 128), UniformConfig())
        UniformAsymTensor.from_state_dict(qt.to_state_dict("p"), "p", qt.meta())
    with pytest.raises(KeyError, match="nope"):
        from_state_dict({}, "p", {"format": "nope"})


def test_registry() -> None:
    gguf = ["gguf-iq4_nl", "gguf-q2_k", "gguf-q3_k", "gguf-q4_0", "gguf-q4_k", "gguf-q5_0", "gguf-q5_1", "gguf-q5_k",
            "gguf-q6_k", "gguf-q8_0"]
    assert FORMATS.names() == ["additive-packed", *gguf, "lut4-dq-packed", "lut4-packed", "rht", "trellis-packed",
                               "uniform-asym-packed", "uniform-packed"]
    assert FORMATS.get("uniform-packed") is UniformTensor
