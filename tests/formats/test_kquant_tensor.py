"""GGUF block tensors: the stored bytes are GGUF's (gguf-py decodes them to our dequantize bit for bit),
bytes -> tensor -> bytes is the identity, state dicts round-trip, fallbacks pick llama.cpp's types."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gq

from conftest import sqnr
from moequant.codecs.config import GgufConfig, UniformConfig
from moequant.codecs.kquant import TYPES
from moequant.formats.base import check_data
from moequant.formats.kquant import GGUF_CLASSES, GgufQ4KTensor, GgufTensor
from moequant.formats.methods import METHODS
from moequant.formats.registry import FORMATS, encode, from_state_dict, tensor_class_for

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
    qt = encode(w, cfg)
    assert type(qt) is GGUF_CLASSES[qtype] is tensor_class_for(cfg) and qt.attrs == {"qtype": qtype}
    assert qt.stored is TYPES[qtype]
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


@pytest.mark.parametrize("qtype,k", [(q, 512) for q in GgufConfig.QTYPES] + [("q4_k", 96), ("q6_k", 40)])
def test_state_dict_and_byte_round_trip(qtype, k) -> None:
    qt = encode(_w(2, 3, k, seed=1), GgufConfig(qtype=qtype))
    sd = qt.to_state_dict("blk.experts")
    assert set(sd) == {"blk.experts_blocks"}
    meta = qt.meta()
    assert meta == {"format": f"gguf-{qtype}", "format_version": 1, "shape": [2, 3, k], "qtype": qtype}
    cls = GGUF_CLASSES[qtype]
    assert FORMATS.get(meta["format"]) is cls and cls.check_meta(meta) == ((2, 3, k), {"qtype": qtype})
    back = from_state_dict({n: v.clone() for n, v in sd.items()}, "blk.experts", meta)
    assert type(back) is cls and torch.equal(back.gguf_blocks()[1], qt.gguf_blocks()[1])
    assert torch.equal(back.dequantize(), qt.dequantize())
    # bytes written by anyone -> our class -> the same bytes, and gguf-py's decode of them
    raw = torch.randint(0, 256, qt.data["blocks"].shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    if qt.stored.name == "f16":
        raw[..., 1::2] &= 0x3B  # finite halves only: gguf-py's F16 decode is a plain cast
    theirs = cls((2, 3, k), {"blocks": raw.clone()}, {"qtype": qtype})
    theirs.check_data()
    assert torch.equal(theirs.gguf_blocks()[1], raw)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = gq.dequantize(raw.numpy(), GGMLQuantizationType(theirs.gguf_blocks()[0]))
    got = theirs.dequantize().numpy()
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    assert np.array_equal(got.view(np.int32)[~np.isnan(ref)], ref.view(np.int32)[~np.isnan(ref)])


def test_select_expert() -> None:
    qt = encode(_w(3, 4, 256, seed=3), GgufConfig(qtype="q3_k"))
    for e in range(3):
        one = qt.select(e)
        assert type(one) is type(qt) and one.shape == (4, 256)
        assert torch.equal(one.dequantize(), qt.dequantize()[e])


@pytest.mark.parametrize("qtype,k,want", [("q4_k", 896, "q5_0"), ("q2_k", 896, "q4_0"), ("q3_k", 320, "q4_0"),
                                          ("q5_k", 96, "q5_1"), ("q6_k", 160, "q8_0"), ("q4_k", 40, "f16"),
                                          ("q4_0", 48, "f16")])
def test_fallback_types(qtype, k, want) -> None:
    """The class asked for keeps its name and attributes; its bytes are llama.cpp's fallback type's."""
    cfg = GgufConfig(qtype=qtype)
    qt = encode(_w(3, k, seed=4), cfg)
    assert type(qt) is GGUF_CLASSES[qtype] and qt.attrs == {"qtype": qtype} and qt.stored.name == want
    assert qt.gguf_blocks()[0] == int(GGMLQuantizationType[want.upper()])
    assert qt.bits_per_weight() == BPW[want] == type(qt).expected_bits_per_weight((3, k), cfg)
    qt.check_data()
    assert np.array_equal(qt.dequantize().numpy(), _gguf_decode(qt))


def test_hessian_weights_the_search() -> None:
    """A full Hessian and its diagonal give the same tensor; either changes it from the unweighted one."""
    w = _w(8, 256, seed=5)
    x = _w(512, 256, seed=6) * torch.exp(_w(256, seed=7))
    h = x.T @ x / 512
    cfg = GgufConfig(qtype="q4_k")
    full = encode(w, cfg, hessian=h)
    diag = encode(w, cfg, hessian=torch.diagonal(h))
    plain = encode(w, cfg)
    assert torch.equal(full.gguf_blocks()[1], diag.gguf_blocks()[1])
    assert not torch.equal(full.gguf_blocks()[1], plain.gguf_blocks()[1])


def test_errors() -> None:
    raw = torch.zeros(2, 144, dtype=torch.uint8)
    with pytest.raises(ValueError, match="holds q4_k"):
        GgufQ4KTensor((2, 256), {"blocks": raw}, {"qtype": "q6_k"})
    with pytest.raises(ValueError, match="holds q4_k"):
        GgufQ4KTensor.encode(_w(2, 256), GgufConfig(qtype="q2_k"))
    with pytest.raises(ValueError, match="blocks"):
        check_data(GgufQ4KTensor, (2, 512), {"qtype": "q4_k"}, {"blocks": ((2, 144), torch.uint8)})
    with pytest.raises(ValueError, match="not supported"):
        GgufQ4KTensor.check_meta({"format": "gguf-q4_k", "shape": [2, 256], "qtype": "q7_k"})
    with pytest.raises(ValueError, match="not supported"):
        GgufConfig(qtype="Q4_K")
    with pytest.raises(ValueError, match="search-steps"):
        GgufConfig(search_steps=0)
    with pytest.raises(TypeError, match="GgufConfig"):
        GgufQ4KTensor.encode(_w(2, 256), UniformConfig())
    assert GgufConfig(qtype="q2_k").to_dict() == {"type": "GgufConfig", "version": 1, "qtype": "q2_k",
                                                  "search_steps": 8}
    assert GgufConfig(qtype="q2_k").short_name == "gguf-q2_k"


def test_registered_methods() -> None:
    """``--method q4_k`` etc.: each type is one method whose config, class and column quantizer agree."""
    for qtype in GgufConfig.QTYPES:
        m = METHODS.get(qtype)
        cfg = m.from_flags(lambda name, default: {"gguf_search_steps": 4}.get(name, default))
        assert cfg == GgufConfig(qtype=qtype, search_steps=4) and METHODS.find(cfg) is m
        assert m.formats == (GGUF_CLASSES[qtype],) and FORMATS.get(f"gguf-{qtype}") is GGUF_CLASSES[qtype]
        with pytest.raises(ValueError, match="--bits 7 does not apply"):
            m.from_flags(lambda name, default: 7 if name == "bits" else default)
    assert METHODS.get("q4_k").from_flags(lambda name, default: 4 if name == "bits" else default).qtype == "q4_k"


def test_quantize_cli_end_to_end(capsys, tmp_path) -> None:
    """``moequant quantize --method q4_k`` with LDLQ on a tiny OLMoE (rows of 64: every tensor holds llama.cpp's
    Q5_0 fallback), then ``--method q2_k`` round to nearest (Q4_0): the checkpoint loads, every packed
    tensor (fused experts included) decodes exactly as gguf-py decodes its blocks, and LDLQ's proxy is
    reported."""
    import json

    from conftest import save_toy_olmoe
    from moequant.api import load, packed_modules
    from moequant.cli import main

    d, text = save_toy_olmoe(tmp_path, "tok_model", 2000)
    for method, solver, stored in (("q4_k", "ldlq", "q5_0"), ("q2_k", "rtn", "q4_0")):
        out = tmp_path / method
        rc = main(["-q", "quantize", str(d), "--method", method, "--solver", solver, "--incoherence", "none",
                   "--calib", str(text), "--calib-samples", "4", "--calib-seqlen", "32", "--out", str(out)])
        assert rc == 0, capsys.readouterr().err
        rep = json.loads((out / "report.json").read_text())
        assert rep["solver"]["solver"] == solver and len(rep["quantized_tensors"]) == 12
        if solver == "ldlq":
            assert all(0 < t["proxy"] < 0.05 for t in rep["quantized_tensors"] if t["kind"] != "experts")
        packed = packed_modules(load(out))
        assert len(packed) == 12 and any(len(qt.shape) == 3 for qt in packed.values())
        for qt in packed.values():
            assert type(qt) is GGUF_CLASSES[method] and qt.stored.name == stored
            assert np.array_equal(qt.dequantize().numpy(), _gguf_decode(qt))
