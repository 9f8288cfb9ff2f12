"""Distillation with the codes fixed (``moequant finetune --method kd``): every packed format opened for training
decodes to its stored tensor bit for bit, trains its continuous parameters, keeps its codes, and packs back to
exactly what it computed with; the run on tiny int and nf4 models lowers the KL, touches only ``--layers``, and
resumes byte-identically. Trellis runs end to end under bcjr, ste and kd (load, KL, eval ppl), and a bcjr run
resumes byte-identically under its temperature schedule."""

import json

import pytest
import torch

from conftest import save_toy_olmoe
from moequant.cli import main
from moequant.codecs.config import AdditiveConfig, GgufConfig, LutConfig, UniformConfig
from moequant.codecs.kquant_pack import unpack_blocks
from moequant.finetune.pv import AdamState, adam_step, rate_for
from moequant.finetune.trainable import open_tensor
from moequant.formats.registry import encode
from moequant.formats.rotated import RotatedTensor
from moequant.solvers.incoherence import Incoherence

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    "int3-sym-g16": UniformConfig(bits=3, group_size=16, symmetric=True),
    "int2-asym-g16": UniformConfig(bits=2, group_size=16, symmetric=False),
    "int4-asym-row-bf16": UniformConfig(bits=4, group_size=-1, symmetric=False, scale_dtype="bfloat16"),
    "int4-sym-f32": UniformConfig(bits=4, group_size=32, symmetric=True, scale_dtype="float32"),
    "nf4": LutConfig(lut="nf4", block_size=32),
    "fp4-dq": LutConfig(lut="fp4", block_size=16, double_quant=True, dq_block_size=8),
    "q4_k": GgufConfig(qtype="q4_k"),  # two-level, min: d, dmin train; 6-bit scales and mins fixed
    "q3_k": GgufConfig(qtype="q3_k"),  # two-level, symmetric
    "q5_1": GgufConfig(qtype="q5_1"),  # one fp16 d and offset m per 32
    "q8_0": GgufConfig(qtype="q8_0"),
    "additive": AdditiveConfig(M=2, B=4, g=8, beam=2, init="kmeans", search_rounds=0),
    "additive-cb8-shared": AdditiveConfig(M=2, B=4, g=8, beam=2, init="kmeans", search_rounds=0, share="layer",
                                          codebook_bits=8),  # int8 codebooks trained straight through their grid
}


def _weights(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * (0.5 + torch.rand(*shape[:-1], 1, generator=g))  # rows of varied scale


def _fixed(qt):
    """The data a kd step must leave alone: codes (and integer zero points / sub-block scales)."""
    if qt.format_id == "rht":
        return {"signs": torch.cat([qt.data["sign_in"].flatten(), qt.data["sign_out"].flatten()]), **_fixed(qt.inner)}
    if qt.format_id.startswith("gguf-"):
        codes, p = unpack_blocks(qt.stored, qt.data["blocks"])
        return {"codes": codes, **{k: v for k, v in p.parts().items() if k in ("scales", "mins")}}
    if qt.format_id == "additive-packed":
        return {"codes": qt.data["codes"]}
    return {k: v for k, v in qt.data.items() if k in ("codes", "zero", "absmax_codes")}


def _train(t, w, x, steps=8, lr=1e-2):
    """``steps`` Adam steps on the output MSE of ``t`` against ``w`` on inputs ``x`` -> (loss before, after)."""
    states = {k: AdamState.zeros_like(p) for k, p in t.parameters().items()}
    rates = {k: rate_for(p, lr) for k, p in t.parameters().items()}
    losses = []
    for _ in range(steps + 1):
        loss = (x @ t.weight().transpose(-1, -2) - x @ w.transpose(-1, -2)).pow(2).mean()
        losses.append(float(loss.detach()))
        loss.backward()
        with torch.no_grad():
            for k, p in t.parameters().items():
                p.copy_(adam_step(p, p.grad, states[k], rates[k]))
                p.grad = None
    return losses[0], losses[-1]


@pytest.mark.parametrize("rotate", [False, True], ids=["plain", "rht"])
@pytest.mark.parametrize("shape", [(8, 256), (2, 8, 256)], ids=["linear", "experts"])
@pytest.mark.parametrize("case", list(CASES))
def test_kd_trainable_decodes_trains_and_packs_back(case, shape, rotate):
    w = _weights(shape)
    cfg = CASES[case]
    if rotate:
        inc = Incoherence.make(shape, seed=3, per_expert=len(shape) == 3)
        qt = RotatedTensor.wrap(encode(inc.weight(w), cfg), inc)
    else:
        qt = encode(w, cfg)
    t = open_tensor("kd", "w", qt)
    assert torch.equal(t.weight().detach(), qt.dequantize())  # opens to exactly the stored tensor
    same = t.packed()
    assert type(same) is type(qt) and same.attrs == qt.attrs
    assert all(torch.equal(v, qt.data[k]) for k, v in same.data.items())  # and packs back to the same bytes
    x = torch.randn(64, shape[-1], generator=torch.Generator().manual_seed(1))
    before, after = _train(t, 1.1 * w, x)  # a target 10% larger: within reach of scales alone
    assert after < 0.9 * before, (before, after)  # the continuous parameters learn (measured x0.07 to x0.86)
    new = t.packed()
    assert not torch.equal(new.dequantize(), qt.dequantize())  # not vacuous: the stored values moved
    assert torch.equal(new.dequantize(), t.weight().detach())  # the model computed with what is stored
    fixed, fixed_new = _fixed(qt), _fixed(new)
    assert fixed and all(torch.equal(v, fixed_new[k]) for k, v in fixed.items())  # codes unchanged bit for bit


def test_gguf_f16_fallback_trains_its_values():
    # q4_k rows of 40 weights: no block divides them, so llama.cpp (and we) store float16 values
    w = _weights((6, 40))
    qt = encode(w, GgufConfig(qtype="q4_k"))
    assert qt.stored.kind == "float"
    t = open_tensor("kd", "w", qt)
    assert list(t.parameters()) == ["values"] and torch.equal(t.weight().detach(), qt.dequantize())
    x = torch.randn(32, 40, generator=torch.Generator().manual_seed(1))
    before, after = _train(t, w + 0.1, x)
    assert after < before
    assert torch.equal(t.packed().dequantize(), t.weight().detach())


def test_straight_through_rounds_to_the_stored_dtype_and_passes_the_gradient():
    from moequant.finetune.packed_trainables import straight_through

    t = torch.tensor([1.0001, 3.14159, -2e-5, 70000.0], requires_grad=True)
    for dtype in (torch.float16, torch.bfloat16):
        y = straight_through(t, dtype)
        assert torch.equal(y.detach(), t.detach().to(dtype).float())  # exactly the rounded values
        (y * torch.arange(1.0, 5.0)).sum().backward()
        assert torch.equal(t.grad, torch.arange(1.0, 5.0))  # identity gradient
        t.grad = None


# ------------------------------------------------------------------------------------------------ the run


def _quantize(tmp, name, src, text, *method):
    run = tmp / name
    rc = main(["-q", "quantize", str(src), *method, "--calib", str(text), "--calib-samples", "8", "--calib-seqlen",
               "32", "--out", str(run)])
    assert rc == 0
    return run


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kd")
    src, text = save_toy_olmoe(tmp, "olmoe", 3000)
    return tmp, src, text


@pytest.fixture(scope="module")
def int_run(toy):
    tmp, src, text = toy
    return _quantize(tmp, "int", src, text, "--method", "int", "--bits", "2", "--group-size", "32", "--incoherence",
                     "rht")


@pytest.fixture(scope="module")
def nf4_run(toy):
    tmp, src, text = toy
    return _quantize(tmp, "nf4", src, text, "--method", "nf4", "--block-size", "32")


def _packed(run):
    """``{tensor name: QuantizedTensor}`` of a checkpoint, as moequant.load holds them."""
    import moequant
    from moequant.nn.packed import packed_names, packed_tensor

    model = moequant.load(run)
    return {f"{m}.{p}": packed_tensor(mod, p) for m, mod in model.named_modules() for p in packed_names(mod)}, model


@pytest.mark.parametrize("which", ["int_run", "nf4_run"])
def test_kd_lowers_kl_keeps_codes_and_loads(request, capsys, tmp_path, which):
    from moequant.calib.data import CalibData, calibration_tokens
    from moequant.finetune.loop import mean_kl
    from moequant.models.loader import load_model

    run = request.getfixturevalue(which)
    out = tmp_path / "kd"
    rc = main(["finetune", str(run), "--method", "kd", "--steps", "12", "--lr", "1e-2", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rep = json.loads((out / "report.json").read_text())
    ft = rep["finetune"]
    assert f"{out}: kd on all layers, 12 steps, {12 * 4 * 32:,} tokens, KL " in cap.out
    assert ft["method"] == "kd" and ft["tokens_seen"] == 12 * 4 * 32 and ft["seconds"] > 0
    assert "changed_fraction" not in ft and "tau_schedule" not in ft and len(ft["train_loss"]) == 12
    # measured 0.00076 -> 0.00037 (int2 + rht), 0.00013 -> 0.00005 (nf4)
    assert ft["loss_after"] < 0.6 * ft["loss_before"], (ft["loss_before"], ft["loss_after"])
    before, _ = _packed(run)
    after, model = _packed(out)
    assert before.keys() == after.keys() and len(after) == len(ft["trained_tensors"])
    for name, qt in after.items():
        old = before[name]
        assert qt.format_id == old.format_id and qt.attrs == old.attrs
        assert all(torch.equal(v, _fixed(old)[k]) for k, v in _fixed(qt).items())  # codes bit for bit
        assert not torch.equal(qt.dequantize(), old.dequantize())  # every tensor trained
    # the output is a normal checkpoint: loaded natively it gives the reported KL exactly
    teacher, tok, _ = load_model(rep["model"])
    tokens = calibration_tokens(tok, CalibData(**ft["calib"]))
    assert mean_kl(model, teacher, tokens[:ft["eval_windows"]], ft["batch"]) == ft["loss_after"]


@pytest.mark.parametrize("layer", [0, 1])
def test_kd_layers_trains_only_those_layers(int_run, tmp_path, layer):
    # layer 0: the gradient passes back through layer 1's frozen packed (rht) tensors, decoded for autograd
    import moequant
    from moequant.finetune.loop import FinetuneJob, FinetuneSettings, run_finetune

    settings = FinetuneSettings(steps=3, method="kd", lr=1e-2, layers=(layer,), eval_windows=2)
    ft = run_finetune(FinetuneJob(int_run, tmp_path / "l", settings, progress=False))["finetune"]
    prefix = f"model.layers.{layer}."
    assert ft["layers"] == [layer] and ft["trained_tensors"]
    assert all(n.startswith(prefix) for n in ft["trained_tensors"])
    before, after = moequant.load(int_run).state_dict(), moequant.load(tmp_path / "l").state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(prefix) for k in changed)
    assert any("norm" in k for k in changed) and any(k.endswith("_scale") for k in changed)
    assert ft["loss_after"] < ft["loss_before"]


def test_bfloat16_norms_accumulate_steps_below_their_resolution(toy, tmp_path):
    # norms stored in bfloat16 at 1.0 (spacing 2^-8 below it): steps of 1e-3 each would round away one by one;
    # the float32 master copy accumulates them, and the model computes with the rounded values
    import moequant
    from moequant.finetune.loop import FinetuneJob, FinetuneSettings, run_finetune

    tmp, src, text = toy
    run = _quantize(tmp_path, "bf16", src, text, "--method", "nf4", "--block-size", "32", "--kept-dtype", "bfloat16")
    settings = FinetuneSettings(steps=8, method="kd", lr=1e-3, eval_windows=2)
    run_finetune(FinetuneJob(run, tmp_path / "o", settings, progress=False))
    before, after = moequant.load(run).state_dict(), moequant.load(tmp_path / "o").state_dict()
    norms = [k for k in before if "norm" in k]
    assert norms and all(before[k].dtype == after[k].dtype == torch.bfloat16 for k in norms)
    assert all(not torch.equal(before[k], after[k]) for k in norms)


def _interrupt_and_resume(run, settings, tmp_path, stop_at, before_resume=None):
    """The run uninterrupted into ``a``; into ``b`` stopped by an interrupt after step ``stop_at``, then
    (``before_resume(out b)`` first, when given) resumed. Asserts both end with the same losses and checkpoint
    bytes -> (result a, log lines of the interrupted run)."""
    from moequant.finetune.loop import FinetuneJob, run_finetune, work_dir_for

    a = run_finetune(FinetuneJob(run, tmp_path / "a", settings, progress=False))

    def stop(step, _):
        if step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune(FinetuneJob(run, tmp_path / "b", settings, progress=False), on_step=stop)
    work = work_dir_for(tmp_path / "b")
    saved = json.loads((work / "state.json").read_text())["step"]
    assert saved == stop_at // settings.save_every * settings.save_every
    logged = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert len(logged) == stop_at  # the steps after the saved one ran; their lines are dropped on resume
    if before_resume is not None:
        before_resume(tmp_path / "b")
    b = run_finetune(FinetuneJob(run, tmp_path / "b", settings, resume=True, progress=False))
    assert not work.exists()
    assert a["finetune"]["train_loss"] == b["finetune"]["train_loss"]
    files = [p.name for p in sorted((tmp_path / "a").iterdir()) if p.suffix == ".safetensors" or p.name == "config.json"]
    assert len(files) >= 2
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    # the result names both processes that trained it and their code; the straight run names none
    assert [r["code_sha256"] for r in b["job_runs"]] == [b["code_sha256"]] * 2 and "job_runs" not in a
    assert json.loads((tmp_path / "b" / "report.json").read_text())["job_runs"] == b["job_runs"]
    return a, logged


def test_kd_resume_ends_byte_identical(nf4_run, tmp_path):
    from moequant.finetune.loop import FinetuneSettings

    settings = FinetuneSettings(steps=5, method="kd", lr=1e-2, save_every=2, eval_windows=2)
    _interrupt_and_resume(nf4_run, settings, tmp_path, stop_at=3)


def test_a_save_after_every_step_by_time_resumes_from_the_step_it_saved(nf4_run, tmp_path):
    """--save-minutes 0: the state is saved after every step whatever --save-every says, so the resumed run
    continues from the step the interrupt hit (not from step 0) and still ends byte-identical; the save policy is
    not part of the fingerprint: a state written with another save_every in it (as older versions wrote) resumes."""
    from moequant.finetune.loop import FinetuneJob, FinetuneSettings, run_finetune, work_dir_for

    settings = FinetuneSettings(steps=5, method="kd", lr=1e-2, save_every=50, eval_windows=2)
    a = run_finetune(FinetuneJob(nf4_run, tmp_path / "a", settings, progress=False, save_minutes=None))

    def stop(step, _):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune(FinetuneJob(nf4_run, tmp_path / "b", settings, progress=False, save_minutes=0), on_step=stop)
    meta_path = work_dir_for(tmp_path / "b") / "state.json"
    meta = json.loads(meta_path.read_text())
    assert meta["step"] == 3 and "save_every" not in meta["fingerprint"]["settings"]
    meta["fingerprint"]["settings"]["save_every"] = 2
    meta_path.write_text(json.dumps(meta))
    resumed = FinetuneSettings(steps=5, method="kd", lr=1e-2, save_every=7, eval_windows=2)
    seen: list[int] = []
    b = run_finetune(FinetuneJob(nf4_run, tmp_path / "b", resumed, resume=True, progress=False),
                     on_step=lambda step, _: seen.append(step))
    assert seen == [4, 5] and len(b["job_runs"]) == 2
    assert len(b["finetune"]["train_loss"]) == 5 and a["finetune"]["train_loss"] == b["finetune"]["train_loss"]
    files = [p.name for p in sorted((tmp_path / "a").iterdir()) if p.suffix == ".safetensors"]
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_save_minutes_must_not_be_negative(nf4_run, tmp_path):
    from moequant.finetune.loop import FinetuneJob, FinetuneSettings

    with pytest.raises(ValueError, match="--save-minutes must be >= 0, got -1"):
        FinetuneJob(nf4_run, tmp_path / "o", FinetuneSettings(steps=1, method="kd"), save_minutes=-1)


# ------------------------------------------------------------------------------------------------ trellis runs


@pytest.fixture(scope="module")
def trellis_run(toy):
    tmp, src, text = toy
    return _quantize(tmp, "trellis", src, text, "--method", "trellis", "--bits", "2", "--trellis-l", "8")


def _trellis_tensors(run):
    out, model = _packed(run)
    assert out and all(qt.format_id == "rht" and qt.inner.format_id == "trellis-packed" for qt in out.values())
    return out, model


@pytest.mark.parametrize("method", ["bcjr", "ste", "kd", "pv"])
def test_trellis_methods_end_to_end(capsys, trellis_run, tmp_path, method):
    import math

    from moequant.calib.data import CalibData, calibration_tokens
    from moequant.finetune.loop import mean_kl
    from moequant.models.loader import load_model

    out = tmp_path / method
    tau = ["--tau", "0.3:0.05"] if method == "bcjr" else []
    # a tile of these tiny tensors is over 1% of the codes; a large straight-through step moves the target off the codes
    tau += ["--max-change", "0.5", "--code-lr", "0.3"] if method == "pv" else []
    rc = main(["finetune", str(trellis_run), "--method", method, "--steps", "2", "--lr", "1e-2", *tau,
               "--eval-windows", "4", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rep = json.loads((out / "report.json").read_text())
    ft = rep["finetune"]
    assert ft["method"] == method and len(ft["train_loss"]) == 2 and ft["tokens_seen"] == 2 * 4 * 32
    if method == "bcjr":
        assert ft["tau_schedule"]["tau"] == [0.3, 0.05] and ", tau 0.3 -> 0.05 (cosine), " in cap.out
    else:
        assert "tau_schedule" not in ft
    before, _ = _trellis_tensors(trellis_run)
    after, model = _trellis_tensors(out)
    assert before.keys() == after.keys()
    for name, qt in after.items():
        old = before[name]
        assert qt.attrs == old.attrs and qt.bits_per_weight() == old.bits_per_weight()
        assert torch.equal(qt.data["sign_in"], old.data["sign_in"])
        if method == "kd":
            assert torch.equal(qt.data["inner_words"], old.data["inner_words"])  # codes fixed bit for bit
    if method == "pv":  # QTIP-style re-encoding between the P-steps: whole tiles, at most --max-change of the codes
        assert len(ft["changed_fraction"]) == 2 and all(0 < f <= 0.5 for f in ft["changed_fraction"]), ft
        assert any(not torch.equal(qt.data["inner_words"], before[n].data["inner_words"]) for n, qt in after.items())
    # a normal checkpoint: loaded natively it gives the reported KL exactly, and eval ppl reads it
    teacher, tok, _ = load_model(rep["model"])
    tokens = calibration_tokens(tok, CalibData(**ft["calib"]))
    assert mean_kl(model, teacher, tokens[:4], ft["batch"]) == ft["loss_after"]
    res = tmp_path / "ppl.json"
    assert main(["-q", "eval", "ppl", str(out), "--data", str(trellis_run.parent / "text.txt"), "--seqlen", "32",
                 "--max-tokens", "256", "--json", str(res)]) == 0
    assert math.isfinite(json.loads(res.read_text())["ppl"])


def test_bcjr_resume_ends_byte_identical_and_keeps_its_schedule(trellis_run, tmp_path):
    from moequant.errors import MoequantError
    from moequant.finetune.loop import FinetuneJob, FinetuneSettings, run_finetune

    common = dict(method="bcjr", lr=1e-2, tau=(0.3, 0.05), layers=(0,), save_every=1, eval_windows=2)
    settings, longer = FinetuneSettings(steps=2, **common), FinetuneSettings(steps=3, **common)

    def refuse_other_steps(out):
        with pytest.raises(MoequantError, match="differs in schedule"):  # more steps would stretch the anneal
            run_finetune(FinetuneJob(trellis_run, out, longer, resume=True, progress=False))

    a, logged = _interrupt_and_resume(trellis_run, settings, tmp_path, stop_at=1, before_resume=refuse_other_steps)
    assert [x["tau"] for x in logged] == [0.3]  # and the resumed step ran at 0.05: the bytes match
    assert a["finetune"]["tau_schedule"]["tau"] == [0.3, 0.05]


def test_kd_layer_wise_loss_trains_each_layer_to_its_unquantized_self(int_run, tmp_path, capsys):
    from moequant.finetune.loop import FinetuneJob, FinetuneSettings, run_finetune

    out = tmp_path / "kdl"
    rc = main(["finetune", str(int_run), "--method", "kd", "--loss", "layer", "--steps", "12", "--lr", "1e-2",
               "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert f"{out}: kd on all layers, layer-wise loss, 12 steps, " in cap.out
    ft = json.loads((out / "report.json").read_text())["finetune"]
    assert ft["objective"] == "layer" and ft["train_loss_is"].startswith("mean over the trained decoder layers i")
    first, last = sum(ft["train_loss"][:3]) / 3, sum(ft["train_loss"][-3:]) / 3
    # measured: layer loss 0.0269 -> 0.0155 per step (first/last three 0.0239 / 0.0170), KL 0.00076 -> 0.00044
    assert last < 0.8 * first, ft["train_loss"]
    assert ft["loss_after"] < 0.7 * ft["loss_before"]  # the end-to-end KL follows
    # the same settings under the KL objective train differently (the objective is not ignored)
    kl = run_finetune(FinetuneJob(int_run, tmp_path / "kl", FinetuneSettings(steps=12, method="kd", lr=1e-2),
                                  progress=False))["finetune"]
    assert kl["objective"] == "kl" and kl["train_loss"][0] != ft["train_loss"][0]
