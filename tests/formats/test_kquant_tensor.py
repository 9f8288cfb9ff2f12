"""GGUF block tensors: the stored bytes are GGUF's (gguf-py decodes them to our dequantize bit for bit),
bytes -> tensor -> bytes is the identity, state dicts round-trip, fallbacks pick llama.cpp's types."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gq

from conftest import sqnr
from moequant.codecs.kquant import TYPES
from moequant.codecs.kquant_config import GgufConfig
from moequant.formats.base import check_data
from moequant.formats.kquant import GGUF_CLASSES, GgufQ4KTensor, GgufTensor, gguf_class_for

pytestmark = pytest.mark.usefixtures("one_thread")

BPW = {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625, "q4_0": 4.5, "q5_0": 5.5,
       "q5_1": 6.0, "q8_0": 8.5, "iq4_nl": 4.5, "f16": 16.0}


def _w(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _gguf_decode(qt: GgufTensor) -> np.ndarray:
    type_id, blocks = qt.gguf_blocks()
    return gq.dequantize(blocks.numpy(), GGMLQuantizationType(type_id))


@pytest.mark.parametrize("qtype", GgufConfig.QTYPES)
@pytest.mark.parametrize("shape", [(1, 512), (3, 5, 256), (2, 2, 3, 768)], ids=["N1", "experts", "4d"])
def test_encode_is_gguf_bit_exact(qtype, shape) -> None:
    cfg = GgufConfig(qtype=qtype)
    w = _w(*shape)
    qt = GgufTensor.encode(w, cfg)
    assert type(qt) is GGUF_CLASSES[qtype] is gguf_class_for(cfg) and qt.attrs == {"qtype": qtype}
    type_id, blocks = qt.gguf_blocks()
    assert type_id == int(GGMLQuantizationType[qtype.upper()])
    assert blocks.dtype == torch.uint8 and blocks.shape == (*shape[:-1], shape[-1] // TYPES[qtype].block
                                                           * TYPES[qtype].block_bytes)
    deq = qt.dequantize()
    assert np.array_equal(deq.numpy().view(np.int32), _gguf_decode(qt).view(np.int32))
    assert qt.bits_per_weight() == BPW[qtype] == type(qt).expected_bits_per_weight(shape, cfg)
    qt.check_data()
    assert qt.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert sqnr(w, deq) > 5.5 * min(TYPES[qtype].bits, 12) - 2  # a faithful reconstruction, not just bytes


@pytest.mark.parametrize("qtype", GgufConfig.QTYPES)
def test_state_dict_and_byte_round_trip(qtype) -> None:
    qt = GgufTensor.encode(_w(2, 3, 512, seed=1), GgufConfig(qtype=qtype))
    sd = qt.to_state_dict("blk.experts")
    assert set(sd) == {"blk.experts_blocks"}
    meta = qt.meta()
    assert meta == {"format": f"gguf-{qtype}", "format_version": 1, "shape": [2, 3, 512], "qtype": qtype}
    cls = GGUF_CLASSES[qtype]
    assert cls.check_meta(meta) == ((2, 3, 512), {"qtype": qtype})
    back = cls.from_state_dict({k: v.clone() for k, v in sd.items()}, "blk.experts", meta)
    assert torch.equal(back.gguf_blocks()[1], qt.gguf_blocks()[1])
    assert torch.equal(back.dequantize(), qt.dequantize())
    # bytes written by anyone -> our class -> the same bytes, and gguf-py's decode of them
    raw = torch.randint(0, 256, qt.data["blocks"].shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    if qtype == "f16":
        raw = raw & 0x3B  # finite halves only: gguf-py's F16 decode is a plain cast
    theirs = cls((2, 3, 512), {"blocks": raw.clone()}, {"qtype": qtype})
    assert torch.equal(theirs.gguf_blocks()[1], raw)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gq.dequantize(raw.numpy(), GGMLQuantizationType[qtype.upper()])
    got = theirs.dequantize().numpy()
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    assert np.array_equal(got.view(np.int32)[~np.isnan(ref)], ref.view(np.int32)[~np.isnan(ref)])


def test_select_expert() -> None:
    qt = GgufTensor.encode(_w(3, 4, 256, seed=3), GgufConfig(qtype="q3_k"))
    for e in range(3):
        one = qt.select(e)
        assert type(one) is type(qt) and one.shape == (4, 256)
        assert torch.equal(one.dequantize(), qt.dequantize()[e])


@pytest.mark.parametrize("qtype,k,want", [("q4_k", 896, "q5_0"), ("q2_k", 896, "iq4_nl"), ("q3_k", 320, "iq4_nl"),
                                          ("q5_k", 96, "q5_1"), ("q6_k", 160, "q8_0"), ("q4_k", 40, "f16"),
                                          ("q4_0", 48, "f16")])
def test_fallback_types(qtype, k, want) -> None:
    cfg = GgufConfig(qtype=qtype)
    qt = GgufQ4KTensor.encode(_w(3, k, seed=4), cfg)  # any class's encode goes by the config and the width
    assert type(qt) is GGUF_CLASSES[want] and qt.attrs["qtype"] == want
    assert qt.bits_per_weight() == BPW[want] == GgufTensor.expected_bits_per_weight((3, k), cfg)
    assert np.array_equal(qt.dequantize().numpy(), _gguf_decode(qt))


def test_hessian_weights_the_search() -> None:
    """A full Hessian and its diagonal give the same tensor; either changes it from the unweighted one."""
    w = _w(8, 256, seed=5)
    x = _w(512, 256, seed=6) * torch.exp(_w(256, seed=7))
    h = x.T @ x / 512
    cfg = GgufConfig(qtype="q4_k")
    full = GgufTensor.encode(w, cfg, hessian=h)
    diag = GgufTensor.encode(w, cfg, hessian=torch.diagonal(h))
    plain = GgufTensor.encode(w, cfg)
    assert torch.equal(full.gguf_blocks()[1], diag.gguf_blocks()[1])
    assert not torch.equal(full.gguf_blocks()[1], plain.gguf_blocks()[1])


def test_errors() -> None:
    raw = torch.zeros(2, 144, dtype=torch.uint8)
    with pytest.raises(ValueError, match="stores q4_k"):
        GgufQ4KTensor((2, 256), {"blocks": raw}, {"qtype": "q6_k"})
    with pytest.raises(ValueError, match="multiple of 256"):
        GgufQ4KTensor.data_spec((2, 96), {"qtype": "q4_k"})
    with pytest.raises(ValueError, match="blocks"):
        check_data(GgufQ4KTensor, (2, 512), {"qtype": "q4_k"}, {"blocks": ((2, 144), torch.uint8)})
    with pytest.raises(ValueError, match="not supported"):
        GgufQ4KTensor.check_meta({"format": "gguf-q4_k", "shape": [2, 256], "qtype": "q7_k"})
    with pytest.raises(ValueError, match="not supported"):
        GgufConfig(qtype="Q4_K")
    with pytest.raises(ValueError, match="search_steps"):
        GgufConfig(search_steps=0)
    with pytest.raises(TypeError, match="GgufConfig"):
        from moequant.codecs.config import UniformConfig

        GgufTensor.encode(_w(2, 256), UniformConfig())
    assert GgufConfig(qtype="q2_k").to_dict() == {"type": "GgufConfig", "version": 1, "qtype": "q2_k",
                                                  "search_steps": 8}
    assert GgufConfig(qtype="q2_k").short_name == "gguf-q2_k"
