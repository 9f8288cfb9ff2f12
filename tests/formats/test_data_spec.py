"""``data_spec`` of every format equals what ``encode`` stores (shapes and dtypes, awkward shapes and
experts included), and ``check_meta`` accepts every ``meta()`` and rejects bad metadata."""

from __future__ import annotations


import pytest
import torch

from moequant.codecs.hadamard import Incoherence

from moequant.codecs.config import LutConfig, TrellisConfig, UniformConfig
from moequant.formats.base import check_data
from moequant.formats.registry import FORMATS, encode
from moequant.formats.rotated import RotatedTensor

CONFIGS = {
    "int4-sym-g32": UniformConfig(bits=4, group_size=32, symmetric=True),
    "int3-asym-g32-partial": UniformConfig(bits=3, group_size=32, symmetric=False),  # K=80: 3 groups, last of 16
    "int2-asym-row": UniformConfig(bits=2, group_size=-1, symmetric=False),
    "int5-sym-bf16": UniformConfig(bits=5, group_size=16, scale_dtype="bfloat16"),
    "nf4": LutConfig(lut="nf4", block_size=16),
    "fp4-dq": LutConfig(lut="fp4", block_size=16, double_quant=True, dq_block_size=7),
    "trellis-1mad": TrellisConfig(bits=2, L=8, V=1, tile=16, code="1mad"),
    "trellis-hyb": TrellisConfig(bits=2, L=8, V=2, tile=16, code="hyb", Q=4),
}


def _weight(cfg, experts: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    k = 80 if isinstance(cfg, (UniformConfig, LutConfig)) else 64
    shape = (32, k) if not experts else (experts, 32, k)
    return torch.randn(*shape, generator=g)


def _found(qt) -> dict:
    return {n: (tuple(t.shape), t.dtype) for n, t in qt.data.items()}


@pytest.mark.parametrize("experts", [0, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_data_spec_is_what_encode_stores(name, experts, one_thread):
    qt = encode(_weight(CONFIGS[name], experts), CONFIGS[name])
    cls = type(qt)
    shape, attrs = cls.check_meta(qt.meta())
    assert shape == qt.shape
    spec = cls.data_spec(shape, attrs)
    assert spec == _found(qt)
    qt.check_data()


def test_uniform_spec_partial_last_group():
    cls = FORMATS.get("uniform-asym-packed")
    spec = cls.data_spec((2, 7, 80), {"bits": 3, "group_size": 32, "symmetric": False, "scale_dtype": "float16"})
    assert spec == {"codes": ((2, 7, 30), torch.uint8), "scale": ((2, 7, 3), torch.float16),
                    "zero": ((2, 7, 3), torch.uint8)}
    spec = cls.data_spec((7, 80), {"bits": 4, "group_size": -1, "symmetric": False, "scale_dtype": "float32"})
    assert spec == {"codes": ((7, 40), torch.uint8), "scale": ((7, 1), torch.float32), "zero": ((7, 1), torch.uint8)}


def test_rotated_transform_rule_by_version():
    """Version 1 (no ``transform``) is the Paley rule; from version 2 the rule must be written; an unknown
    one is refused; a v1 tensor re-saved says ``paley``; the decode follows the recorded rule."""
    cfg = CONFIGS["int3-asym-g32-partial"]
    w = _weight(cfg, 0)  # [32, 80]
    for rule in ("paley", "hartley"):
        inc = Incoherence.make(tuple(w.shape), seed=1, rule=rule)
        rt = RotatedTensor.wrap(encode(inc.weight(w), cfg), inc)
        meta = rt.meta()
        assert meta["format_version"] == 2 and meta["transform"] == rule
        shape, attrs = RotatedTensor.check_meta(meta)
        back = RotatedTensor(shape, dict(rt.data), attrs)
        assert back.transform == rule and torch.equal(back.dequantize(), rt.dequantize())
        assert back.incoherence().rule == rule
    v1 = {k: v for k, v in meta.items() if k != "transform"} | {"format_version": 1}
    shape, attrs = RotatedTensor.check_meta(v1)
    old = RotatedTensor(shape, dict(rt.data), attrs)
    assert old.transform == "paley" and old.meta()["transform"] == "paley" and old.meta()["format_version"] == 2
    assert (old.dequantize() - rt.dequantize()).abs().max() > 1e-3  # the rule matters for 80 = 16·5
    with pytest.raises(ValueError, match="missing attributes \\['transform'\\]"):
        RotatedTensor.check_meta({k: v for k, v in meta.items() if k != "transform"})
    with pytest.raises(ValueError, match="'walsh'"):
        RotatedTensor.check_meta(meta | {"transform": "walsh"})
    with pytest.raises(ValueError, match="version 1 has no 'transform'"):
        RotatedTensor.check_meta(meta | {"format_version": 1})


def test_rotated_spec_includes_the_inner_format():
    inner = encode(_weight(CONFIGS["int3-asym-g32-partial"], 0), CONFIGS["int3-asym-g32-partial"])
    signs = Incoherence(sign_in=torch.where(torch.arange(80) % 3 == 0, -1.0, 1.0),
                        sign_out=torch.where(torch.arange(32) % 2 == 0, -1.0, 1.0), rule="hartley")
    rt = RotatedTensor.wrap(inner, signs)
    shape, attrs = RotatedTensor.check_meta(rt.meta())
    spec = RotatedTensor.data_spec(shape, attrs)
    assert spec == _found(rt)
    assert spec["sign_in"] == ((10,), torch.uint8) and spec["sign_out"] == ((4,), torch.uint8)
    assert spec["inner_zero"] == ((32, 3), torch.uint8)
    bad = rt.meta()
    bad["inner"]["shape"] = [32, 64]
    with pytest.raises(ValueError, match=r"inner shape \[32, 64\] is not the tensor's shape \[32, 80\]"):
        RotatedTensor.data_spec(*RotatedTensor.check_meta(bad))
    bad["inner"] = {"format": "rht", "format_version": 1, "shape": [32, 80], "inner": {}}
    with pytest.raises(ValueError, match="a rotated tensor cannot wrap another rotated tensor"):
        RotatedTensor.check_meta(bad)


@pytest.mark.parametrize("edit,needle", [
    ({"shape": [-32, 80]}, "shape [-32, 80] is not a list of at least 2 positive ints"),
    ({"shape": [0, 80]}, "shape [0, 80] is not a list"),
    ({"shape": [32.0, 80]}, "shape [32.0, 80] is not a list"),
    ({"shape": [True, 80]}, "shape [True, 80] is not a list"),
    ({"shape": "32x80"}, "shape '32x80' is not a list"),
    ({"bits": True}, "attribute bits=True is not a int"),
    ({"bits": 9}, "--bits 9 is not supported"),
    ({"group_size": -2}, "--group-size must be positive or -1"),
    ({"scale_dtype": "float8"}, "scale_dtype must be float16, bfloat16 or float32"),
    ({"format_version": 0}, "format_version 0 is not supported"),
    ({"format_version": "2"}, "format_version '2' is not supported"),
    ({"format": "lut4-packed"}, "format 'lut4-packed' is not 'uniform-asym-packed'"),
])
def test_check_meta_rejects_bad_metadata(edit, needle):
    qt = encode(_weight(CONFIGS["int3-asym-g32-partial"], 0), CONFIGS["int3-asym-g32-partial"])
    meta = {**qt.meta(), **edit}
    with pytest.raises(ValueError) as e:
        type(qt).check_meta(meta)
    assert needle in str(e.value)


def test_check_meta_needs_every_config_attribute():
    meta = encode(_weight(CONFIGS["nf4"], 0), CONFIGS["nf4"]).meta()
    del meta["block_size"]
    with pytest.raises(ValueError, match=r"missing attributes \['block_size'\]"):
        FORMATS.get("lut4-packed").check_meta(meta)
    meta = encode(_weight(CONFIGS["nf4"], 0), CONFIGS["nf4"]).meta()
    with pytest.raises(ValueError, match="block size 16 does not divide the input dim K=72"):
        FORMATS.get("lut4-packed").data_spec((32, 72), FORMATS.get("lut4-packed").check_meta(meta)[1])


def test_check_data_names_expected_and_found():
    cls = FORMATS.get("trellis-packed")
    shape, attrs = cls.check_meta(encode(_weight(CONFIGS["trellis-1mad"], 0), CONFIGS["trellis-1mad"]).meta())
    spec = cls.data_spec(shape, attrs)
    found = {**spec, "scale": ((32,), torch.float32)}
    with pytest.raises(ValueError) as e:
        check_data(cls, shape, attrs, found)
    assert str(e.value) == ("data tensor 'scale' is [32] torch.float32, the metadata implies [32] torch.float16")
