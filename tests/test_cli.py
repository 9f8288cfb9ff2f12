"""CLI: bad input gives one clear line on stderr and a non-zero exit; nothing half-written."""

import json
import logging
import math

import pytest
import torch

from conftest import save_toy_olmoe, tiny_model
from moequant.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_unknown_alias(capsys, tmp_path):
    rc, _, err = _run(capsys, "-q", "quantize", "no-such-model", "--out", str(tmp_path / "o"))
    assert rc == 2 and "unknown model 'no-such-model'" in err and "smollm2-135m" in err
    assert not (tmp_path / "o").exists()


def test_missing_local_path(capsys, tmp_path):
    rc, _, err = _run(capsys, "-q", "quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert rc == 2 and "no such directory" in err


def test_bits_out_of_range(capsys, tmp_path):
    rc, _, err = _run(capsys, "-q", "quantize", "x/y", "--bits", "7", "--out", str(tmp_path / "o"))
    assert rc == 2 and "--bits 7" in err


@pytest.fixture()
def tiny_dir(tmp_path):
    m = tiny_model("olmoe")
    d = tmp_path / "tiny"
    m.save_pretrained(d)
    return d


def test_quantize_inspect_end_to_end(capsys, tmp_path, tiny_dir):
    out = tmp_path / "q"
    rc, stdout, err = _run(capsys, "-q", "quantize", str(tiny_dir), "--bits", "2", "--asym", "--group-size", "32",
                           "--solver", "rtn", "--out", str(out))
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    # every row stores K/4 bytes of codes, K/32 fp16 scales and its K/32 2-bit zeros padded to whole bytes
    def row_bits(k):
        return 2 * k + 16 * (k // 32) + 8 * -(-(2 * (k // 32)) // 8)
    rows = [(math.prod(t["shape"][:-1]), t["shape"][-1]) for t in rep["quantized_tensors"]]
    expected = sum(r * row_bits(k) for r, k in rows) / sum(r * k for r, k in rows)
    assert rep["bits_per_weight"] == pytest.approx(expected, rel=1e-12)
    assert 2.5625 < rep["bits_per_weight"] < 2.8
    assert len(rep["quantized_tensors"]) == 2 * (4 + 2)  # q,k,v,o + 2 expert tensors per layer
    assert {"command", "versions", "config", "kept_tensors"} <= rep.keys()
    rc, stdout, err = _run(capsys, "-q", "inspect", str(out), "--json", str(tmp_path / "i.json"))
    assert rc == 0, err
    info = json.loads((tmp_path / "i.json").read_text())
    assert {"checkpoint_bytes", "resident_bytes", "ideal_bytes"} <= info.keys()
    assert info["resident_bytes"] <= 1.05 * info["ideal_bytes"]
    assert "mlp.experts.gate_up_proj" in stdout
    # existing output directory
    rc, _, err = _run(capsys, "-q", "quantize", str(tiny_dir), "--out", str(out), "--group-size", "32")
    assert rc == 2 and "already exists" in err


def test_group_size_need_not_divide(capsys, tmp_path, tiny_dir):
    # the tiny model's widths are 32 and 64: group 48 leaves partial last groups, each with its own scale
    rc, _, err = _run(capsys, "-q", "quantize", str(tiny_dir), "--group-size", "48", "--solver", "rtn", "--out",
                      str(tmp_path / "o"))
    assert rc == 0, err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["config"]["rules"][-1]["config"]["group_size"] == 48
    for t in rep["quantized_tensors"]:
        k = t["shape"][-1]
        g = -(-k // 48)  # groups per row, the last one partial
        row_bits = 4 * k + 16 * g + 8 * -(-(4 * g) // 8)  # codes, fp16 scales, 4-bit zero points in whole bytes
        assert t["bits_per_weight"] == pytest.approx(row_bits / k, rel=1e-12)
    rc, _, err = _run(capsys, "-q", "quantize", str(tiny_dir), "--group-size", "0", "--out", str(tmp_path / "z"))
    assert rc == 2 and "--group-size must be positive" in err
    assert not (tmp_path / "z").exists()


@pytest.mark.parametrize("flags,msg", [
    (["--method", "nf4", "--bits", "2"], "--method nf4 stores 4-bit codes; --bits 2 does not apply"),
    (["--method", "nf4", "--asym"], "--asym does not apply to --method nf4"),
    (["--method", "fp4", "--group-size", "64"], "--group-size does not apply to --method fp4"),
    (["--trellis-l", "10"], "--trellis-l does not apply to --method int"),
    (["--method", "trellis", "--block-size", "32"], "--block-size does not apply to --method trellis"),
    (["--sym", "--asym"], "--sym and --asym contradict each other"),
    (["--bits", "3", "--recipe", "r.json"], "--recipe sets every method option; drop --bits"),
])
def test_conflicting_method_flags(capsys, tmp_path, tiny_dir, flags, msg):
    rc, _, err = _run(capsys, "-q", "quantize", str(tiny_dir), *flags, "--out", str(tmp_path / "o"))
    errors = [ln for ln in err.splitlines() if ln.startswith("moequant: error:")]
    assert rc == 2 and len(errors) == 1 and msg in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_defaults_pick_the_best_known_recipe(capsys, caplog, tmp_path, tok_model_dir):
    # --bits 3 with no other flag: asymmetric int3 g128, LDLQ + RHT, calibrated (here on the fixture's text)
    caplog.set_level(logging.INFO, logger="moequant")
    d, text = tok_model_dir
    rc, _, err = _run(capsys, "-q", "quantize", str(d), "--bits", "3", "--calib", str(text), "--calib-samples", "4",
                      "--calib-seqlen", "32", "--out", str(tmp_path / "q3"))
    assert rc == 0, err
    rep = json.loads((tmp_path / "q3" / "report.json").read_text())
    assert rep["solver"]["solver"] == "ldlq" and rep["solver"]["incoherence"] == "rht"
    cfg = rep["config"]["rules"][-1]["config"]
    assert (cfg["bits"], cfg["group_size"], cfg["symmetric"], cfg["clip_search"]) == (3, 128, False, True)
    assert any("recipe: int3a-g128-clip, LDLQ + RHT" in r.message for r in caplog.records)
    # --bits 5: round to nearest, no calibration; --bits 2: a warning before any work, naming the better method
    caplog.clear()
    rc, _, err = _run(capsys, "-q", "quantize", str(d), "--bits", "5", "--out", str(tmp_path / "q5"))
    assert rc == 0, err
    rep = json.loads((tmp_path / "q5" / "report.json").read_text())
    assert rep["solver"]["solver"] == "rtn" and rep["solver"]["incoherence"] == "none" and rep["calibration"] is None
    caplog.clear()
    rc, _, err = _run(capsys, "-q", "quantize", str(d), "--bits", "2", "--solver", "rtn", "--out", str(tmp_path / "q2"))
    assert rc == 0, err
    warned = [r.message for r in caplog.records if r.levelname == "WARNING" and "int2" in r.message]
    assert len(warned) == 1 and "--method trellis --bits 2" in warned[0]


def test_gguf_method_defaults_to_ldlq_without_rotation(capsys, caplog, tmp_path, tok_model_dir):
    # --method q4_k with no solver flag: LDLQ on the block grid, no Hadamard (GGUF cannot store it), so every
    # packed tensor has GGUF blocks; q8_0 rounds to nearest
    caplog.set_level(logging.INFO, logger="moequant")
    d, text = tok_model_dir
    rc, _, err = _run(capsys, "-q", "quantize", str(d), "--method", "q4_k", "--calib", str(text), "--calib-samples",
                      "4", "--calib-seqlen", "32", "--out", str(tmp_path / "k4"))
    assert rc == 0, err
    rep = json.loads((tmp_path / "k4" / "report.json").read_text())
    assert rep["solver"]["solver"] == "ldlq" and rep["solver"]["incoherence"] == "none"
    assert any("recipe: gguf-q4_k, LDLQ, calibrated" in r.message for r in caplog.records)
    import moequant
    from moequant.nn.packed import packed_names, packed_tensor

    model = moequant.load(tmp_path / "k4")
    packed = [packed_tensor(m, n) for m in model.modules() for n in packed_names(m)]
    assert packed and all(qt.gguf_blocks()[1].dtype == torch.uint8 for qt in packed)
    rc, _, err = _run(capsys, "-q", "quantize", str(d), "--method", "q8_0", "--out", str(tmp_path / "q8"))
    assert rc == 0, err
    rep = json.loads((tmp_path / "q8" / "report.json").read_text())
    assert rep["solver"]["solver"] == "rtn" and rep["solver"]["incoherence"] == "none"


@pytest.fixture()
def tok_model_dir(tmp_path):
    """A tiny OLMoE with a real (tiny) BPE tokenizer, and a text file to calibrate and score on."""
    return save_toy_olmoe(tmp_path, "tok_model", 4000)


def test_ldlq_rht_end_to_end_and_offload(capsys, tmp_path, tok_model_dir):
    d, text = tok_model_dir
    common = ["--bits", "2", "--asym", "--group-size", "32", "--solver", "ldlq", "--incoherence", "rht",
              "--calib", str(text), "--calib-samples", "8", "--calib-seqlen", "32", "--min-expert-tokens", "40"]
    rc, stdout, err = _run(capsys, "-q", "quantize", str(d), *common, "--out", str(tmp_path / "q"))
    assert rc == 0, err
    rep = json.loads((tmp_path / "q" / "report.json").read_text())
    assert rep["solver"]["solver"] == "ldlq" and rep["solver"]["incoherence"] == "rht"
    assert rep["calibration"]["tokens"] == 8 * 32 and rep["calibration"]["hessian"]["mode"] == "per-expert"
    assert all(t["proxy"] is not None and 0 < t["proxy"] < 1 for t in rep["quantized_tensors"])
    experts = [t for t in rep["quantized_tensors"] if t["kind"] == "experts"]
    assert all(sum(t["expert_tokens"]) == 8 * 32 * 2 for t in experts)  # every token visits top-2 experts
    starved = {(s["tensor"], s["expert"]) for s in rep["starved_experts"]}
    low = {(t["name"], e) for t in experts for e, n in enumerate(t["expert_tokens"]) if n < 40}
    assert starved == low
    assert any("q_proj" in g[0] and len(g) == 3 for g in rep["shared_inputs"])
    rc, stdout, err = _run(capsys, "-q", "eval", "ppl", str(tmp_path / "q"), "--data", str(text), "--seqlen", "32",
                           "--json", str(tmp_path / "p.json"))
    assert rc == 0, err
    assert json.loads((tmp_path / "p.json").read_text())["ppl"] > 1
    rc, _, err = _run(capsys, "-q", "quantize", str(d), *common, "--offload", "--out", str(tmp_path / "q_off"))
    assert rc == 0, err
    from test_offload import assert_same_checkpoint

    assert_same_checkpoint(tmp_path / "q", tmp_path / "q_off")
    # the Hadamard rule: recorded in the report and in every rotated tensor; --rht-transform picks another
    assert rep["solver"]["rht_transform"] == "paley-outer"
    metas = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["tensors"]
    assert {m["format_version"] for m in metas.values()} == {2}
    assert {m["transform"] for m in metas.values()} == {"paley-outer"}
    rc, stdout, err = _run(capsys, "-q", "inspect", str(tmp_path / "q"))
    assert rc == 0, err
    assert "rht[paley-outer](uniform-asym-packed)" in stdout
    rc, _, err = _run(capsys, "-q", "quantize", str(d), *common, "--rht-transform", "paley", "--out", str(tmp_path / "qp"))
    assert rc == 0, err
    metas_p = json.loads((tmp_path / "qp" / "config.json").read_text())["quantization_config"]["tensors"]
    assert {m["transform"] for m in metas_p.values()} == {"paley"}
    rc, _, err = _run(capsys, "-q", "eval", "ppl", str(tmp_path / "qp"), "--data", str(text), "--seqlen", "32",
                      "--json", str(tmp_path / "pp.json"))
    assert rc == 0, err
    ppl, ppl_p = (json.loads((tmp_path / f).read_text())["ppl"] for f in ("p.json", "pp.json"))
    assert ppl == ppl_p  # the toy's widths are powers of two: every rule is H_p alone, the same bits


def test_solver_option_errors(capsys, tmp_path, tiny_dir):
    rc, _, err = _run(capsys, "-q", "quantize", str(tiny_dir), "--solver", "ldlq", "--calib-samples", "0",
                      "--out", str(tmp_path / "o"))
    assert rc == 2 and "--calib-samples" in err
    rc, _, err = _run(capsys, "-q", "quantize", str(tiny_dir), "--act-order", "--solver", "rtn", "--out",
                      str(tmp_path / "o"))
    assert rc == 2 and "--act-order needs --solver ldlq" in err
    assert not (tmp_path / "o").exists()


def test_trellis_ldlq_rht_end_to_end(capsys, tmp_path, tok_model_dir):
    d, text = tok_model_dir
    rc, _, err = _run(capsys, "-q", "quantize", str(d), "--method", "trellis", "--bits", "2", "--trellis-l", "8",
                      "--trellis-tile", "4", "--solver", "ldlq", "--incoherence", "rht", "--calib", str(text), "--calib-samples", "4",
                      "--calib-seqlen", "32", "--out", str(tmp_path / "t"))
    assert rc == 0, err
    q = json.loads((tmp_path / "t" / "config.json").read_text())["quantization_config"]["tensors"]
    assert {m["format"] for m in q.values()} == {"rht"} and {m["inner"]["format"] for m in q.values()} == {"trellis-packed"}
    rep = json.loads((tmp_path / "t" / "report.json").read_text())
    assert all(0 < t["proxy"] < 1 for t in rep["quantized_tensors"])
    # the checkpoint loads back (uint16 trellis words) and scores a finite PPL
    rc, _, err = _run(capsys, "-q", "eval", "ppl", str(tmp_path / "t"), "--data", str(text), "--seqlen", "32",
                      "--max-tokens", "256", "--json", str(tmp_path / "p.json"))
    assert rc == 0, err
    assert 1 < json.loads((tmp_path / "p.json").read_text())["ppl"] < 1e4
    rc, _, err = _run(capsys, "-q", "quantize", str(d), "--method", "trellis", "--bits", "5", "--out", str(tmp_path / "x"))
    assert rc == 2 and "--bits 5" in err


def test_no_verify_skips_the_digest_check(capsys, tmp_path, tiny_dir):
    out = tmp_path / "q"
    rc, _, err = _run(capsys, "-q", "quantize", str(tiny_dir), "--group-size", "32", "--solver", "rtn", "--out",
                      str(out))
    assert rc == 0, err
    import struct

    shard = out / "model.safetensors"
    with open(shard, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    key = "model.layers.0.self_attn.q_proj.weight_codes"
    with open(shard, "r+b") as f:  # flip one code byte: the weights change, the file stays well-formed
        f.seek(8 + n + header[key]["data_offsets"][0])
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    rc, _, err = _run(capsys, "-q", "inspect", str(out))
    assert rc == 2 and key in err and "sha256" in err
    rc, _, err = _run(capsys, "-q", "inspect", str(out), "--no-verify")
    assert rc == 0, err


def test_additive_end_to_end_dense_and_shared_experts(capsys, caplog, tmp_path, tok_model_dir):
    # --method additive with no solver flag: calibrated, the encoder gets the damped Hessian (solver "ldlq" in the
    # report: no column feedback, solvers.solve), no rotation. The checkpoint, decoded by hand from its safetensors
    # (2x8: one byte per code), is what moequant.load gives, bit for bit; the MoE's experts share one codebook set.
    from safetensors.torch import load_file

    import moequant
    from conftest import toy_lines, toy_tok_model, toy_words
    from moequant.nn.packed import packed_names, packed_tensor

    caplog.set_level(logging.INFO, logger="moequant")
    olmoe, text = tok_model_dir
    tok, llama = toy_tok_model("llama", toy_lines(toy_words(4000)))
    llama.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    for src, extra in ((tmp_path / "llama", []), (olmoe, ["--share", "layer", "--codebook-bits", "8"])):
        out = tmp_path / f"a_{src.name}"
        rc, _, err = _run(capsys, "-q", "quantize", str(src), "--method", "additive", "--codebooks", "2x8", "--group",
                          "8", "--init", "oa-em", "--beam", "4", "--search-rounds", "1", *extra, "--calib", str(text),
                          "--calib-samples", "4", "--calib-seqlen", "32", "--out", str(out))
        assert rc == 0, err
        rep = json.loads((out / "report.json").read_text())
        assert rep["solver"]["solver"] == "ldlq" and rep["solver"]["incoherence"] == "none" and rep["calibration"]
        assert all(0 < t["proxy"] < 0.1 for t in rep["quantized_tensors"])
        metas = json.loads((out / "config.json").read_text())["quantization_config"]["tensors"]
        files = {}
        for f in out.glob("*.safetensors"):
            files.update(load_file(f))
        model = moequant.load(out)
        loaded = {f"{name}.{p}": packed_tensor(mod, p) for name, mod in model.named_modules() for p in packed_names(mod)}
        assert set(loaded) == set(metas) and len(metas) == len(rep["quantized_tensors"])
        for name, meta in metas.items():
            assert meta["format"] == "additive-packed" and meta["share"] == ("layer" if extra else "expert")
            assert meta["codebook_bits"] == (8 if extra else 16)
            *lead, n, k = meta["shape"]
            codes = files[f"{name}_codes"].to(torch.int64).reshape(-1, n, k // 8, 2)  # [E, N, G, M]
            books = files[f"{name}_codebooks"].float()
            assert books.shape == ((2, 256, 8) if not lead or extra else (*lead, 2, 256, 8))
            if extra:  # int8 codebooks, one float16 step per codebook
                assert files[f"{name}_codebooks"].dtype == torch.int8 and files[f"{name}_codebook_scale"].shape == (2,)
                books = books * files[f"{name}_codebook_scale"].float()[:, None, None]
            books = books.reshape(-1, 2, 256, 8)
            scale = files[f"{name}_scale"].float().reshape(-1, n)
            by_hand = torch.stack([scale[e, :, None] * (books[e % books.shape[0], 0][codes[e, :, :, 0]]
                                                        + books[e % books.shape[0], 1][codes[e, :, :, 1]]).reshape(n, k)
                                   for e in range(codes.shape[0])]).reshape(meta["shape"])
            assert torch.equal(loaded[name].dequantize(), by_hand), name
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 5, 9, 14]])).logits).all()
    assert any("recipe: additive2x8-g8-oa-em-shared-cb8, beam search under the Hessian" in r.message
               for r in caplog.records)
    rc, _, err = _run(capsys, "-q", "quantize", str(olmoe), "--method", "additive", "--share", "layer", "--incoherence",
                      "rht", "--calib", str(text), "--calib-samples", "4", "--calib-seqlen", "32", "--out",
                      str(tmp_path / "x"))
    assert rc == 2 and "cannot follow" in err and not (tmp_path / "x").exists()
