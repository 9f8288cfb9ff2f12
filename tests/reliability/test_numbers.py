"""Numbers: NaN/Inf weights are refused before quantizing, naming the tensor and counting the values;
finite weights too large for a float16 scale are an error naming the tensor (or quantize with float32
scales); report.json lists every tensor kept in full precision with its rule and the totals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_toy_olmoe
from moequant.cli import main
from moequant.errors import MoequantError
from moequant.solvers.solve import check_finite

pytestmark = pytest.mark.usefixtures("one_thread")

Q4 = ["--bits", "4", "--group-size", "32", "--solver", "rtn"]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Path]:
    return save_toy_olmoe(tmp_path_factory.mktemp("numbers"), "good", 1500)


def _damaged(good_dir: Path, tmp_path: Path, fn) -> Path:
    d = tmp_path / "m"
    shutil.copytree(good_dir, d)
    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _error_line(capsys, argv: list[str]) -> str:
    rc = main(["-q", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("moequant: error:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0]
    return lines[0]


def test_check_finite_counts_and_locates():
    w = torch.zeros(4, 8)
    check_finite(w, "w")  # finite: nothing
    w[1, 2] = float("nan")
    w[3, 0] = float("inf")
    w[3, 1] = float("-inf")
    with pytest.raises(MoequantError) as e:
        check_finite(w, "model.x.weight")
    assert str(e.value) == ("model.x.weight (4, 8): 3 non-finite values (1 NaN, 2 Inf; first at index (1, 2)) of 32: "
                            "the source weights are corrupt")


@pytest.mark.parametrize("offload", [False, True])
def test_nan_in_a_linear_is_refused_naming_it(capsys, tmp_path, good, offload):
    def poison(sd):
        w = sd["model.layers.1.self_attn.k_proj.weight"]  # [32, 64]
        w[0, :3] = float("nan")
        w[5, 7] = float("inf")

    d = _damaged(good[0], tmp_path, poison)
    out = tmp_path / "o"
    line = _error_line(capsys, ["quantize", str(d), "--out", str(out)] + Q4 + (["--offload"] if offload else []))
    assert line == ("moequant: error: model.layers.1.self_attn.k_proj.weight (32, 64): 4 non-finite values (3 NaN, "
                    "1 Inf; first at index (0, 0)) of 2048: the source weights are corrupt")
    assert not out.exists()


def test_nan_in_a_fused_expert_tensor_is_refused_naming_it(capsys, tmp_path, good):
    def poison(sd):
        sd["model.layers.0.mlp.experts.2.up_proj.weight"][3, 4] = float("nan")  # -> gate_up_proj[2, 64 + 3, 4] (gate rows first)

    d = _damaged(good[0], tmp_path, poison)
    line = _error_line(capsys, ["quantize", str(d), "--out", str(tmp_path / "o")] + Q4)
    assert line == ("moequant: error: model.layers.0.mlp.experts.gate_up_proj (4, 128, 64): 1 non-finite values "
                    "(1 NaN, 0 Inf; first at index (2, 67, 4)) of 32768: the source weights are corrupt")


def test_nan_in_a_kept_tensor_is_not_a_quantization_error(capsys, tmp_path, good):
    """Only tensors that are quantized are checked: a NaN in a tensor the recipe keeps is stored as is."""
    d = _damaged(good[0], tmp_path, lambda sd: sd["model.layers.0.self_attn.o_proj.weight"].__setitem__((0, 0),
                                                                                                         float("nan")))
    rc = main(["-q", "quantize", str(d), "--out", str(tmp_path / "o"), "--keep", r"re:.*o_proj\.weight"] + Q4)
    assert rc == 0, capsys.readouterr().err


def test_extreme_finite_weight_overflows_float16_scales(capsys, tmp_path, good):
    d = _damaged(good[0], tmp_path, lambda sd: sd["model.layers.1.self_attn.k_proj.weight"].__setitem__((0, 0), 1e30))
    line = _error_line(capsys, ["quantize", str(d), "--out", str(tmp_path / "o")] + Q4)
    assert line.startswith("moequant: error: model.layers.1.self_attn.k_proj.weight (32, 64): a group scale of ")
    assert "overflows the float16 scale dtype" in line and "--scale-dtype float32" in line
    assert not (tmp_path / "o").exists()
    # float32 scales hold it: the checkpoint decodes to finite values, the big weight kept to ~fp32 precision
    out = tmp_path / "o32"
    assert main(["-q", "quantize", str(d), "--out", str(out), "--scale-dtype", "float32"] + Q4) == 0
    from moequant import api

    w = api.load(out).model.layers[1].self_attn.k_proj.dequantized_weight()
    assert bool(torch.isfinite(w).all())
    assert float(w[0, 0]) == pytest.approx(1e30, rel=1e-6)


# --- report.json: kept tensors ---------------------------------------------------------------------------

def test_report_lists_every_kept_tensor(capsys, tmp_path, good):
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(good[0]), "--out", str(out), "--keep", r"re:.*\.1\.self_attn\.o_proj\.weight"]
                + Q4) == 0
    rep = json.loads((out / "report.json").read_text())
    kept = {k["name"]: k for k in rep["kept_tensors"]}
    quantized = {t["name"] for t in rep["quantized_tensors"]}
    on_disk = set(load_file(good[0] / "model.safetensors"))
    dense = {n for n in on_disk if ".mlp.experts." not in n}
    # every stored full-precision tensor of the source is listed, and nothing that was quantized
    assert set(kept) == dense - quantized
    assert kept.keys().isdisjoint(quantized)
    assert kept["model.layers.1.self_attn.o_proj.weight"] == {
        "name": "model.layers.1.self_attn.o_proj.weight", "shape": [64, 64], "dtype": "float32", "nbytes": 64 * 64 * 4,
        "rule": r"re:.*\.1\.self_attn\.o_proj\.weight", "tied_to": None}
    assert kept["model.embed_tokens.weight"] == {
        "name": "model.embed_tokens.weight", "shape": [320, 64], "dtype": "float32", "nbytes": 320 * 64 * 4,
        "rule": "not a target", "tied_to": None}
    for name in ("lm_head.weight", "model.norm.weight", "model.layers.0.mlp.gate.weight",
                 "model.layers.0.input_layernorm.weight", "model.layers.1.self_attn.q_norm.weight"):
        assert kept[name]["rule"] == "not a target", name
    for k in kept.values():
        assert k["nbytes"] == 4 * math.prod(k["shape"])
    assert rep["kept_totals"] == {"tensors": len(kept), "weights": sum(math.prod(k["shape"]) for k in kept.values()),
                                  "bytes": sum(k["nbytes"] for k in kept.values())}
    # the bytes the checkpoint stores for them
    assert rep["kept_totals"]["bytes"] == sum(4 * t.numel() for n, t in load_file(out / "model.safetensors").items()
                                              if n in kept)


def test_tied_head_is_listed_once_in_the_totals():
    from moequant import api
    from moequant.alloc.recipe import Recipe
    from moequant.codecs.config import UniformConfig
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    api.quantize(model, Recipe.uniform(UniformConfig(bits=4, group_size=32)), progress=False)
    rep = model.moequant_report
    kept = {k.name: k for k in rep.kept_tensors}
    assert kept["lm_head.weight"].tied_to == "model.embed_tokens.weight"
    assert kept["model.embed_tokens.weight"].tied_to is None
    assert rep.kept_totals()["bytes"] == sum(k.nbytes for k in rep.kept_tensors) - kept["lm_head.weight"].nbytes
