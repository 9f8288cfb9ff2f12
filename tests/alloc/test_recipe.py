import pytest

from moequant.alloc.recipe import Recipe, Rule
from moequant.codecs.config import LutConfig, UniformConfig


def test_first_match_wins_and_kinds():
    int4 = UniformConfig(bits=4)
    nf4 = LutConfig()
    r = Recipe((Rule("model.layers.0.mlp.experts.down_proj", None),
                Rule(r"re:.*experts\..*", nf4),
                Rule("kind:linear", int4)))
    assert r.match("model.layers.0.mlp.experts.down_proj", "experts") == (None, "model.layers.0.mlp.experts.down_proj")
    assert r.match("model.layers.1.mlp.experts.down_proj", "experts") == (nf4, r"re:.*experts\..*")
    assert r.match("model.layers.1.self_attn.q_proj.weight", "linear") == (int4, "kind:linear")
    assert r.match("model.embed_tokens.weight", "embedding") == (None, None)


def test_default_recipe_protects_router_norm_embed_head():
    r = Recipe.uniform(UniformConfig(bits=3))
    for name in ("model.layers.0.mlp.gate.weight", "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight",
                 "lm_head.weight", "model.layers.0.mlp.shared_expert_gate.weight"):
        assert r.match(name, "linear")[0] is None, name
    assert r.match("model.layers.0.mlp.gate_proj.weight", "linear")[0] == UniformConfig(bits=3)


def test_round_trip_and_errors():
    r = Recipe.uniform(UniformConfig(bits=2, symmetric=False, group_size=64))
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(ValueError, match="bad regex"):
        Recipe((Rule("re:([", None),))
    with pytest.raises(ValueError, match="kind must be"):
        Recipe((Rule("kind:conv", None),))
    with pytest.raises(ValueError, match="--bits 7"):
        UniformConfig(bits=7)
