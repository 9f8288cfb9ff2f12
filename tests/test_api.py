import copy
import json

import pytest
import torch

from conftest import ARCHS, MOE_ARCHS, tiny_model
from moequant import api
from moequant.alloc.recipe import Recipe, Rule
from moequant.codecs.config import LutConfig, UniformConfig
from moequant.errors import MoequantError
from moequant.nn.quant_experts import QuantExperts
from moequant.nn.quant_linear import QuantLinear
from moequant.runs import model_sizes

IDS = torch.tensor([[1, 5, 9, 77, 3, 200, 31, 8, 15, 99, 4, 250]])


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_save_load_is_bit_exact(arch, tmp_path):
    model = tiny_model(arch)
    with torch.no_grad():
        ref_logits = model(IDS).logits
    api.quantize(model, Recipe.uniform(UniformConfig(bits=4, group_size=32)), progress=False)
    with torch.no_grad():
        q_logits = model(IDS).logits
    # quantization changed the model, but not beyond int4 noise
    assert 0 < (q_logits - ref_logits).abs().max() < 0.5 * ref_logits.abs().max()
    api.save(model, tmp_path / "ckpt")
    loaded = api.load(tmp_path / "ckpt")
    with torch.no_grad():
        l_logits = loaded(IDS).logits
    assert torch.equal(l_logits, q_logits)
    a, b = api.packed_modules(model), api.packed_modules(loaded)
    assert a.keys() == b.keys()
    for k in a:
        for d in a[k].data:
            assert torch.equal(a[k].data[d], b[k].data[d]), (k, d)
    if arch in MOE_ARCHS:
        assert isinstance(loaded.model.layers[1].mlp.experts, QuantExperts)
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, QuantLinear)
    # no full-precision copy: resident bytes within 5% of packed + kept
    sizes = model_sizes(loaded)
    assert sizes["resident_over_ideal"] <= 1.05


def test_report_lists_every_expert_and_kept_tensor(tmp_path):
    model = tiny_model("qwen2_moe")
    api.quantize(model, Recipe.uniform(LutConfig(lut="nf4", block_size=32)), progress=False)
    rep = model.moequant_report
    q = {t.name for t in rep.quantized}
    assert {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")} <= q
    kept = {t.name: t.rule for t in rep.kept}
    assert kept["model.layers.0.mlp.shared_expert_gate.weight"].startswith("re:")
    assert rep.bits_per_weight() == pytest.approx(4 + 16 / 32)


def test_partial_experts_recipe_keeps_down_proj_dense(tmp_path):
    model = tiny_model("olmoe")
    cfg = UniformConfig(bits=2, symmetric=False, group_size=32)
    recipe = Recipe((Rule(r"re:.*experts\.down_proj", None), Rule("kind:experts", cfg), Rule("kind:linear", cfg)))
    api.quantize(model, recipe, progress=False)
    ex = model.model.layers[0].mlp.experts
    assert ex.is_packed("gate_up_proj") and not ex.is_packed("down_proj")
    with torch.no_grad():
        before = model(IDS).logits
    api.save(model, tmp_path / "c")
    loaded = api.load(tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, before)


def test_unstorable_config_names_the_tensor():
    # int groups may be partial now; an NF4 block must still divide K (64 here): refused before any work
    from moequant.codecs.config import LutConfig

    model = tiny_model("llama")
    with pytest.raises(MoequantError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight .*block size 48"):
        api.quantize(model, Recipe.uniform(LutConfig(block_size=48)), progress=False)


def test_save_refuses_existing_dir_and_leaves_nothing_behind(tmp_path, monkeypatch):
    model = tiny_model("llama")
    api.quantize(model, Recipe.uniform(UniformConfig(bits=4, group_size=32)), progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(MoequantError, match="already exists"):
        api.save(model, tmp_path / "exists")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("moequant.checkpoint_io.write_shards", boom)
    with pytest.raises(RuntimeError):
        api.save(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_config_json_carries_formats_and_recipe(tmp_path):
    model = tiny_model("mixtral")
    api.quantize(model, Recipe.uniform(UniformConfig(bits=3, group_size=64)), progress=False)
    api.save(model, tmp_path / "c")
    q = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "moequant" and q["format_version"] == 1
    meta = q["tensors"]["model.layers.1.mlp.experts.down_proj"]
    assert meta["shape"] == [4, 64, 64] and meta["bits"] == 3 and meta["format"]
    assert q["recipe"]["rules"][-1]["config"]["type"] == "UniformConfig"


def _logit_err(q, ref, x):
    with torch.no_grad():
        return float((q(x).logits - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.mark.parametrize("arch", ["llama", "olmoe"])
def test_ldlq_and_rht_beat_rtn_and_round_trip(arch, tmp_path):
    from moequant.layerwise import Calibration
    from moequant.solvers.config import SolverConfig

    torch.manual_seed(0)
    base = tiny_model(arch).eval()
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(3, 256, (16, 32), generator=gen)
    x = torch.randint(3, 256, (4, 32), generator=gen)
    with torch.no_grad():
        ref = base(x).logits
    recipe = Recipe.uniform(UniformConfig(bits=2, group_size=32, symmetric=False))
    errs = {}
    for name, solver in {"rtn": SolverConfig(), "ldlq": SolverConfig(solver="ldlq"),
                         "rht": SolverConfig(solver="ldlq", incoherence="rht")}.items():
        m = copy.deepcopy(base)
        api.quantize(m, recipe, None if name == "rtn" else Calibration(calib), solver=solver, progress=False)
        errs[name] = _logit_err(m, ref, x)
        if name == "rht":
            out = api.save(m, tmp_path / "rht")
            loaded = api.load(out)
            with torch.no_grad():
                torch.testing.assert_close(loaded(x).logits, m(x).logits, rtol=0, atol=0)
            meta = json.loads((out / "config.json").read_text())["quantization_config"]["tensors"]
            assert {v["format"] for v in meta.values()} == {"rht"}
    assert errs["ldlq"] < 0.9 * errs["rtn"] and errs["rht"] < 0.9 * errs["rtn"], errs


def test_ldlq_without_calibration_is_an_error():
    from moequant.solvers.config import SolverConfig

    with pytest.raises(MoequantError, match="needs calibration"):
        api.quantize(tiny_model("llama"), Recipe.uniform(UniformConfig(bits=4, group_size=32)),
                     solver=SolverConfig(solver="ldlq"), progress=False)
