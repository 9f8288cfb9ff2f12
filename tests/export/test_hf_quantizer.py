"""transformers' ``from_pretrained`` on a moequant checkpoint (``export.hf_quantizer``): after ``import moequant``
it builds the packed modules and loads bit for bit what ``moequant.load`` returns, for every architecture;
``save_pretrained`` round-trips; a float model given our config, a missing, extra or corrupted tensor, or a
tensor left on the meta device is a one-line error naming it; lm-eval's ``HFLM(pretrained=run_dir)`` works."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ARCHS, MOE_ARCHS, tiny_config, tiny_model, toy_tok_model, toy_words
from moequant import api
from moequant.alloc.defaults import EMBED_HEAD_CHOICES
from moequant.alloc.recipe import Recipe, Rule
from moequant.codecs.config import LutConfig, UniformConfig
from moequant.errors import MoequantError
from moequant.export.hf_quantizer import MoequantConfig, MoequantHfQuantizer, register
from moequant.formats.checkpoint import ShardReader, write_shards
from moequant.nn.quant_embedding import QuantEmbedding, TiedQuantLinear
from moequant.nn.quant_experts import QuantExperts
from moequant.nn.quant_linear import QuantLinear
from moequant.solvers.config import SolverConfig

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[1, 5, 9, 77, 3, 200, 31, 8, 15, 99, 4, 250]])
INT4 = UniformConfig(bits=4, group_size=32)
RTN4 = Recipe.uniform(INT4)


def _quantized(tmp_path, arch: str, recipe: Recipe = RTN4, dtype: torch.dtype = torch.float32,
               solver: SolverConfig | None = None):
    """(run directory, the float model's logits) of ``arch`` quantized with ``recipe`` and saved."""
    model = tiny_model(arch).to(dtype)
    with torch.no_grad():
        ref = model(IDS).logits
    api.quantize(model, recipe, solver=solver, progress=False)
    return api.save(model, tmp_path / f"{arch}-run"), ref


def _assert_identical(got, want) -> None:
    """Same state (names, dtypes, every bit), same module types, same logits — and not vacuously."""
    a, b = want.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert {n: type(m) for n, m in want.named_modules()} == {n: type(m) for n, m in got.named_modules()}
    assert api.packed_modules(got).keys() == api.packed_modules(want).keys() != set()
    with torch.no_grad():
        assert torch.equal(got(IDS).logits, want(IDS).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_from_pretrained_equals_load_and_save_pretrained_round_trips(arch, tmp_path):
    run, float_logits = _quantized(tmp_path, arch)
    want = api.load(run)
    got = AutoModelForCausalLM.from_pretrained(run)
    _assert_identical(got, want)
    assert isinstance(got.model.layers[1].self_attn.q_proj, QuantLinear)
    if arch in MOE_ARCHS:
        assert isinstance(got.model.layers[1].mlp.experts, QuantExperts)
        assert got.config._experts_implementation == "moequant"
    with torch.no_grad():
        assert not torch.equal(got(IDS).logits, float_logits)  # the packed weights are what computes
    # save_pretrained: the packed tensors under their own names, quantization_config unchanged
    got.save_pretrained(tmp_path / "sp")
    q = json.loads((run / "config.json").read_text())["quantization_config"]
    assert json.loads((tmp_path / "sp" / "config.json").read_text())["quantization_config"] == q
    _assert_identical(AutoModelForCausalLM.from_pretrained(tmp_path / "sp"), want)
    _assert_identical(api.load(tmp_path / "sp"), want)
    # moequant.save of the transformers-loaded model writes the original checkpoint, byte for byte
    api.save(got, tmp_path / "again")
    for name in ("model.safetensors", "model.safetensors.index.json"):
        assert (tmp_path / "again" / name).read_bytes() == (run / name).read_bytes(), name


E8 = EMBED_HEAD_CHOICES["int8"]


@pytest.mark.parametrize("case", ["gemma3_text-tied-packed-embedding", "llama-packed-embedding-and-head",
                                  "olmoe-dense-down-bf16", "qwen3_moe-nf4", "llama-rht"])
def test_other_layouts_and_formats(case, tmp_path):
    arch = case.split("-")[0]
    dtype, solver = torch.float32, None
    if case.endswith(("embedding", "head")):
        recipe = Recipe((Rule("kind:embedding", E8), Rule("kind:head", E8)) + RTN4.rules)
    elif case.endswith("bf16"):
        lay = UniformConfig(bits=3, group_size=32, symmetric=False)
        recipe, dtype = Recipe((Rule(r"re:.*experts\.down_proj", None), Rule("kind:experts", lay),
                                Rule("kind:linear", lay))), torch.bfloat16
    elif case.endswith("nf4"):
        recipe = Recipe.uniform(LutConfig(lut="nf4", block_size=32, double_quant=True, dq_block_size=64))
    else:
        recipe, solver = RTN4, SolverConfig(incoherence="rht")
    run, _ = _quantized(tmp_path, arch, recipe, dtype, solver)
    want = api.load(run)
    got = AutoModelForCausalLM.from_pretrained(run)
    _assert_identical(got, want)
    got.tie_weights()  # what lm-eval calls after loading: the packed pair stays as it is
    _assert_identical(got, want)
    if arch == "gemma3_text":
        assert isinstance(got.model.embed_tokens, QuantEmbedding) and got.model.embed_tokens.embed_scale == 8.0
        assert isinstance(got.lm_head, TiedQuantLinear) and got.lm_head.source is got.model.embed_tokens
    if case.endswith("bf16"):
        ex = got.model.layers[0].mlp.experts
        assert ex.is_packed("gate_up_proj") and ex.down_proj.dtype == torch.bfloat16
        assert got.model.norm.weight.dtype == torch.bfloat16
    got.save_pretrained(tmp_path / "sp")
    _assert_identical(AutoModelForCausalLM.from_pretrained(tmp_path / "sp"), want)


# --- what is refused --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    run, _ = _quantized(tmp_path_factory.mktemp("hfq"), "llama")
    return run


def _rewrite(run, out, drop: str | None = None, add: dict | None = None):
    """A copy of ``run`` whose shards (and digests) are rewritten without ``drop`` / with ``add``."""
    reader = ShardReader(run)
    state = {k: reader.read(k) for k in reader.keys() if k != drop} | (add or {})
    out.mkdir()
    shutil.copy(run / "config.json", out / "config.json")
    write_shards(state, out)
    return out


def test_float_model_given_our_config_is_refused(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "float")
    with pytest.raises(MoequantError, match=r"only loads checkpoints written by moequant .*moequant quantize"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=MoequantConfig())


@pytest.mark.parametrize("drop, message", [
    ("model.norm.weight", r"checkpoint lacks tensors \['model\.norm\.weight'\]"),
    ("model.layers.1.mlp.down_proj.weight_scale",
     r"checkpoint lacks tensor 'model\.layers\.1\.mlp\.down_proj\.weight_scale' of the uniform-packed tensor")])
def test_missing_tensor_is_named(llama_run, tmp_path, drop, message):
    bad = _rewrite(llama_run, tmp_path / "bad", drop=drop)
    with pytest.raises(MoequantError, match=message):
        AutoModelForCausalLM.from_pretrained(bad)


def test_unexpected_and_misshapen_tensors_are_named(llama_run, tmp_path):
    bad = _rewrite(llama_run, tmp_path / "extra", add={"model.layers.0.extra.weight": torch.zeros(4)})
    with pytest.raises(MoequantError, match=r"tensors the model does not have: \['model\.layers\.0\.extra\.weight'\]"):
        AutoModelForCausalLM.from_pretrained(bad)
    bad = _rewrite(llama_run, tmp_path / "shape", add={"model.norm.weight": torch.ones(65)})
    with pytest.raises(MoequantError, match=r"tensor 'model\.norm\.weight' is \[65\], the model expects \[64\]"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_corrupted_tensor_is_named(llama_run, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(llama_run, bad)
    path, info, start = ShardReader(bad).raw_location("model.layers.0.input_layernorm.weight")
    data = bytearray(path.read_bytes())
    data[start + 5] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(MoequantError, match=r"tensor 'model\.layers\.0\.input_layernorm\.weight' is corrupted"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_edited_quantization_config_is_refused(llama_run, tmp_path):
    bad = tmp_path / "edited"
    shutil.copytree(llama_run, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["tensors"]["model.layers.0.mlp.up_proj.weight"]["group_size"] = 64
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoequantError, match=r"quantization_config was changed after it was written"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_tensor_left_on_meta_is_named(llama_run):
    """transformers fills the meta buffers between the two steps; a step that loaded nothing leaves them."""
    config = json.loads((llama_run / "config.json").read_text())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    quantizer = MoequantHfQuantizer(MoequantConfig(**config["quantization_config"]))
    quantizer._process_model_before_weight_loading(model, checkpoint_files=[str(llama_run / "model.safetensors")])
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    assert model.model.layers[0].self_attn.q_proj.weight_codes.is_meta
    with pytest.raises(MoequantError, match=r"left on the meta device after loading: \['model\.embed_tokens\.weight'"):
        quantizer._process_model_after_weight_loading(model)


# --- registration -----------------------------------------------------------------------------------------

def test_import_registers_without_importing_transformers():
    code = ("import sys, moequant\n"
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING as C, AUTO_QUANTIZER_MAPPING as Q\n"
            "assert (C['moequant'].__name__, Q['moequant'].__name__) == ('MoequantConfig', 'MoequantHfQuantizer')\n"
            "assert not [f for f in sys.meta_path if type(f).__module__.startswith('moequant')]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_register_is_idempotent_and_guards_the_name(monkeypatch):
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from moequant.export import hf_hook

    assert AUTO_QUANTIZER_MAPPING["moequant"] is MoequantHfQuantizer  # moequant imported before this test
    register()
    assert AUTO_QUANTIZER_MAPPING["moequant"] is MoequantHfQuantizer
    # transformers' registry already imported: install() registers at once
    monkeypatch.delitem(AUTO_QUANTIZER_MAPPING, "moequant")
    monkeypatch.delitem(AUTO_QUANTIZATION_CONFIG_MAPPING, "moequant")
    hf_hook.install()
    assert (AUTO_QUANTIZATION_CONFIG_MAPPING["moequant"], AUTO_QUANTIZER_MAPPING["moequant"]) == (
        MoequantConfig, MoequantHfQuantizer)
    monkeypatch.setitem(AUTO_QUANTIZER_MAPPING, "moequant", type("Other", (MoequantHfQuantizer,), {}))
    with pytest.raises(MoequantError, match="already has a 'moequant' quantization method"):
        register()


# --- lm-eval ----------------------------------------------------------------------------------------------

def test_lm_eval_hflm_loads_the_run_directory(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tok, model = toy_tok_model("olmoe", toy_words(3000))
    api.quantize(model, RTN4, progress=False)
    run = api.save(model, tmp_path / "run", tokenizer=tok)
    reqs = [Instance("loglikelihood", {}, p, i)
            for i, p in enumerate([("Q: w3 w10 w17\nA:", " w24"), ("Q: w5\nA:", " w12 w19 w26")])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # lm-eval passes the checkpoint's own config back in
        lm = HFLM(pretrained=str(run), batch_size=1, device="cpu", max_length=128)
    assert isinstance(lm.model.model.layers[0].mlp.experts, QuantExperts)
    got = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    ref = HFLM(pretrained=api.load(run), tokenizer=tok, batch_size=1, device="cpu", max_length=128)
    assert got == [ll for ll, _ in ref.loglikelihood(reqs, disable_tqdm=True)]
    assert got[0] != got[1] and all(ll < 0 for ll in got)
