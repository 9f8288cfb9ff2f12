"""Kept tables whose values are a source GGUF's K-quant blocks are stored in those blocks (``moequant.exact_gguf``):
found bit for bit or not at all, the logits unchanged (up to the GGUF kernel's summation order), the checkpoint
smaller; the head multiplied from its blocks, or decoded once where the kernel is missing."""

import numpy as np
import pytest
import torch
from conftest import tiny_config

from moequant import api
from moequant.alloc.recipe import Recipe, Rule
from moequant.codecs.config import GgufConfig, UniformConfig
from moequant.exact_gguf import exact_gguf_table, source_gguf
from moequant.formats.kquant import GGUF_CLASSES
from moequant.nn.quant_embedding import QuantEmbedding
from moequant.nn.quant_linear import QuantLinear

INT4 = UniformConfig(bits=4, group_size=32, symmetric=False)
V, K = 96, 256  # K-quant blocks need rows of 256


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """The GGUF kernel's product: the same values as the float head, fp32 sums in another order."""
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def _blocks(qtype: str, n: int, k: int, seed: int):
    """A K-quant tensor of random weights: (its GGUF bytes [n, row bytes] as numpy, its decoded float32 values)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    qt = GGUF_CLASSES[qtype].encode(w, GgufConfig(qtype=qtype))
    return qt.data["blocks"].numpy(), qt.dequantize(torch.float32)


def _write_gguf(path, tables):
    """A GGUF file holding ``tables`` {name: (qtype, bytes)} (only what exact_gguf_table reads)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for name, (qtype, raw) in tables.items():
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[qtype.upper()])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_table_is_found_bit_for_bit_or_not_at_all(tmp_path):
    raw6, head = _blocks("q6_k", V, K, 1)
    raw4, emb = _blocks("q4_k", V, K, 2)
    path = _write_gguf(tmp_path / "m.gguf", {"output.weight": ("q6_k", raw6), "token_embd.weight": ("q4_k", raw4)})
    qt = exact_gguf_table(head, path, "head")
    assert qt.format_id == "gguf-q6_k" and qt.bits_per_weight() == 6.5625
    assert torch.equal(qt.dequantize(torch.float32), head) and bytes(qt.data["blocks"].numpy()) == bytes(raw6)
    assert exact_gguf_table(emb, path, "embedding").format_id == "gguf-q4_k"
    off = head.clone()
    off[V - 1, K - 1] = torch.nextafter(off[V - 1, K - 1], torch.tensor(1e9))  # one value one ulp away
    assert exact_gguf_table(off, path, "head") is None
    assert exact_gguf_table(head, path, "embedding") is None  # token_embd holds other values
    assert exact_gguf_table(head[:, :128].contiguous(), path, "head") is None  # another shape
    assert exact_gguf_table(head.double(), path, "head") is None  # not float32
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    assert exact_gguf_table(head, bad, "head") is None


def test_source_gguf_of_a_spec(tmp_path, monkeypatch):
    from moequant.models.loader import ResolvedModel
    from moequant.zoo.models import GGUF_MODELS

    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path / "cache"))
    assert source_gguf(ResolvedModel("/x/m.gguf", "gguf", "/x", "m.gguf")).as_posix() == "/x/m.gguf"
    assert source_gguf(ResolvedModel("/some/dir", "dir", "/some/dir")) is None
    assert source_gguf(ResolvedModel("tiny-olmoe", "alias", "/cache/tiny-olmoe")) is None  # trained here, no GGUF
    spec = GGUF_MODELS["qwen2.5-coder-1.5b"]
    entry = tmp_path / "cache" / "models" / spec.alias
    (entry / "hf").mkdir(parents=True)
    hf = str(entry / "hf")
    assert source_gguf(ResolvedModel(spec.alias, "alias", hf)) is None  # the GGUF is not in the cache
    (entry / spec.gguf_name).write_bytes(b"")
    assert source_gguf(ResolvedModel(spec.alias, "alias", hf)) == entry / spec.gguf_name
    assert source_gguf(ResolvedModel(hf, "dir", hf)) == entry / spec.gguf_name  # the alias's directory by path
    assert source_gguf(ResolvedModel(str(entry), "dir", str(entry))) is None


def _model_with_gguf_tables(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size = K, V, 128
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    raw6, head = _blocks("q6_k", V, K, 1)
    raw4, emb = _blocks("q4_k", V, K, 2)
    with torch.no_grad():
        model.lm_head.weight.copy_(head)
        model.model.embed_tokens.weight.copy_(emb)
    path = _write_gguf(tmp_path / "src.gguf", {"output.weight": ("q6_k", raw6), "token_embd.weight": ("q4_k", raw4)})
    return model, path


def test_quantize_stores_the_source_blocks_and_the_logits_do_not_move(tmp_path):
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    recipe = Recipe.uniform(INT4)
    model, path = _model_with_gguf_tables(tmp_path)
    (tmp_path / "c").mkdir()
    control, _ = _model_with_gguf_tables(tmp_path / "c")
    api.quantize(model, recipe, progress=False, source_gguf=path)
    api.quantize(control, recipe, progress=False)  # the same layers, the tables kept in float32
    rep = model.moequant_report
    assert {t.name: t.method for t in rep.exact} == {"model.embed_tokens.weight": "gguf-q4_k",
                                                     "lm_head.weight": "gguf-q6_k"}
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    assert not model.lm_head.keep_decoded and control.moequant_report.exact == []  # the kernel multiplies it
    with torch.no_grad():
        want = control(input_ids=ids).logits
        _close(model(input_ids=ids).logits, want)  # the same table values
    api.save(model, tmp_path / "p")
    api.save(control, tmp_path / "k")
    size = {d: sum(f.stat().st_size for f in (tmp_path / d).glob("*.safetensors")) for d in ("p", "k")}
    tables_f32 = 2 * V * K * 4
    assert size["k"] - size["p"] == pytest.approx(tables_f32 - V * K * (6.5625 + 4.5) / 8, abs=4096)
    loaded = api.load(tmp_path / "p")
    assert isinstance(loaded.lm_head, QuantLinear) and not loaded.lm_head.keep_decoded
    assert loaded.lm_head.qweight.format_id == "gguf-q6_k"
    with torch.no_grad():
        _close(loaded(input_ids=ids).logits, want)


def test_without_the_kernel_the_head_is_decoded_once_and_multiplied_as_the_float_head(tmp_path, monkeypatch):
    from moequant.kernels import gguf as gguf_kernels

    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    model, path = _model_with_gguf_tables(tmp_path)
    (tmp_path / "c").mkdir()
    control, _ = _model_with_gguf_tables(tmp_path / "c")
    monkeypatch.setattr(gguf_kernels, "extension", lambda: None)  # a machine without a C++ compiler
    api.quantize(model, Recipe.uniform(INT4), progress=False, source_gguf=path)
    api.quantize(control, Recipe.uniform(INT4), progress=False)
    assert model.lm_head.keep_decoded
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, control(input_ids=ids).logits)  # bit for bit
    api.save(model, tmp_path / "p")
    assert api.load(tmp_path / "p").lm_head.keep_decoded


def test_a_rule_naming_the_table_keeps_it_in_float(tmp_path):
    model, path = _model_with_gguf_tables(tmp_path)
    recipe = Recipe((Rule("kind:head", None),) + Recipe.uniform(INT4).rules)
    api.quantize(model, recipe, progress=False, source_gguf=path)
    assert [t.name for t in model.moequant_report.exact] == ["model.embed_tokens.weight"]
    assert type(model.lm_head) is torch.nn.Linear


def test_the_decoded_cache_and_the_kernel_give_the_float_heads_product(tmp_path):
    from moequant.kernels.select import kernels

    raw6, head = _blocks("q6_k", V, K, 1)
    qt = exact_gguf_table(head, _write_gguf(tmp_path / "m.gguf", {"output.weight": ("q6_k", raw6)}), "head")
    blocks, decoded = QuantLinear(qt), QuantLinear(qt)
    decoded.keep_decoded = True
    x = torch.randn(3, K)
    assert torch.equal(decoded(x), torch.nn.functional.linear(x, head))
    _close(blocks(x), decoded(x))
    with kernels("reference"):
        assert torch.equal(blocks(x), decoded(x))  # decode, then the same F.linear
    decoded.to(torch.float32)  # _apply drops the view and its decoded copy; it is rebuilt on the next call
    assert torch.equal(decoded(x), torch.nn.functional.linear(x, head))
    assert np.array_equal(decoded.qweight.data["blocks"].numpy(), raw6)


def test_offload_stores_the_source_blocks_as_in_memory(tmp_path):
    from test_offload import assert_same_checkpoint

    from moequant.offload import quantize_offloaded
    from moequant.solvers.config import SolverConfig

    model, path = _model_with_gguf_tables(tmp_path)
    src = tmp_path / "src"
    model.save_pretrained(src)
    recipe = Recipe.uniform(INT4)
    mem = type(model).from_pretrained(src).eval()
    api.quantize(mem, recipe, progress=False, source_gguf=path)
    api.save(mem, tmp_path / "ref")
    rep = quantize_offloaded(src, tmp_path / "off", recipe, None, SolverConfig(), progress=False, source_gguf=path)
    assert_same_checkpoint(tmp_path / "ref", tmp_path / "off")
    assert sorted(t.method for t in rep.exact) == ["gguf-q4_k", "gguf-q6_k"]


def test_a_tied_k_quant_table_serves_both_sides(tmp_path):
    from transformers import AutoModelForCausalLM

    from moequant.nn.quant_embedding import TiedQuantLinear

    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.tie_word_embeddings = K, V, 128, True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    raw6, table = _blocks("q6_k", V, K, 5)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(table)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = _write_gguf(tmp_path / "tied.gguf", {"token_embd.weight": ("q6_k", raw6)})  # no output.weight: tied
    ids = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before_head = model.lm_head(model.model.norm(torch.randn(1, 3, K, generator=torch.Generator().manual_seed(6))))
    api.quantize(model, Recipe.uniform(INT4), progress=False, source_gguf=path)
    assert [(t.name, t.method, t.shared_with) for t in model.moequant_report.exact] == [
        ("model.embed_tokens.weight", "gguf-q6_k", ["lm_head.weight"])]
    assert isinstance(model.lm_head, TiedQuantLinear) and not model.lm_head.keep_decoded
    with torch.no_grad():
        h = model.model.norm(torch.randn(1, 3, K, generator=torch.Generator().manual_seed(6)))
        _close(model.lm_head(h), before_head)  # the same table
        want = model(input_ids=ids).logits
    api.save(model, tmp_path / "t")
    loaded = api.load(tmp_path / "t")
    assert isinstance(loaded.lm_head, TiedQuantLinear) and not loaded.lm_head.keep_decoded
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want)  # the same blocks, the same kernel
