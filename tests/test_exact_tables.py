"""Kept embedding / head tables whose values lie exactly on Q8_0's grid are stored packed, every value unchanged
(``embed_head.with_exact_grids``): the checkpoint shrinks, the weights and the logits do not move, the report,
``inspect``, the exports and fine-tuning all treat them as kept."""

import json

import pytest
import torch
from conftest import tiny_model
from nn.test_exact_head import q8_0_table
from safetensors.torch import load_file

from moequant import api
from moequant.alloc.recipe import Recipe, Rule
from moequant.codecs.config import UniformConfig
from moequant.errors import MoequantError
from moequant.export.compressed_tensors import CtExportConfig, export
from moequant.formats.checkpoint import read_quantization_config
from moequant.nn.quant_embedding import QuantEmbedding, TiedQuantLinear
from moequant.nn.quant_linear import QuantLinear
from moequant.runs import run_inspect

INT4 = UniformConfig(bits=4, group_size=32, symmetric=False)
KEEP_TABLES = (Rule("kind:embedding", None), Rule("kind:head", None))


def _model(tie: bool, embed_on_grid: bool, head_on_grid: bool):
    model = tiny_model("llama")
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    with torch.no_grad():
        if embed_on_grid:
            model.model.embed_tokens.weight.copy_(q8_0_table(*model.model.embed_tokens.weight.shape, seed=1))
        if head_on_grid and not tie:
            model.lm_head.weight.copy_(q8_0_table(*model.lm_head.weight.shape, seed=2))
    return model


def _quantized(tie, embed_on_grid, head_on_grid, keep_rules=()):
    model = _model(tie, embed_on_grid, head_on_grid)
    tables = {"embed": model.model.embed_tokens.weight.detach().clone(), "head": model.lm_head.weight.detach().clone()}
    recipe = Recipe(tuple(keep_rules) + Recipe.uniform(INT4).rules)
    api.quantize(model, recipe, progress=False)
    return model, tables


def test_a_tied_q8_0_table_is_stored_packed_with_every_value_unchanged(tmp_path):
    packed, tables = _quantized(True, True, False)
    kept, _ = _quantized(True, True, False, KEEP_TABLES)
    assert isinstance(packed.model.embed_tokens, QuantEmbedding) and isinstance(packed.lm_head, TiedQuantLinear)
    assert torch.equal(packed.model.embed_tokens.qweight.dequantize(torch.float32), tables["embed"])  # bit for bit
    assert type(kept.model.embed_tokens) is torch.nn.Embedding  # a rule naming the table keeps it in float32
    rep, rep_kept = packed.moequant_report, kept.moequant_report
    assert [t.name for t in rep.exact] == ["model.embed_tokens.weight"] and rep.exact[0].shared_with == ["lm_head.weight"]
    assert rep.exact[0].bits_per_weight == 8.5 and rep_kept.exact == []
    assert rep.bits_per_weight() == rep_kept.bits_per_weight()  # not counted as quantized
    assert "model.embed_tokens.weight" not in {k.name for k in rep.kept_tensors}
    api.save(packed, tmp_path / "p")
    api.save(kept, tmp_path / "k")
    assert read_quantization_config(tmp_path / "p")["exact"] == ["model.embed_tokens.weight"]
    assert "exact" not in read_quantization_config(tmp_path / "k")
    size = {d: sum(f.stat().st_size for f in (tmp_path / d).glob("*.safetensors")) for d in "pk"}
    v, h = tables["embed"].shape
    assert rep.exact[0].nbytes == v * h + v * h // 32 * 2  # int8 codes + one fp16 scale per 32
    saved = size["k"] - size["p"]  # the tensors' bytes, less a few header bytes for the two data names
    assert v * h * 4 - rep.exact[0].nbytes - 256 <= saved <= v * h * 4 - rep.exact[0].nbytes
    ids = torch.randint(0, v, (2, 7))
    a, b = api.load(tmp_path / "p"), api.load(tmp_path / "k")
    assert a.moequant_exact == ("model.embed_tokens.weight",) and b.moequant_exact == ()
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert torch.allclose(la, lb, rtol=0, atol=1e-5 * float(lb.abs().max()))
    info = run_inspect(tmp_path / "p", [])
    assert [t["name"] for t in info["exact_tensors"]] == ["model.embed_tokens.weight"]
    assert info["bits_per_weight"] == pytest.approx(run_inspect(tmp_path / "k", [])["bits_per_weight"], abs=0)


def test_an_untied_q8_0_head_is_packed_and_a_random_embedding_stays_float():
    model, tables = _quantized(False, False, True)
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    assert isinstance(model.lm_head, QuantLinear)
    assert torch.equal(model.lm_head.qweight.dequantize(torch.float32), tables["head"])
    assert [t.name for t in model.moequant_report.exact] == ["lm_head.weight"]


def test_a_q5_0_embedding_is_packed_at_5_bits_and_loads_back(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(q8_0_table(*model.model.embed_tokens.weight.shape, 4, qtype="Q5_0"))
    table = model.model.embed_tokens.weight.detach().clone()
    api.quantize(model, Recipe.uniform(INT4), progress=False)
    (rec,) = model.moequant_report.exact
    assert rec.name == "model.embed_tokens.weight" and rec.method == "int5-g32" and rec.bits_per_weight == 5.5
    api.save(model, tmp_path / "run")
    back = api.load(tmp_path / "run")
    assert torch.equal(back.model.embed_tokens.qweight.dequantize(torch.float32), table)
    ids = torch.randint(0, table.shape[0], (1, 9))
    with torch.no_grad():
        assert torch.equal(back.model.embed_tokens(ids), table[ids])


def test_tables_off_the_grid_are_kept_in_float32():
    model, tables = _quantized(False, False, False)
    assert type(model.model.embed_tokens) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    assert model.moequant_report.exact == [] and model.moequant_exact == ()
    one_ulp = _model(True, True, False)
    with torch.no_grad():
        w = one_ulp.model.embed_tokens.weight
        w[5, 3] = torch.nextafter(w[5, 3], torch.tensor(1.0))  # one value off the grid: the table stays float
    api.quantize(one_ulp, Recipe.uniform(INT4), progress=False)
    assert type(one_ulp.model.embed_tokens) is torch.nn.Embedding


def test_a_tied_table_kept_by_name_on_one_side_stays_float():
    model, _ = _quantized(True, True, False, (Rule("kind:head", None),))
    assert type(model.model.embed_tokens) is torch.nn.Embedding and model.moequant_report.exact == []


def test_exact_names_must_be_packed_tensors(tmp_path):
    model, _ = _quantized(True, True, False)
    api.save(model, tmp_path / "run")
    cfg_path = tmp_path / "run" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["exact"] = ["model.norm.weight"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(MoequantError, match="quantization_config.exact"):
        read_quantization_config(tmp_path / "run", verify=False)


def test_compressed_tensors_export_writes_the_kept_values(tmp_path):
    model, tables = _quantized(False, True, True)
    api.save(model, tmp_path / "run")
    export(CtExportConfig(run=str(tmp_path / "run"), out=str(tmp_path / "ct")))
    written = {}
    for f in (tmp_path / "ct").glob("*.safetensors"):
        written.update(load_file(f))
    assert torch.equal(written["model.embed_tokens.weight"], tables["embed"])
    assert torch.equal(written["lm_head.weight"], tables["head"])
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert "lm_head" in qc["ignore"]


def test_fine_tuning_leaves_an_exact_head_alone():
    from moequant.finetune.trainable import open_tensors

    model, _ = _quantized(False, False, True)
    names = set(open_tensors(model, "kd"))
    assert "lm_head.weight" not in names and "model.layers.0.self_attn.q_proj.weight" in names
