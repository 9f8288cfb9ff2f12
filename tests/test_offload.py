"""--offload: streaming one decoder layer at a time writes the same tensors, bit for bit, as quantizing
in memory and saving (tied heads, fused experts from per-expert files, Mixtral's on-disk names)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from moequant import api
from moequant.alloc.recipe import Recipe
from moequant.codecs.config import UniformConfig
from moequant.formats.checkpoint import ShardReader
from moequant.offload import quantize_offloaded
from moequant.solvers.config import SolverConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _tensors(path):
    r = ShardReader(path)
    return {k: r.get(k) for k in r.keys()}


def _qcfg(path):
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    return {k: q[k] for k in ("tensors", "tied", "recipe")}


def assert_same_checkpoint(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert _qcfg(a) == _qcfg(b)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "olmoe", "mixtral", "qwen2_moe"])
def test_offload_rtn_bit_identical(arch, tmp_path):
    model = tiny_model(arch)
    if arch == "llama":
        model.config.tie_word_embeddings = True
        model.tie_weights()
    src = tmp_path / "src"
    model.save_pretrained(src)
    recipe = Recipe.uniform(UniformConfig(bits=3, group_size=32))
    ref = tmp_path / "ref"
    mem = type(model).from_pretrained(src).eval()
    api.quantize(mem, recipe, progress=False)
    api.save(mem, ref)
    off = tmp_path / "off"
    quantize_offloaded(src, off, recipe, None, SolverConfig(), progress=False)
    assert_same_checkpoint(ref, off)
    if arch == "llama":
        assert _qcfg(off)["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    x = torch.randint(3, 256, (1, 12))
    torch.testing.assert_close(api.load(off)(x).logits, api.load(ref)(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "olmoe", "gemma3_text"])
def test_offload_ldlq_rht_bit_identical(arch, tmp_path):
    """Calibrated LDLQ + RHT: the streamed runner (embedding rows read from disk, activations in files)
    gives the same checkpoint as the in-memory runner."""
    from moequant.layerwise import Calibration

    model = tiny_model(arch)
    src = tmp_path / "src"
    model.save_pretrained(src)
    recipe = Recipe.uniform(UniformConfig(bits=2, group_size=32, symmetric=False))
    solver = SolverConfig(solver="ldlq", incoherence="rht")
    tokens = torch.randint(3, 256, (6, 16), generator=torch.Generator().manual_seed(0))
    ref = tmp_path / "ref"
    mem = type(model).from_pretrained(src).eval()
    api.quantize(mem, recipe, Calibration(tokens, batch_size=4), solver=solver, progress=False)
    api.save(mem, ref)
    off = tmp_path / "off"
    rep = quantize_offloaded(src, off, recipe, Calibration(tokens, batch_size=4), solver, progress=False)
    assert_same_checkpoint(ref, off)
    assert [t.proxy for t in rep.quantized] == [t.proxy for t in mem.moequant_report.quantized]


@pytest.mark.parametrize("tie", [True, False])
def test_offload_stores_q8_0_tables_exactly_as_in_memory(tie, tmp_path):
    """A kept table on Q8_0's grid is stored packed by both paths, the same bytes and the same ``exact`` entry."""
    from nn.test_exact_head import q8_0_table

    model = tiny_model("llama")
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(q8_0_table(*model.model.embed_tokens.weight.shape, seed=1))
        if not tie:
            model.lm_head.weight.copy_(q8_0_table(*model.lm_head.weight.shape, seed=2))
    src = tmp_path / "src"
    model.save_pretrained(src)
    recipe = Recipe.uniform(UniformConfig(bits=4, group_size=32))
    mem = type(model).from_pretrained(src).eval()
    api.quantize(mem, recipe, progress=False)
    api.save(mem, tmp_path / "ref")
    rep = quantize_offloaded(src, tmp_path / "off", recipe, None, SolverConfig(), progress=False)
    assert_same_checkpoint(tmp_path / "ref", tmp_path / "off")
    exact = json.loads((tmp_path / "off" / "config.json").read_text())["quantization_config"]["exact"]
    want = ["model.embed_tokens.weight"] if tie else ["lm_head.weight", "model.embed_tokens.weight"]
    assert exact == want and sorted(t.name for t in rep.exact) == want
    assert [t.name for t in rep.exact] == [t.name for t in mem.moequant_report.exact]
