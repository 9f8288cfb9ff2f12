"""``moequant export compressed-tensors``: checked by compressed-tensors' own decompressor, not our reader.

The exports of tiny dense and MoE models (2/3/4/8 bits, asymmetric and midtread symmetric) are read back
with the installed compressed-tensors (its ``CompressedTensorsDequantizer``, which parses our
``quantization_config`` and runs ``PackedQuantizationCompressor.decompress``) and with transformers'
compressed-tensors loader, and must equal moequant's dequantized weights bit for bit. The files are
written for the installed release's layout, so the same tests check the version vLLM pins when run
under it: ``test_pinned_compressed_tensors_version`` (slow) does that in a side directory.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import MOE_ARCHS, tiny_model
from moequant import api
from moequant.alloc.recipe import Recipe, Rule
from moequant.cli import main
from moequant.codecs.config import LutConfig, UniformConfig
from moequant.errors import MoequantError
from moequant.export.compressed_tensors import (PINNED_CT_VERSION, PROVENANCE, CtExportConfig, export, plan,
                                                scheme_for)
from moequant.export.ct_pack import Layout, layout_for_version, pack_int32
from moequant.models.adapters import adapter_for

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CT_VERSION = ct.__version__  # the files are written for the reader under test
REPO = Path(__file__).resolve().parents[2]


def test_version_under_test():
    """The slow side-directory run sets MOEQUANT_CT_EXPECT: this file then really ran under that release."""
    want = os.environ.get("MOEQUANT_CT_EXPECT")
    assert want is None or CT_VERSION == want, (CT_VERSION, want)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_int32_matches_compressed_tensors(bits):
    """Our int32 packing = the installed release's ``pack_to_int32`` on an awkward shape, along both dims
    (weights along K, zero points along the output rows)."""
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (83, 545), generator=g, dtype=torch.int64).to(torch.uint8)
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    layout = layout_for_version(CT_VERSION)
    assert torch.equal(pack_int32(codes, bits, layout), pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(codes.t(), bits, layout).t(), pack_to_int32(signed, bits, packed_dim=0))


# ------------------------------------------------------------------------------------------------
# exports of tiny models, decompressed by compressed-tensors
# ------------------------------------------------------------------------------------------------

def hub_linears(arch: str, model) -> dict[str, tuple[str, int | None, slice]]:
    """{hub module name: (our packed tensor, expert, rows)} written out by hand from the architectures'
    hub checkpoints (independent of the exporter's mapping)."""
    cfg = model.config
    out = {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{p}.self_attn.{n}"] = (f"{p}.self_attn.{n}.weight", None, slice(None))
        if arch not in MOE_ARCHS:
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[f"{p}.mlp.{n}"] = (f"{p}.mlp.{n}.weight", None, slice(None))
            continue
        n_exp = getattr(cfg, "num_local_experts", None) or cfg.num_experts
        inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        moe, (g, u, d) = (f"{p}.block_sparse_moe", ("w1", "w3", "w2")) if arch == "mixtral" else \
            (f"{p}.mlp", ("gate_proj", "up_proj", "down_proj"))
        for e in range(n_exp):
            out[f"{moe}.experts.{e}.{g}"] = (f"{p}.mlp.experts.gate_up_proj", e, slice(0, inter))
            out[f"{moe}.experts.{e}.{u}"] = (f"{p}.mlp.experts.gate_up_proj", e, slice(inter, 2 * inter))
            out[f"{moe}.experts.{e}.{d}"] = (f"{p}.mlp.experts.down_proj", e, slice(None))
        if arch == "qwen2_moe":
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[f"{p}.mlp.shared_expert.{n}"] = (f"{p}.mlp.shared_expert.{n}.weight", None, slice(None))
    return out


_RUNS: dict = {}


def quantized_run(tmp_path_factory, arch: str, bits: int, symmetric: bool, group_size: int = 32) -> tuple:
    """(run directory, quantized model, float model) — one per setting for the whole module."""
    key = (arch, bits, symmetric, group_size)
    if key not in _RUNS:
        model = tiny_model(arch)
        ref = {k: v.clone() for k, v in model.state_dict().items()}
        api.quantize(model, Recipe.uniform(UniformConfig(bits=bits, group_size=group_size, symmetric=symmetric)),
                     progress=False)
        run = api.save(model, tmp_path_factory.mktemp(f"{arch}{bits}{'s' if symmetric else 'a'}") / "run")
        _RUNS[key] = run, model, ref
    return _RUNS[key]


def read_dir(d: Path) -> dict[str, torch.Tensor]:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(d / f)))
    assert set(out) == set(index["weight_map"])
    return out


def ct_decompress(d: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the export as compressed-tensors' own model-free dequantizer returns it."""
    deq = CompressedTensorsDequantizer(str(d), dtype=dtype)
    tensors = read_dir(d)
    try:
        deq.validate(dict(tensors))  # every targeted module has all its parameters, nothing is left over
    except ValueError as e:
        # <= 0.17's model-free validator counts a quantized linear's bias (Qwen2's q/k/v) as unconsumed
        if "unconsumed keys" not in str(e) or layout_for_version(CT_VERSION) != Layout.WORD:
            raise
        deq.validate({k: v for k, v in tensors.items() if not k.endswith(".bias")})
    return deq.process(dict(tensors))


def check_export(out: Path, run: Path, arch: str, model, ref: dict) -> int:
    """compressed-tensors' weights equal ours in the serving dtype (float16), every hub linear present,
    kept tensors unchanged; -> linears compared."""
    got = ct_decompress(out, torch.float16)
    packed = api.packed_modules(model)
    want = hub_linears(arch, model)
    assert {k[: -len(".weight")] for k, v in got.items() if v.dtype == torch.float16} == set(want)
    for module, (name, expert, rows) in want.items():
        ours = packed[name].dequantize(torch.float16)
        ours = ours[rows] if expert is None else ours[expert, rows]
        w = got[f"{module}.weight"]
        assert w.dtype == torch.float16 and torch.equal(w, ours), module
        # not vacuous: quantization changed the weight, and a wrong row block would not match
        orig = ref[name][rows] if expert is None else ref[name][expert, rows]
        assert not torch.equal(w.float(), orig) and w.abs().max() > 0
    kept = set(got) - {f"{m}.weight" for m in want}
    adapter = adapter_for(arch)
    for k in kept:
        mem = k
        for m, disk in adapter.disk_renames:
            mem = mem.replace(disk, m)
        assert torch.equal(got[k], ref[mem]), k
    tied = bool(getattr(model.config, "tie_word_embeddings", False))  # Gemma: the head is the embedding table
    assert "model.embed_tokens.weight" in kept and ("lm_head.weight" in kept) != tied
    return len(want)


CASES = [("llama", b, s) for b in (2, 3, 4, 8) for s in (False, True)] + \
        [("mixtral", b, s) for b in (3, 4, 8) for s in (False, True)] + [("qwen2_moe", 4, False), ("olmoe", 2, True),
                                                                     ("qwen3", 8, False), ("gemma3_text", 4, True)]


@pytest.mark.parametrize("arch,bits,symmetric", CASES)
def test_export_decompresses_to_our_weights(tmp_path_factory, tmp_path, arch, bits, symmetric):
    run, model, ref = quantized_run(tmp_path_factory, arch, bits, symmetric)
    r = export(CtExportConfig(run, tmp_path / "ct", ct_version=CT_VERSION))
    assert r["layout"] == layout_for_version(CT_VERSION).value and r["dtype"] == "float16"
    n = check_export(tmp_path / "ct", run, arch, model, ref)
    assert r["linears"] == n
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["version"] == CT_VERSION and cfg["dtype"] == "float16" and cfg["architectures"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["weights"]["num_bits"] == bits
    assert group["weights"]["symmetric"] == symmetric and group["weights"]["group_size"] == 32
    routers = {f"model.layers.{i}.{'block_sparse_moe' if arch == 'mixtral' else 'mlp'}.gate" for i in range(2)}
    want_ignore = (set() if model.config.tie_word_embeddings else {"lm_head"}) | (routers if arch in MOE_ARCHS else set())
    if arch == "qwen2_moe":
        want_ignore |= {f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)}
    assert set(qc["ignore"]) == want_ignore
    stored = read_dir(tmp_path / "ct")
    if symmetric:
        assert not any(k.endswith("weight_zero_point") for k in stored)
    else:
        assert any(k.endswith("weight_zero_point") for k in stored)


def test_mixed_schemes_and_whole_rows(tmp_path_factory, tmp_path):
    """Experts int3 asymmetric with one scale per row, attention int8 symmetric group 64: two config
    groups with exact and per-expert regex targets; compressed-tensors still decodes every linear."""
    model = tiny_model("olmoe")
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe((Rule("kind:experts", UniformConfig(bits=3, group_size=-1, symmetric=False)),
                     Rule("kind:linear", UniformConfig(bits=8, group_size=64, symmetric=True))))
    api.quantize(model, recipe, progress=False)
    run = api.save(model, tmp_path / "run")
    export(CtExportConfig(run, tmp_path / "ct", ct_version=CT_VERSION))
    assert check_export(tmp_path / "ct", run, "olmoe", model, ref) == 2 * (4 + 3 * 4)
    groups = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]
    by_bits = {g["weights"]["num_bits"]: g for g in groups.values()}
    assert by_bits[3]["weights"]["strategy"] == "channel" and by_bits[3]["weights"]["group_size"] is None
    assert by_bits[3]["targets"][0].startswith("re:") and "model.layers.0.self_attn.q_proj" in by_bits[8]["targets"]
    stored = read_dir(tmp_path / "ct")
    assert stored["model.layers.0.mlp.experts.1.up_proj.weight_scale"].shape == (64, 1)


def test_layout_follows_the_target_version(tmp_path_factory, tmp_path):
    """3-bit words differ between compressed-tensors <= 0.17 and >= 0.18; the installed release decodes
    only its own layout exactly (so the flag matters and the exactness check can fail). 4-bit files are
    the same for both."""
    run, model, _ = quantized_run(tmp_path_factory, "llama", 3, False)
    own, other = CT_VERSION, ("0.18.0" if layout_for_version(CT_VERSION) == Layout.WORD else "0.17.0")
    export(CtExportConfig(run, tmp_path / "own", ct_version=own))
    export(CtExportConfig(run, tmp_path / "other", ct_version=other))
    a, b = read_dir(tmp_path / "own"), read_dir(tmp_path / "other")
    key = "model.layers.0.self_attn.q_proj"
    assert a[f"{key}.weight_packed"].shape != b[f"{key}.weight_packed"].shape
    ours = api.packed_modules(model)[f"{key}.weight"].dequantize(torch.float16)
    assert torch.equal(ct_decompress(tmp_path / "own", torch.float16)[f"{key}.weight"], ours)
    try:
        wrong = ct_decompress(tmp_path / "other", torch.float16)[f"{key}.weight"]
    except (ValueError, RuntimeError, IndexError):
        wrong = None
    assert wrong is None or not torch.equal(wrong, ours)
    run4, _, _ = quantized_run(tmp_path_factory, "llama", 4, False)
    export(CtExportConfig(run4, tmp_path / "w4", ct_version="0.17.0"))
    export(CtExportConfig(run4, tmp_path / "d4", ct_version="0.18.0"))
    w4, d4 = read_dir(tmp_path / "w4"), read_dir(tmp_path / "d4")
    assert all(torch.equal(w4[k], d4[k]) for k in w4)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("arch,symmetric", [("llama", False), ("qwen3_moe", True)])
def test_transformers_compressed_tensors_loader(tmp_path_factory, tmp_path, arch, symmetric):
    """transformers' compressed-tensors quantizer (``dequantize=True``: compressed-tensors' ModelCompressor
    decompresses every module and merges the per-expert linears back into fused experts) loads the
    export, and every quantized weight equals ours. (Its fused-experts path drops zero points, so the MoE
    case is symmetric.)"""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    run, model, ref = quantized_run(tmp_path_factory, arch, 4, symmetric)
    export(CtExportConfig(run, tmp_path / "ct", ct_version=CT_VERSION))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float16,
                                              quantization_config=CompressedTensorsConfig(dequantize=True))
    sd = hf.state_dict()
    packed = api.packed_modules(model)
    assert packed and all(torch.equal(sd[k], qt.dequantize(torch.float16)) for k, qt in packed.items())
    assert torch.equal(sd["model.norm.weight"], ref["model.norm.weight"].half())


# ------------------------------------------------------------------------------------------------
# refusals: one line naming the tensor and what would work
# ------------------------------------------------------------------------------------------------

U4 = {"format": "uniform-asym-packed", "format_version": 2, "bits": 4, "group_size": 128, "symmetric": False,
      "scale_dtype": "float16", "shape": [64, 256]}


@pytest.mark.parametrize("meta,match", [
    ({"format": "rht", "inner": U4, "shape": [64, 256]}, r"'w' is RHT-rotated .*--incoherence none"),
    ({"format": "trellis", "shape": [64, 256]}, r"'w' holds trellis codes.*--method int"),
    ({"format": "lut", "shape": [64, 256]}, r"'w' holds NF4/FP4 lookup codes.*--bits 4"),
    ({**U4, "format": "uniform-packed", "symmetric": True, "format_version": 1}, r"'w' uses the midrise"),
    ({**U4, "bits": 5}, r"'w' has 5-bit codes.*2, 3, 4, 8 bits"),
    ({**U4, "group_size": 16}, r"'w' has group size 16.*--group-size 64"),
    ({**U4, "shape": [64, 576]}, r"'w' has a partial last group \(K=576 .* 128\).*--group-size 64"),
])
def test_unservable_tensors_are_refused(meta, match):
    with pytest.raises(MoequantError, match=match):
        scheme_for("w", meta, "--group-size 64")


def test_plan_refuses_quantized_embeddings_and_half_quantized_experts():
    olmoe = adapter_for("olmoe")
    with pytest.raises(MoequantError, match=r"'model.embed_tokens.weight' is quantized.*--embeddings keep"):
        plan({"tensors": {"model.embed_tokens.weight": {**U4, "shape": [256, 64]}}}, olmoe)
    half = {"model.layers.0.mlp.experts.gate_up_proj": {**U4, "shape": [4, 128, 64], "group_size": 32}}
    with pytest.raises(MoequantError, match=r"model.layers.0.mlp.experts.down_proj is kept while"):
        plan({"tensors": half}, olmoe)


def _cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_export_overwrite_and_refusal(tmp_path_factory, tmp_path, capsys, monkeypatch):
    run, _, _ = quantized_run(tmp_path_factory, "llama", 4, False)
    out = tmp_path / "ct"
    rc, so, se = _cli(capsys, "-q", "export", "compressed-tensors", str(run), "--out", str(out))
    assert rc == 0 and "14 pack-quantized linears" in so and f"compressed-tensors {PINNED_CT_VERSION}" in so, se
    assert json.loads((out / PROVENANCE).read_text())["layout"] == "word"
    rc, _, se = _cli(capsys, "-q", "export", "compressed-tensors", str(run), "--out", str(out))
    assert rc == 2 and "already exists" in se
    rc, _, se = _cli(capsys, "-q", "export", "compressed-tensors", str(run), "--out", str(out), "--overwrite",
                     "--ct-version", "0.20.1")
    assert rc == 0 and json.loads((out / PROVENANCE).read_text())["layout"] == "dense"
    rc, _, se = _cli(capsys, "-q", "export", "compressed-tensors", str(run), "--out", str(run), "--overwrite")
    assert rc == 2 and "--out" in se and len(se.strip().splitlines()) == 1
    other = tmp_path / "notours"
    other.mkdir()
    (other / "x.txt").write_text("keep me")
    rc, _, se = _cli(capsys, "-q", "export", "compressed-tensors", str(run), "--out", str(other), "--overwrite")
    assert rc == 2 and "is not a previous compressed-tensors export" in se and (other / "x.txt").exists()
    rc, _, se = _cli(capsys, "-q", "export", "compressed-tensors", str(run), "--out", str(tmp_path / "bf"),
                     "--dtype", "bfloat16")
    assert rc == 2 and "is not exact in bfloat16" in se and not (tmp_path / "bf").exists()
    # a failure while writing leaves nothing behind
    monkeypatch.setattr("moequant.export.compressed_tensors._write_config",
                        lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        export(CtExportConfig(run, tmp_path / "half"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "notours"]


def test_cli_refuses_nf4_naming_the_tensor(tmp_path, capsys):
    model = tiny_model("llama")
    api.quantize(model, Recipe.uniform(LutConfig(lut="nf4", block_size=32)), progress=False)
    run = api.save(model, tmp_path / "run")
    rc, _, se = _cli(capsys, "-q", "export", "compressed-tensors", str(run), "--out", str(tmp_path / "ct"))
    assert rc == 2 and "model.layers.0.mlp.down_proj.weight' holds NF4/FP4" in se
    assert len(se.strip().splitlines()) == 1 and not (tmp_path / "ct").exists()


# ------------------------------------------------------------------------------------------------
# the release vLLM pins, in a side directory
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_pinned_compressed_tensors_version(tmp_path):
    """Installs compressed-tensors==PINNED_CT_VERSION (what vLLM 0.34 requires) into a target directory
    (needs the package index) and runs this file's default tests under it: every export written for it
    must decompress to our weights through *its* decompressor."""
    target = tmp_path / "ct"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    f"compressed-tensors=={PINNED_CT_VERSION}"], check=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
           "MOEQUANT_CT_EXPECT": PINNED_CT_VERSION}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                        str(Path(__file__))], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.strip().splitlines()[-1]
