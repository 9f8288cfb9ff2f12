"""Every expected failure is one line on stderr, ``moequant: error: …`` naming the file, tensor or
option, exit 2, no traceback; ``-v`` re-raises it to show the traceback; an unexpected exception is a
bug and keeps its traceback (the CLI no longer turns every ValueError/KeyError into a message)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_toy_olmoe
from moequant.cli import main
from moequant.errors import MoequantError

pytestmark = pytest.mark.usefixtures("one_thread")

Q4 = ["--bits", "4", "--group-size", "32", "--solver", "rtn"]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny OLMoE directory with its tokenizer, a text file of its vocabulary)."""
    return save_toy_olmoe(tmp_path_factory.mktemp("cli_errors"), "good", 1500)


def fails(capsys, argv: list[str], expected: str | None = None, *parts: str) -> str:
    """Run the CLI in-process; assert exit 2 and exactly one error line, the last one on stderr, equal to
    ``expected`` (or, when None, containing every one of ``parts``) and no traceback. -> that line."""
    rc = main(["-q", *argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert sum(ln.startswith("moequant: error:") for ln in lines) == 1 and lines[-1].startswith("moequant: error:")
    line = lines[-1]
    if expected is not None:
        assert line == "moequant: error: " + expected
    for p in parts:
        assert p in line, (p, line)
    return line


def _copy(good_dir: Path, tmp_path: Path, name: str = "m") -> Path:
    d = tmp_path / name
    shutil.copytree(good_dir, d)
    return d


def _edit_weights(d: Path, fn) -> None:
    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


# --- config.json --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("[1, 2]", "{f}: expected a JSON object, found a list"),
    ('"llama"', "{f}: expected a JSON object, found a str"),
    ("{nope", "{f}: not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ("", "{f}: not valid JSON (Expecting value: line 1 column 1 (char 0))"),
    ('{"hidden_size": 64}', "{f}: no 'model_type' (cannot tell the architecture)"),
    ('{"model_type": "foobar"}', "{f}: unsupported architecture model_type='foobar' (not known to transformers {v})"),
])
def test_bad_config_json(capsys, tmp_path, good, text, expected):
    import transformers

    d = _copy(good[0], tmp_path)
    (d / "config.json").write_text(text)
    want = expected.format(f=d / "config.json", v=transformers.__version__)
    fails(capsys, ["quantize", str(d), "--out", str(tmp_path / "o")], want)
    fails(capsys, ["eval", "ppl", str(d), "--data", str(good[1])], want)
    assert not (tmp_path / "o").exists()


def test_non_utf8_config_json(capsys, tmp_path, good):
    d = _copy(good[0], tmp_path)
    (d / "config.json").write_bytes(b'{"model_type": "caf\xe9"}')
    fails(capsys, ["quantize", str(d), "--out", str(tmp_path / "o")], None, f"{d / 'config.json'}: not valid JSON",
          "0xe9")


def test_unsupported_architecture(capsys, tmp_path):
    import transformers as tf

    tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "g")
    fails(capsys, ["quantize", str(tmp_path / "g"), "--out", str(tmp_path / "o")],
          "unsupported architecture 'gpt2' (supported: gemma, gemma2, gemma3_text, llama, mistral, mixtral, olmoe, "
          "qwen2, qwen2_moe, qwen3, qwen3_moe)")


# --- weights of an HF directory ----------------------------------------------------------------------

def test_missing_weight_is_refused_not_randomly_initialised(capsys, tmp_path, good):
    d = _copy(good[0], tmp_path)
    _edit_weights(d, lambda sd: sd.pop("model.layers.0.self_attn.q_proj.weight"))
    want = f"{d}: has no tensor for model.layers.0.self_attn.q_proj.weight"
    fails(capsys, ["quantize", str(d), "--out", str(tmp_path / "o")], want)
    fails(capsys, ["eval", "ppl", str(d), "--data", str(good[1])], want)


def test_unexpected_and_misshapen_weights(capsys, tmp_path, good):
    d = _copy(good[0], tmp_path, "extra")
    _edit_weights(d, lambda sd: sd.__setitem__("model.bogus.weight", torch.zeros(3)))
    fails(capsys, ["quantize", str(d), "--out", str(tmp_path / "o")],
          f"{d}: holds tensors the model does not have: model.bogus.weight")
    d = _copy(good[0], tmp_path, "shape")
    _edit_weights(d, lambda sd: sd.__setitem__("model.layers.1.self_attn.o_proj.weight", torch.zeros(3, 5)))
    fails(capsys, ["quantize", str(d), "--out", str(tmp_path / "o")],
          f"{d}: holds tensors of the wrong shape: model.layers.1.self_attn.o_proj.weight")


def test_truncated_safetensors_of_an_hf_directory(capsys, tmp_path, good):
    d = _copy(good[0], tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])  # header whole, data cut
    fails(capsys, ["quantize", str(d), "--out", str(tmp_path / "o")],
          f"could not load model from {d}: SafetensorError: Error while deserializing header: incomplete metadata, "
          "file not fully covered")


# --- GGUF ------------------------------------------------------------------------------------------------

def _gguf_header(n_tensors: int = 1, n_kv: int = 1) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


@pytest.mark.parametrize("data, why", [
    (b"", "ValueError: cannot mmap an empty file"),
    (b"\x00" * 64, "does not start with the GGUF magic bytes"),
    (_gguf_header(), "error: unpack_from requires a buffer"),  # the header promises a key/value it lacks
    (_gguf_header()[:10], ""),  # truncated inside the header
])
def test_unreadable_gguf(capsys, tmp_path, data, why):
    f = tmp_path / "model.gguf"
    f.write_bytes(data)
    line = fails(capsys, ["quantize", str(f), "--out", str(tmp_path / "o")], None,
                 f"{f}: not a readable GGUF model (", why)
    assert line.endswith(")")


# --- hub ------------------------------------------------------------------------------------------------

def test_hub_id_offline(capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: no retries here
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    fails(capsys, ["quantize", "someorg/some-model", "--out", str(tmp_path / "o")], None,
          "could not load 'someorg/some-model' from the Hugging Face hub:", "offline?")


# --- recipes and options ------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe, why", [
    ([1], 'a recipe is a JSON object {"rules": [...]}, not a list'),
    ({}, "a recipe needs 'rules': a non-empty list of {\"match\": ..., \"config\": ...}"),
    ({"rules": [], "extra": 1}, "unknown recipe keys ['extra'] (a recipe has only 'rules')"),
    ({"rules": ["kind:linear"]}, "recipe rule 0 is a str, not an object with 'match' and 'config'"),
    ({"rules": [{"config": None}]}, "recipe rule 0 has no 'match'"),
    ({"rules": [{"match": "kind:linear", "cfg": None}]}, "recipe rule 0 ('kind:linear'): unknown keys ['cfg']"),
    ({"rules": [{"match": "kind:linear", "config": 4}]}, "recipe rule 0 ('kind:linear'): 'config' must be an "
                                                          "object or null"),
    ({"rules": [{"match": "kind:linear", "config": {"type": "UniformConfig", "bits": "4"}}]},
     "recipe rule 0 ('kind:linear'): UniformConfig.bits must be int, got '4'"),
    ({"rules": [{"match": "kind:linear", "config": {"type": "UniformConfig", "bits": 7}}]},
     "recipe rule 0 ('kind:linear'): --bits 7 is not supported by the int codec (choose from (2, 3, 4, 5, 6, 8))"),
    ({"rules": [{"match": "kind:linear", "config": {"type": "NoSuch"}}]},
     "recipe rule 0 ('kind:linear'): unknown method config type 'NoSuch' (known: ['AdditiveConfig', 'GgufConfig', "
     "'LutConfig', 'TrellisConfig', 'UniformConfig'])"),
    ({"rules": [{"match": "re:(", "config": None}]},
     "recipe rule 're:(': bad regex (missing ), unterminated subpattern at position 0)"),
    ({"rules": [{"match": "kind:conv", "config": None}]},
     "recipe rule 'kind:conv': kind must be 'linear', 'experts', 'embedding' or 'head'"),
])
def test_bad_recipe_file(capsys, tmp_path, good, recipe, why):
    f = tmp_path / "recipe.json"
    f.write_text(json.dumps(recipe))
    fails(capsys, ["quantize", str(good[0]), "--recipe", str(f), "--out", str(tmp_path / "o")], f"--recipe {f}: {why}")
    assert not (tmp_path / "o").exists()


def test_bad_keep_pattern_and_min_expert_tokens(capsys, tmp_path, good):
    o = str(tmp_path / "o")
    fails(capsys, ["quantize", str(good[0]), "--keep", "re:(", "--out", o],
          "--keep: recipe rule 're:(': bad regex (missing ), unterminated subpattern at position 0)")
    fails(capsys, ["quantize", str(good[0]), "--solver", "ldlq", "--calib", str(good[1]), "--min-expert-tokens", "-1",
                   "--out", o], "--min-expert-tokens must be >= 0, got -1")


def _no_model_load(monkeypatch):
    """Make any model load fail loudly: the tests using it prove an error comes before any work."""
    import moequant.models.loader as loader

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the option was checked")

    monkeypatch.setattr(loader, "load_model", boom)


@pytest.mark.parametrize("opt, value, why", [
    ("--seqlen", "0", "eval ppl: seqlen must be >= 1, got 0"),
    ("--stride", "0", "eval ppl: stride must be in [1, seqlen=512], got 0"),
    ("--batch-size", "0", "eval ppl: batch_size must be >= 1, got 0"),
    ("--max-tokens", "0", "eval ppl: max_tokens must be >= 1 or None, got 0"),
])
def test_eval_ppl_options_checked_before_loading(capsys, monkeypatch, good, opt, value, why):
    _no_model_load(monkeypatch)
    fails(capsys, ["eval", "ppl", str(good[0]), "--data", str(good[1]), opt, value], why)


@pytest.mark.parametrize("cmd", ["ppl", "inspect"])
def test_json_into_an_unwritable_place_fails_before_any_work(capsys, monkeypatch, tmp_path, good, cmd):
    _no_model_load(monkeypatch)
    import moequant.runs as runs

    monkeypatch.setattr(runs, "run_inspect", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work done")))
    (tmp_path / "afile").write_text("x")
    argv = ["eval", "ppl", str(good[0]), "--data", str(good[1])] if cmd == "ppl" else ["inspect", str(good[0])]
    fails(capsys, argv + ["--json", str(tmp_path / "afile" / "r.json")],
          f"--json {tmp_path / 'afile' / 'r.json'}: {tmp_path / 'afile'} is not a directory")
    fails(capsys, argv + ["--json", str(tmp_path)], f"--json {tmp_path}: is a directory, expected a file name")
    assert (tmp_path / "afile").read_text() == "x"


# --- text data -----------------------------------------------------------------------------------------

def test_non_utf8_text_names_file_and_offset(capsys, tmp_path, good):
    f = tmp_path / "latin1.txt"
    head = good[1].read_bytes()[:1234]
    f.write_bytes(head + b"caf\xe9 " + good[1].read_bytes())
    want = (f"{f}: not UTF-8 text (byte 0xe9 at offset {1234 + 3}: invalid continuation byte); convert it, "
            "e.g. iconv -f latin1 -t utf-8")
    fails(capsys, ["eval", "ppl", str(good[0]), "--data", str(f)], want)
    fails(capsys, ["quantize", str(good[0]), "--solver", "ldlq", "--calib", str(f), "--out", str(tmp_path / "o")] + Q4,
          want)
    assert not (tmp_path / "o").exists()


def test_empty_text_file(capsys, tmp_path, good):
    (tmp_path / "empty.txt").write_text("")
    fails(capsys, ["eval", "ppl", str(good[0]), "--data", str(tmp_path / "empty.txt")],
          f"--data {tmp_path / 'empty.txt'} (test): 0 tokens, nothing to score")


# --- adapters: a renamed experts/router path never leaves experts unquantized silently -------------------

@pytest.mark.parametrize("field, value, why", [
    ("experts", "mlp.expertz", "olmoe: decoder layer model.layers.0 has no module 'mlp.expertz' (the olmoe adapter "
                               "expects its experts there); refusing to quantize with experts missing"),
    ("router", "mlp.router", "olmoe: decoder layer model.layers.0 has no module 'mlp.router' (the olmoe adapter "
                             "expects its router there); refusing to quantize with experts missing"),
    ("expert_params", ("gate_up_proj", "w2"), "olmoe: model.layers.0.mlp.experts.w2 is not a fused [E, N, K] expert "
                                              "tensor (NoneType); this transformers version lays the experts out "
                                              "differently than moequant's adapter expects"),
])
def test_renamed_adapter_path_is_an_error(capsys, monkeypatch, tmp_path, good, field, value, why):
    import dataclasses

    from moequant.models import adapters

    monkeypatch.setitem(adapters.ADAPTERS, "olmoe", dataclasses.replace(adapters.ADAPTERS["olmoe"], **{field: value}))
    fails(capsys, ["quantize", str(good[0]), "--out", str(tmp_path / "o")] + Q4, why)


def test_dense_layers_of_qwen_moe_are_allowed():
    """Qwen3-MoE ``mlp_only_layers``: a layer with a dense MLP has neither experts nor router."""
    import transformers as tf

    from moequant.models.adapters import adapter_for, iter_targets

    cfg = tf.Qwen3MoeConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=256, intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                            num_experts_per_tok=2, head_dim=16, mlp_only_layers=[1])
    model = tf.AutoModelForCausalLM.from_config(cfg)
    kinds = [(t.layer, t.kind, t.name.rsplit(".", 2)[-2]) for t in iter_targets(model, adapter_for(model))]
    assert (0, "experts", "experts") in kinds and (1, "linear", "gate_proj") in kinds
    assert not any(layer == 1 and kind == "experts" for layer, kind, _ in kinds)


# --- cases owned elsewhere, checked here at the CLI --------------------------------------------------------

def test_corrupted_checkpoint_and_out_under_a_file(capsys, tmp_path, good):
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(good[0]), "--out", str(out)] + Q4) == 0
    capsys.readouterr()
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0xFF  # a byte of the last tensor's data
    shard.write_bytes(bytes(data))
    fails(capsys, ["inspect", str(out)], None, str(out))
    fails(capsys, ["eval", "ppl", str(out), "--data", str(good[1])], None, str(out))
    (tmp_path / "afile").write_text("x")
    fails(capsys, ["quantize", str(good[0]), "--out", str(tmp_path / "afile" / "q")] + Q4, None, "--out",
          str(tmp_path / "afile"))


# --- -v and bugs ---------------------------------------------------------------------------------------

def test_verbose_reraises_the_error(tmp_path, good):
    d = tmp_path / "m"
    shutil.copytree(good[0], d)
    (d / "config.json").write_text("[1]")
    with pytest.raises(MoequantError, match="expected a JSON object, found a list"):
        main(["-q", "-v", "quantize", str(d), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("exc", [ValueError("bug"), KeyError("bug"), RuntimeError("bug")])
def test_an_unexpected_exception_is_not_turned_into_a_message(monkeypatch, tmp_path, exc):
    """The blanket ``except (ValueError, KeyError)`` is gone: a bug keeps its traceback."""
    import moequant.runs as runs

    def bug(*a, **k):
        raise exc

    monkeypatch.setattr(runs, "run_inspect", bug)
    with pytest.raises(type(exc)):
        main(["-q", "inspect", str(tmp_path)])


def test_traceback_only_with_verbose_in_a_real_process(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("[1]")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "moequant.cli", "-q", "eval", "ppl", str(tmp_path / "m")]
    p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    want = f"moequant: error: {tmp_path / 'm' / 'config.json'}: expected a JSON object, found a list"
    assert (p.returncode, p.stderr.strip()) == (2, want)
    p = subprocess.run(argv[:3] + ["-v"] + argv[3:], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1
    assert "Traceback (most recent call last)" in p.stderr
    assert p.stderr.strip().splitlines()[-1] == ("moequant.errors.MoequantError: "
                                                 f"{tmp_path / 'm' / 'config.json'}: expected a JSON object, found a list")
