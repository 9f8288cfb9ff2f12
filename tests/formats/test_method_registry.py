"""The method registry: one entry per ``--method`` ties config, CLI flags, column quantizer and packed classes."""

from dataclasses import dataclass

import pytest
import torch

from conftest import sqnr
from moequant.cli import build_parser, main
from moequant.codecs.config import MethodConfig, UniformConfig
from moequant.formats.methods import INT, METHODS, Method, MethodRegistry, column_quantizer, tensor_class_for
from moequant.formats.registry import FORMATS

pytestmark = pytest.mark.usefixtures("one_thread")

# flag values that reach every packed class of every built-in method (trellis at L=10 to keep Viterbi fast)
VARIANTS = {"int": [{}, {"sym": True}], "nf4": [{}, {"double_quant": True}], "fp4": [{}, {"double_quant": True}],
            "trellis": [{"trellis_l": 10}],
            **{q: [{}] for q in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "q5_0", "q5_1", "q8_0", "iq4_nl")}}


def _config(m: Method, flags: dict) -> MethodConfig:
    return m.from_flags(lambda name, default: flags.get(name, default))


def _drive(q, w: torch.Tensor) -> torch.Tensor:
    """Run the column quantizer over ``w [R, K]`` without error feedback; the reconstruction ``[R, K]``."""
    w_hat = torch.empty_like(w)
    for c0 in range(0, w.shape[1], q.block):
        if c0 % q.group == 0:
            q.fit(c0, w[:, c0:c0 + q.group])
        w_hat[:, c0:c0 + q.block] = q.round(c0, w[:, c0:c0 + q.block])
    return w_hat


def test_every_method_has_variants():
    # additive has no column quantizer (its encoder takes the whole Hessian); tests/formats/test_additive_tensor.py
    # checks its flags -> config -> packed class
    assert set(VARIANTS) | {"additive"} == set(METHODS.names()) == {"int", "nf4", "fp4", "trellis", "q2_k", "q3_k",
                                                                    "q4_k", "q5_k", "q6_k", "q4_0", "q5_0", "q5_1",
                                                                    "q8_0", "iq4_nl", "additive"}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_round_trips_to_tensor_class_and_column_quantizer(name):
    m = METHODS.get(name)
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))  # [R, K]
    reached = set()
    for flags in VARIANTS[name]:
        cfg = _config(m, flags)
        assert type(cfg) is m.config_type and METHODS.find(cfg) is m
        cls = tensor_class_for(cfg)
        assert cls in m.formats and FORMATS.get(cls.format_id) is cls
        reached.add(cls)
        q = column_quantizer(cfg, w)
        w_hat = _drive(q, w)
        # the registered column quantizer's parts are exactly what the registered packed class stores
        qt = cls.from_parts(tuple(w.shape), q.parts(), cfg)
        assert type(qt) is cls and torch.equal(qt.dequantize(), w_hat)
        assert sqnr(w, w_hat) > 5.0  # not vacuous: a real reconstruction, not zeros
    assert reached == set(m.formats)


def test_formats_registry_holds_every_method_class():
    for m in METHODS.ordered():
        for cls in m.formats:
            assert FORMATS.get(cls.format_id) is cls


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="'int' is already registered"):
        MethodRegistry([INT, INT])
    twin = Method(name="int-again", config_type=UniformConfig, formats=INT.formats, pick=INT.pick,
                  from_flags=INT.from_flags)
    with pytest.raises(ValueError, match="'int' and 'int-again' claim the same configs"):
        MethodRegistry([INT, twin])


def test_unknown_method_lists_the_known_ones(capsys):
    known = "additive, fp4, int, iq4_nl, nf4, q2_k, q3_k, q4_0, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0, trellis"
    with pytest.raises(KeyError, match=rf"unknown method 'q9_z' \(known: {known}\)"):
        METHODS.get("q9_z")
    with pytest.raises(SystemExit):
        main(["quantize", "x/y", "--method", "q9_z", "--out", "o"])
    err = capsys.readouterr().err
    assert "q9_z" in err and all(repr(n) in err for n in METHODS.names())


def test_unregistered_config_has_no_format_or_column_quantizer():
    @dataclass(frozen=True)
    class Orphan(MethodConfig):
        pass

    with pytest.raises(ValueError, match="no packed format for Orphan"):
        tensor_class_for(Orphan())
    with pytest.raises(ValueError, match="Orphan has no column quantizer"):
        column_quantizer(Orphan(), torch.zeros(4, 4))


def _quantize_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    return sub.choices["quantize"]


def test_cli_method_choices_and_flags_come_from_the_registry():
    actions = {a.dest: a for a in _quantize_parser()._actions}
    assert actions["method"].choices == [m.name for m in METHODS.ordered()]
    assert sorted(actions["method"].choices) == METHODS.names()
    for f in METHODS.flags():
        assert actions[f.dest].option_strings == ["--" + f.dest.replace("_", "-")]
