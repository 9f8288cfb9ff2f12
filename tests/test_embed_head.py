"""Embeddings and head quantized on request (``--embeddings`` / ``--head``, ``kind:embedding`` /
``kind:head`` rules): a tied pair is one packed tensor in memory and on disk, the checkpoint round trip is
bit-exact, the whole-model bits/weight is an exact count, resume stays byte-identical, and every nonsense
combination is a one-line error."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import toy_lines, toy_words
from moequant import api
from moequant.alloc.defaults import EMBED_HEAD_CHOICES
from moequant.alloc.recipe import Recipe, Rule
from moequant.cli import main
from moequant.codecs.config import LutConfig, UniformConfig
from moequant.embed_head import plan_embed_head
from moequant.errors import MoequantError
from moequant.kernels.select import reference_kernels
from moequant.nn.quant_embedding import QuantEmbedding, TiedQuantLinear
from moequant.nn.quant_linear import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")

INT8, INT4 = EMBED_HEAD_CHOICES["int8"], EMBED_HEAD_CHOICES["int4"]
LAYERS = UniformConfig(bits=4, group_size=32, symmetric=False)  # what --bits 4 --group-size 32 gives
Q4 = ["--bits", "4", "--group-size", "32", "--solver", "rtn"]


def _llama(tied: bool, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=320, max_position_embeddings=128, bos_token_id=0,
                         eos_token_id=1, pad_token_id=2, tie_word_embeddings=tied)
    return tf.LlamaForCausalLM(cfg).eval()


def _recipe(embed, head) -> Recipe:
    rules = [Rule(p, c) for p, c in (("kind:embedding", embed), ("kind:head", head)) if c is not None]
    return Recipe(tuple(rules) + Recipe.uniform(LAYERS).rules)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Tiny tied and untied Llamas with a tiny BPE tokenizer, and the text it was trained on."""
    from moequant.zoo.tiny_olmoe import train_tokenizer

    root = tmp_path_factory.mktemp("eh")
    text = toy_lines(toy_words(3000))
    (root / "text.txt").write_text(text)
    tok = train_tokenizer([text], 320)
    for tied in (True, False):
        d = root / ("tied" if tied else "untied")
        _llama(tied).save_pretrained(d)
        tok.save_pretrained(d)
    return root


def _dense_reference(orig, packed):
    """``orig`` with every weight ``packed`` holds packed replaced by its decoded values."""
    ref = copy.deepcopy(orig)
    for name, mod in packed.named_modules():
        if isinstance(mod, QuantEmbedding):
            ref.get_submodule(name).weight.data = mod.qweight.dequantize()
        elif isinstance(mod, QuantLinear) and not isinstance(mod, TiedQuantLinear):
            ref.get_submodule(name).weight.data = mod.dequantized_weight()
    return ref


# --- in memory and on disk ---------------------------------------------------------------------------------

def test_tied_pair_is_one_packed_tensor(tmp_path):
    orig = _llama(tied=True)
    model = copy.deepcopy(orig)
    api.quantize(model, _recipe(INT8, INT8), progress=False)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, TiedQuantLinear) and head.source is emb
    assert all(a is b for a, b in zip(head.qweight.data.values(), emb.qweight.data.values()))
    rec = [t for t in model.moequant_report.quantized if t.kind in ("embedding", "head")]
    assert [(t.name, t.method, t.shared_with, t.solver) for t in rec] == [
        ("model.embed_tokens.weight", "int8-g64", ["lm_head.weight"], "rtn")]
    # the packed model computes what the dense model with the decoded weights computes
    ids = torch.randint(0, 320, (2, 24))
    ref = _dense_reference(orig, model)
    assert ref.lm_head.weight is ref.model.embed_tokens.weight  # still tied: the head sees the decoded table
    with torch.no_grad(), reference_kernels():
        got, want = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # stored once: the head is a name in quantization_config.tied, not a tensor
    out = api.save(model, tmp_path / "q")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.embed_tokens.weight_codes", "model.embed_tokens.weight_scale"} <= keys
    assert not any(k.startswith("lm_head") for k in keys) and "model.embed_tokens.weight" not in keys
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert q["tensors"]["model.embed_tokens.weight"]["format"] == "uniform-packed" and "lm_head.weight" not in q["tensors"]
    # loaded packed, bit for bit
    loaded = api.load(out)
    lemb, lhead = loaded.model.embed_tokens, loaded.lm_head
    assert isinstance(lemb, QuantEmbedding) and isinstance(lhead, TiedQuantLinear) and lhead.source is lemb
    for d, t in emb.qweight.data.items():
        assert torch.equal(lemb.qweight.data[d], t)
    assert lemb.out_dtype == torch.float32
    with torch.no_grad(), reference_kernels():
        assert torch.equal(loaded(ids).logits, got)
    # the loaded checkpoint saved again: the same tensors, bytes and tied map
    api.save(loaded, tmp_path / "q2")
    assert json.loads((tmp_path / "q2" / "config.json").read_text())["quantization_config"]["tied"] == q["tied"]
    for name in ("model.safetensors", "model.safetensors.index.json"):
        assert (tmp_path / "q2" / name).read_bytes() == (out / name).read_bytes(), name


def test_untied_pair_is_quantized_each_on_its_own(tmp_path):
    orig = _llama(tied=False)
    model = copy.deepcopy(orig)
    api.quantize(model, _recipe(INT4, INT8), progress=False)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert type(model.lm_head) is QuantLinear
    assert model.model.embed_tokens.qweight.format_id == "uniform-asym-packed"
    assert model.lm_head.qweight.format_id == "uniform-packed"
    names = [t.name for t in model.moequant_report.quantized]
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"  # before and after the layers
    ids = torch.randint(0, 320, (1, 20))
    with torch.no_grad(), reference_kernels():
        torch.testing.assert_close(model(ids).logits, _dense_reference(orig, model)(ids).logits, rtol=1e-5, atol=1e-5)
    out = api.save(model, tmp_path / "q")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["tied"] == {}
    loaded = api.load(out)
    assert type(loaded.lm_head) is QuantLinear
    with torch.no_grad(), reference_kernels():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_whole_model_bits_per_weight_is_a_hand_count(tmp_path):
    model = _llama(tied=True)
    api.quantize(model, _recipe(INT8, INT8), progress=False)
    from moequant.runs import model_sizes

    # int4 asym g32 rows: K codes at 4 bits + K/32 fp16 scales + K/32 4-bit zeros padded to whole bytes
    row64, row128 = 64 * 4 + 2 * 16 + 8, 128 * 4 + 4 * 16 + 16
    layer_bits = (64 + 32 + 32 + 64 + 128 + 128) * row64 + 64 * row128  # q k v o gate up | down
    embed_bits = 320 * (64 * 8 + 16)  # int8 sym g64: 64 codes + one fp16 scale per row, tied head: none
    norm_bits = (2 * 2 + 1) * 64 * 32  # fp32
    weights = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64) + 320 * 64 + 5 * 64
    sizes = model_sizes(model)
    assert sizes["model_bit_count"] == {"packed_weights": weights - 320, "packed_bits": 2 * layer_bits + embed_bits,
                                        "dense_weights": 320, "dense_bits": norm_bits,
                                        "bits_per_weight": (2 * layer_bits + embed_bits + norm_bits) / weights}
    assert sizes["bits_per_weight_model"] == 520192 / 94528
    # the same count from the checkpoint, and the default (fp32 table) for comparison
    assert model_sizes(api.load(api.save(model, tmp_path / "q")))["bits_per_weight_model"] == 520192 / 94528
    plain = _llama(tied=True)
    api.quantize(plain, Recipe.uniform(LAYERS), progress=False)
    assert model_sizes(plain)["bits_per_weight_model"] == (2 * layer_bits + 320 * 64 * 32 + norm_bits) / weights


# --- the recipe: opt-in only, and what is refused ----------------------------------------------------------

def test_off_by_default_and_regex_rules_do_not_reach_them():
    model = _llama(tied=False)
    for recipe in (Recipe.uniform(LAYERS), Recipe((Rule("re:.*", LAYERS),))):
        plan = plan_embed_head(model, recipe)
        assert plan.embedding.name == "model.embed_tokens.weight" and plan.head.name == "lm_head.weight"
        assert not plan.tied and plan.embed_config is None and plan.head_config is None
    # an exact name opts in; a keep regex before a kind: rule still keeps (first match wins)
    plan = plan_embed_head(model, Recipe((Rule("lm_head.weight", INT8), Rule("re:.*embed.*", None),
                                          Rule("kind:embedding", INT4))))
    assert plan.head_config == INT8 and plan.embed_config is None and plan.embed_rule == "re:.*embed.*"
    with pytest.raises(ValueError, match="kind must be"):
        Recipe((Rule("kind:embeddings", INT8),))


@pytest.mark.parametrize("embed,head,says", [
    (INT4, None, "embeddings quantized int4a-g32-clip (rule 'kind:embedding') but head kept (rule "),
    (None, INT8, "embeddings kept (rule 're:.*embed_tokens.*') but head quantized int8-g64 (rule 'kind:head')"),
    (INT4, INT8, "embeddings quantized int4a-g32-clip (rule 'kind:embedding') but head quantized int8-g64"),
])
def test_tied_pair_needs_one_method(embed, head, says):
    model = _llama(tied=True)
    with pytest.raises(MoequantError) as e:
        api.quantize(model, _recipe(embed, head), progress=False)
    msg = str(e.value)
    assert msg.startswith("model.embed_tokens.weight and lm_head.weight are one tied tensor (tie_word_embeddings)")
    assert says in msg and "quantize them alike (--embeddings X --head X" in msg
    assert type(model.model.embed_tokens) is torch.nn.Embedding  # refused before anything changed


def test_embeddings_need_a_row_decodable_format():
    model = _llama(tied=False)
    with pytest.raises(MoequantError, match=r"model.embed_tokens.weight \(320, 64\) \(rule 'kind:embedding'\): "
                                            r"format 'lut4-dq-packed' cannot be decoded row by row"):
        plan_embed_head(model, _recipe(LutConfig(lut="nf4", double_quant=True), None))
    plan = plan_embed_head(model, _recipe(None, LutConfig(lut="nf4", double_quant=True)))  # any format for a head
    assert plan.head_config is not None


def test_head_rule_without_a_head_is_a_warning(caplog, monkeypatch):
    model = _llama(tied=False)
    monkeypatch.setattr(type(model), "get_output_embeddings", lambda self: None)
    with caplog.at_level(logging.WARNING, logger="moequant.embed_head"):
        plan = plan_embed_head(model, _recipe(None, INT8))
    assert plan.head is None and plan.head_config is None
    assert "the model has no output head (nn.Linear lm_head): rule kind:head ignored" in caplog.messages


# --- command line ------------------------------------------------------------------------------------------

def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["-q", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_end_to_end_with_eval(capsys, tmp_path, dirs):
    out = tmp_path / "q"
    rc, stdout, err = _cli(capsys, "quantize", str(dirs / "tied"), "--out", str(out), "--embeddings", "int8",
                           "--head", "int8", *Q4)
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["rules"][:2] == [{"match": "kind:embedding", "config": INT8.to_dict()},
                                          {"match": "kind:head", "config": INT8.to_dict()}]
    assert rep["bits_per_weight_model"] == 520192 / 94528  # the hand count above: same model shapes
    assert rep["model_bit_count"]["dense_weights"] == 320
    emb = [t for t in rep["quantized_tensors"] if t["kind"] == "embedding"]
    assert emb[0]["shared_with"] == ["lm_head.weight"] and emb[0]["bits_per_weight"] == 8.25
    assert "lm_head.weight" not in {k["name"] for k in rep["kept_tensors"]}
    assert f"bits/weight (whole model):       {520192 / 94528:.4f}" in stdout
    rc, _, err = _cli(capsys, "eval", "ppl", str(out), "--data", str(dirs / "text.txt"), "--seqlen", "32",
                      "--max-tokens", "256", "--json", str(tmp_path / "p.json"))
    assert rc == 0, err
    assert 1 < json.loads((tmp_path / "p.json").read_text())["ppl"] < 1000
    rc, stdout, err = _cli(capsys, "inspect", str(out))
    assert rc == 0, err
    assert "model.embed_tokens.weight" in stdout and "uniform-packed" in stdout


def test_cli_ldlq_calibrates_on_the_packed_table(capsys, tmp_path, dirs):
    rc, _, err = _cli(capsys, "quantize", str(dirs / "untied"), "--out", str(tmp_path / "q"), "--embeddings", "int4",
                      "--head", "int6", "--bits", "3", "--group-size", "32", "--solver", "ldlq", "--calib",
                      str(dirs / "text.txt"), "--calib-samples", "4", "--calib-seqlen", "16")
    assert rc == 0, err
    rep = json.loads((tmp_path / "q" / "report.json").read_text())
    kinds = {t["kind"]: t for t in rep["quantized_tensors"]}
    assert kinds["embedding"]["method"] == "int4a-g32-clip" and kinds["head"]["method"] == "int6-g64-clip"
    assert kinds["embedding"]["solver"] == kinds["head"]["solver"] == "rtn" and kinds["linear"]["solver"] != "rtn"


@pytest.mark.parametrize("flags,msg", [
    (["--embeddings", "int4"], "are one tied tensor (tie_word_embeddings): embeddings quantized int4a-g32-clip"),
    (["--head", "int8", "--embeddings", "int4"], "but head quantized int8-g64 (rule 'kind:head')"),
    (["--embeddings", "int8", "--head", "int8", "--offload"],
     "--offload copies the embeddings and the head unchanged; quantizing them"),
])
def test_cli_errors(capsys, tmp_path, dirs, flags, msg):
    out = tmp_path / "q"
    rc, _, err = _cli(capsys, "quantize", str(dirs / "tied"), "--out", str(out), *flags, *Q4)
    lines = [ln for ln in err.splitlines() if ln.startswith("moequant: error:")]
    assert rc == 2 and len(lines) == 1 and msg in lines[0] and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no work directory left


def test_cli_recipe_with_flags_and_recipe_file_equivalent(capsys, tmp_path, dirs):
    f = tmp_path / "r.json"
    f.write_text(json.dumps(_recipe(INT8, INT8).to_dict()))
    rc, _, err = _cli(capsys, "quantize", str(dirs / "tied"), "--out", str(tmp_path / "x"), "--recipe", str(f),
                      "--head", "int8")
    assert rc == 2 and "--recipe sets every method option; drop --head (write kind:embedding / kind:head rules" in err
    rc, _, err = _cli(capsys, "quantize", str(dirs / "tied"), "--out", str(tmp_path / "a"), "--recipe", str(f),
                      "--solver", "rtn")
    assert rc == 0, err
    rc, _, err = _cli(capsys, "quantize", str(dirs / "tied"), "--out", str(tmp_path / "b"), "--embeddings", "int8",
                      "--head", "int8", *Q4)
    assert rc == 0, err
    for name in ("model.safetensors", "model.safetensors.index.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_corrupted_table_is_a_digest_error(capsys, tmp_path, dirs):
    out = tmp_path / "q"
    assert _cli(capsys, "quantize", str(dirs / "tied"), "--out", str(out), "--embeddings", "int8", "--head", "int8",
                *Q4)[0] == 0
    from moequant.formats.checkpoint import ShardReader

    path, _, start = ShardReader(out).raw_location("model.embed_tokens.weight_codes")
    raw = bytearray(path.read_bytes())
    raw[start + 5] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(MoequantError, match="tensor 'model.embed_tokens.weight_codes' is corrupted"):
        api.load(out)


# --- resume ------------------------------------------------------------------------------------------------

class _Killed(BaseException):
    pass


def _quantize(model: Path, out: Path, *flags: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["-q", "quantize", str(model), "--out", str(out), *flags])
    return rc, err.getvalue()


@pytest.mark.parametrize("solver", ["rtn", "ldlq"])
def test_resume_is_byte_identical(tmp_path, dirs, monkeypatch, solver):
    from moequant.resume import RunProgress

    flags = ["--embeddings", "int8", "--head", "int8", "--bits", "4", "--group-size", "32", "--solver", solver]
    if solver == "ldlq":
        flags += ["--calib", str(dirs / "text.txt"), "--calib-samples", "4", "--calib-seqlen", "16"]
    rc, err = _quantize(dirs / "tied", tmp_path / "ref", *flags)
    assert rc == 0, err
    orig = RunProgress.commit

    def commit(self, layer, *a, **k):
        orig(self, layer, *a, **k)
        if layer == 0:
            raise _Killed

    with monkeypatch.context() as m:
        m.setattr(RunProgress, "commit", commit)
        with pytest.raises(_Killed):
            _quantize(dirs / "tied", tmp_path / "q", *flags)
    rc, err = _quantize(dirs / "tied", tmp_path / "q", *flags, "--resume")
    assert rc == 0, err
    for p in sorted((tmp_path / "ref").iterdir()):
        if p.name != "report.json":
            assert (tmp_path / "q" / p.name).read_bytes() == p.read_bytes(), p.name
    rep = json.loads((tmp_path / "q" / "report.json").read_text())
    assert rep["quantized_tensors"][0]["name"] == "model.embed_tokens.weight"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "ref"]


def test_killed_after_the_rename_resume_writes_the_whole_report(tmp_path, dirs, monkeypatch):
    from moequant import runs

    flags = ["--embeddings", "int4", "--head", "int8", *Q4]
    rc, err = _quantize(dirs / "untied", tmp_path / "ref", *flags)
    assert rc == 0, err
    with monkeypatch.context() as m:
        def stop(*a, **k):
            raise _Killed
        m.setattr(runs, "quantize_result", stop)
        with pytest.raises(_Killed):
            _quantize(dirs / "untied", tmp_path / "q", *flags)
    rc, err = _quantize(dirs / "untied", tmp_path / "q", *flags, "--resume")
    assert rc == 0, err
    got, want = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("q", "ref"))
    assert got["completed_by_resume"] is True
    strip = lambda ts: [{k: v for k, v in t.items() if k != "seconds"} for t in ts]  # noqa: E731
    assert strip(got["quantized_tensors"]) == strip(want["quantized_tensors"])
    assert got["bits_per_weight"] == want["bits_per_weight"]
    assert got["bits_per_weight_model"] == want["bits_per_weight_model"]


def test_gemma_scaled_embeddings_keep_their_scale(tmp_path):
    from conftest import tiny_model

    orig = tiny_model("gemma3_text")  # tied, embeddings scaled by sqrt(hidden)
    assert orig.config.tie_word_embeddings
    model = copy.deepcopy(orig)
    api.quantize(model, _recipe(INT8, INT8), progress=False)
    emb = model.model.embed_tokens
    assert float(emb.embed_scale) == pytest.approx(64 ** 0.5) and isinstance(model.lm_head, TiedQuantLinear)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad(), reference_kernels():
        got = model(ids).logits
        torch.testing.assert_close(got, _dense_reference(orig, model)(ids).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(api.load(api.save(model, tmp_path / "q"))(ids).logits, got)
