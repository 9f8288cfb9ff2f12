"""moequant never runs a model's own Python code: a directory whose config (or tokenizer config) has an
``auto_map`` is refused with one line and exit 2 by quantize, inspect and eval ppl, even when "y" is
waiting on stdin for transformers' trust prompt; every transformers load in the package passes
``trust_remote_code=False``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_toy_olmoe
from moequant.errors import MoequantError
from moequant.models.loader import load_model, read_model_config

SRC = Path(__file__).resolve().parents[2] / "src" / "moequant"
REFUSAL = "needs trust_remote_code (auto_map in {}); moequant never runs a model's own Python code"

EVIL_PY = """\
import pathlib
pathlib.Path({marker!r}).write_text("foreign code ran")
from transformers import PretrainedConfig, PreTrainedModel


class EvilConfig(PretrainedConfig):
    model_type = "evil"


class EvilModel(PreTrainedModel):
    config_class = EvilConfig
"""


def _plant(d: Path, marker: Path, config_file: str = "config.json", model_type: str | None = "evil") -> None:
    """Add ``evil.py`` (writes ``marker`` when imported) and an ``auto_map`` pointing at it."""
    (d / "evil.py").write_text(EVIL_PY.format(marker=str(marker)))
    f = d / config_file
    cfg = json.loads(f.read_text()) if f.is_file() else {}
    if config_file == "config.json":
        cfg.pop("model_type", None)
        if model_type is not None:
            cfg["model_type"] = model_type
        cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    else:
        cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    f.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny OLMoE with its tokenizer, and a text file to score."""
    return save_toy_olmoe(tmp_path_factory.mktemp("remote"), "model", 600)


def _variant(src: Path, tmp_path: Path, name: str, **plant) -> tuple[Path, Path]:
    import shutil

    d = tmp_path / name
    shutil.copytree(src, d)
    marker = tmp_path / f"{name}.MARKER"
    _plant(d, marker, **plant)
    return d, marker


def _cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """``echo y | moequant ARGV`` in a fresh process (a prompt would read the "y")."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "moequant.cli", "-q", *argv], input="y\ny\ny\n", text=True,
                          capture_output=True, env=env, timeout=300, cwd=tmp_path)


def _assert_refused(p: subprocess.CompletedProcess, d: Path, config_file: str) -> None:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "[y/N]" not in p.stdout + p.stderr
    assert lines[-1] == f"moequant: error: {d}: " + REFUSAL.format(config_file)
    assert sum(ln.startswith("moequant: error:") for ln in lines) == 1


@pytest.mark.parametrize("model_type", ["evil", None, "olmoe"])
def test_auto_map_in_config_is_refused_by_every_command(model_dir, tmp_path, model_type):
    """Unknown model_type (transformers would prompt), none at all, or a known one (transformers would
    quietly use its own class): moequant refuses all three before transformers sees the directory."""
    d, marker = _variant(model_dir[0], tmp_path, f"m_{model_type}", model_type=model_type)
    commands = [["quantize", str(d), "--out", str(tmp_path / "out")]]
    if model_type == "evil":  # the case where transformers itself would prompt: every command
        commands += [["inspect", str(d)], ["eval", "ppl", str(d), "--data", str(model_dir[1])]]
    for argv in commands:
        p = _cli(tmp_path, *argv)
        if argv[0] == "inspect":
            # not a checkpoint: inspect stops at its quantization_config, before any transformers load
            assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
            assert p.stderr.splitlines()[-1] == f"moequant: error: {d / 'config.json'}: not a moequant checkpoint " \
                                                "(quantization_config.quant_method != 'moequant')"
        else:
            _assert_refused(p, d, "config.json")
        assert not marker.exists(), argv
    assert not (tmp_path / "out").exists()


def test_auto_map_in_tokenizer_config_is_refused(model_dir, tmp_path):
    d, marker = _variant(model_dir[0], tmp_path, "tok", config_file="tokenizer_config.json")
    p = _cli(tmp_path, "eval", "ppl", str(d), "--data", str(model_dir[1]))
    _assert_refused(p, d, "tokenizer_config.json")
    assert not marker.exists()


def test_inspect_refuses_a_checkpoint_with_auto_map(model_dir, tmp_path):
    """A real moequant checkpoint that someone gave an auto_map: refused before transformers reads it."""
    from moequant.cli import main

    out = tmp_path / "ckpt"
    assert main(["-q", "quantize", str(model_dir[0]), "--bits", "4", "--group-size", "32", "--solver", "rtn", "--out",
                 str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (out / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "ckpt.MARKER"
    (out / "evil.py").write_text(EVIL_PY.format(marker=str(marker)))
    for argv in (["inspect", str(out)], ["eval", "ppl", str(out), "--data", str(model_dir[1])]):
        _assert_refused(_cli(tmp_path, *argv), out, "config.json")
        assert not marker.exists()


def test_load_model_and_read_model_config_refuse_in_process(model_dir, tmp_path):
    d, marker = _variant(model_dir[0], tmp_path, "inproc", model_type="olmoe")
    msg = f"{d}: " + REFUSAL.format("config.json")
    with pytest.raises(MoequantError) as e:
        read_model_config(d)
    assert str(e.value) == msg
    with pytest.raises(MoequantError) as e:
        load_model(str(d))
    assert str(e.value) == msg
    assert not marker.exists()


def test_remote_code_error_from_the_hub_is_one_line(monkeypatch):
    """A hub model can only be checked by transformers: its refusal (trust_remote_code=False) is
    converted, never prompted."""
    import transformers

    seen = {}

    def fake(path, **kw):
        seen.update(kw)
        raise ValueError("The repository someorg/evil contains custom code which must be executed to correctly "
                         "load the model.\nPlease pass the argument `trust_remote_code=True` to allow custom code.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    with pytest.raises(MoequantError) as e:
        load_model("someorg/evil")
    assert str(e.value) == "someorg/evil: needs trust_remote_code; moequant never runs a model's own Python code"
    assert seen["trust_remote_code"] is False


def _from_pretrained_calls() -> list[tuple[str, int, ast.Call]]:
    out = []
    for f in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "from_pretrained":
                out.append((str(f.relative_to(SRC)), node.lineno, node))
    return out


def test_every_transformers_load_passes_trust_remote_code_false():
    calls = _from_pretrained_calls()
    assert len(calls) >= 7  # loader (model, 2 tokenizers), api.load, offload skeleton, zoo GGUF conversion (2)
    bad = []
    for where, line, call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        v = kw.get("trust_remote_code")
        if "kwargs" in [k.value.id for k in call.keywords if k.arg is None and isinstance(k.value, ast.Name)]:
            continue  # loader.load_model: checked below
        if not (isinstance(v, ast.Constant) and v.value is False):
            bad.append(f"{where}:{line}")
    assert bad == []
    loader = (SRC / "models" / "loader.py").read_text()
    assert '"trust_remote_code": False' in loader
