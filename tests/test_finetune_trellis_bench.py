"""benchmarks/finetune_trellis.py: the finetune flags of each ``--methods`` entry (``M-layer`` is method M with
the layer-wise objective) — the command a row records is the command that trained it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from conftest import BENCHMARKS, bench_module


class _Ran(Exception):
    pass


def _finetune_call(monkeypatch, tmp_path, layers: str, method: str) -> tuple[Path, list[str], Path]:
    """``(run, flags, out)`` of the first ``finetune`` the benchmark's ``measure_finetune`` would run."""
    m = bench_module(BENCHMARKS / "finetune_trellis.py", "finetune_trellis_bench")
    got = []

    def finetune(run, flags, out):
        got.append((run, flags, out))
        raise _Ran

    monkeypatch.setattr(m, "ensure_ptq", lambda *a: None)
    monkeypatch.setattr(m, "finetune", finetune)
    args = argparse.Namespace(steps=5, lr=1e-3, batch=4, tau="0.3:0.05", soft_bits=4, ste_every=8, ptq=None)
    with pytest.raises(_Ran):
        m.measure_finetune(layers, method, args, {}, tmp_path)
    return got[0]


@pytest.mark.parametrize("method, want", [
    ("kd", ["--method", "kd"]),
    ("kd-layer", ["--method", "kd", "--loss", "layer"]),
    ("bcjr", ["--method", "bcjr", "--tau", "0.3:0.05", "--soft-bits", "4"]),
    ("bcjr-layer", ["--method", "bcjr", "--loss", "layer", "--tau", "0.3:0.05", "--soft-bits", "4"]),
    ("ste-layer", ["--method", "ste", "--loss", "layer", "--ste-every", "8"]),
])
def test_method_flags(monkeypatch, tmp_path, method, want):
    run, flags, out = _finetune_call(monkeypatch, tmp_path, "0,1", method)
    common = ["--layers", "0,1", "--steps", "5", "--lr", "0.001", "--batch", "4"]
    assert flags == want[:2] + common + want[2:]
    assert run == Path(tmp_path / "ptq-L0+1") and out == tmp_path / f"{method}-L0+1"


@pytest.mark.parametrize("layers, flags", [("0,1", ["--layers", "0,1"]), ("all", [])])
def test_whole_model_is_finetuned_without_layers(monkeypatch, tmp_path, layers, flags):
    _, got, _ = _finetune_call(monkeypatch, tmp_path, layers, "kd")
    assert got == ["--method", "kd", *flags, "--steps", "5", "--lr", "0.001", "--batch", "4"]


@pytest.mark.parametrize("layers, quantized", [
    ("0", {"model.layers.0.self_attn.q_proj.weight"}),
    ("0,1", {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"}),
    ("all", {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
             "model.layers.10.mlp.down_proj.weight", "model.layers.29.mlp.experts.gate_up_proj"}),
])
def test_recipe_quantizes_exactly_the_layer_set(layers, quantized):
    from moequant.alloc.recipe import Recipe
    from moequant.codecs.config import TrellisConfig

    m = bench_module(BENCHMARKS / "finetune_trellis.py", "finetune_trellis_bench")
    r = Recipe.from_dict(m.recipe(layers, TrellisConfig(bits=2)))
    names = {"model.layers.0.self_attn.q_proj.weight": "linear", "model.layers.1.mlp.down_proj.weight": "linear",
             "model.layers.10.mlp.down_proj.weight": "linear", "model.layers.29.mlp.experts.gate_up_proj": "experts",
             "model.layers.0.input_layernorm.weight": "other", "model.layers.3.mlp.gate.weight": "linear",
             "model.layers.3.mlp.shared_expert_gate.weight": "linear", "model.embed_tokens.weight": "embedding",
             "lm_head.weight": "head", "model.norm.weight": "other"}
    assert {n for n, kind in names.items() if r.match(n, kind)[0] is not None} == quantized


def _report(quantized: dict[str, str], kept: list[str]) -> dict:
    """A quantize report: ``quantized`` name -> method (linear, rule kind:linear), ``kept`` names unquantized."""
    cfg = {"L": 16, "Q": 9, "V": 2, "bits": 2, "code": "hyb", "tail_biting": True, "tile": 16, "type": "TrellisConfig",
           "version": 1}
    return {"command": "moequant -q quantize smollm2-135m --method trellis --bits 2 --out X",
            "layer_seconds": {"restored": 0, "this_run": 12.5, "total": 12.5},
            "config": {"rules": [{"match": "re:.*norm.*", "config": None}, {"match": "kind:linear", "config": cfg}]},
            "quantized_tensors": [{"name": n, "kind": "linear", "method": m, "rule": "kind:linear"}
                                  for n, m in quantized.items()],
            "exact_tensors": [{"name": "model.embed_tokens.weight", "kind": "embedding"}],
            "kept_tensors": [{"name": n} for n in kept]}


_NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]


@pytest.mark.parametrize("layers, quantized, error", [
    ("all", {n: "trellis2-hyb-L16" for n in _NAMES}, None),
    ("0", {_NAMES[0]: "trellis2-hyb-L16"}, None),
    ("all", {_NAMES[0]: "trellis2-hyb-L16"}, "not quantized: model.layers.1.mlp.down_proj.weight (+0 more)"),
    ("0", {n: "trellis2-hyb-L16" for n in _NAMES}, "also quantized: model.layers.1.mlp.down_proj.weight (+0 more)"),
    ("all", {_NAMES[0]: "trellis2-hyb-L16", _NAMES[1]: "int2-g128"},
     "not trellis: model.layers.1.mlp.down_proj.weight (+0 more)"),
])
def test_given_ptq_must_quantize_exactly_the_layer_set(tmp_path, layers, quantized, error):
    """``--ptq DIR`` is the PTQ row only when it quantizes exactly the set's weights at --bits-bit trellis; its
    report's command, time and trellis config become the row's."""
    import json

    m = bench_module(BENCHMARKS / "finetune_trellis.py", "finetune_trellis_bench")
    kept = ["model.layers.0.input_layernorm.weight"] + [n for n in _NAMES if n not in quantized]
    (tmp_path / "report.json").write_text(json.dumps(_report(quantized, kept)))
    args = argparse.Namespace(ptq=str(tmp_path), bits=2)
    if error is None:
        cfg, cmd, secs = m.given_ptq(layers, args)
        assert cfg["L"] == 16 and cfg["bits"] == 2 and secs == 12.5
        assert cmd[:4] == ["moequant", "-q", "quantize", "smollm2-135m"]
        assert m.ptq_dir(layers, args, tmp_path / "work") == tmp_path
    else:
        with pytest.raises(SystemExit) as e:
            m.given_ptq(layers, args)
        assert str(e.value).endswith(error)
