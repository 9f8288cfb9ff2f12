"""PV-tuning: one P-step and one V-step on a tensor, the finetune run end to end (KL falls, the output loads bit
for bit, resume ends byte-identical), and its one-line refusals."""

import json

import pytest
import torch

from conftest import save_toy_olmoe
from moequant.cli import main
from moequant.codecs.additive import decode_groups, reconstruct
from moequant.codecs.config import AdditiveConfig
from moequant.finetune.pv import AdamState, _nearest, adam_step, coordinate_descent, rate_for, st_target, v_step
from moequant.finetune.packed_trainables import AdditiveTrainable
from moequant.formats.additive import AdditiveTensor

pytestmark = pytest.mark.usefixtures("one_thread")


def _encoded(shape, cfg, seed=0):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))  # [..., N, K]
    return w, AdditiveTensor.encode(w, cfg)


def test_p_step_lowers_layer_loss():
    # a tiny linear [16, 32], 1x4 codebooks in groups of 8; loss: the layer's output MSE on 64 inputs
    cfg = AdditiveConfig(M=1, B=4, g=8, beam=2, init="kmeans", search_rounds=0)
    w, qt = _encoded((16, 32), cfg)
    t = AdditiveTrainable(qt)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    codes0 = t.codes.clone()
    assert torch.equal(t.weight().detach(), qt.dequantize())  # the trainable decodes to the stored tensor

    def loss():
        return (x @ t.weight().T - x @ w.T).pow(2).mean()

    before = loss()
    before.backward()
    before = float(before.detach())
    with torch.no_grad():
        for p in t.parameters().values():
            p.copy_(adam_step(p, p.grad, AdamState.zeros_like(p), rate_for(p, 1e-2)))
    after = float(loss().detach())
    assert after < 0.995 * before  # measured 0.989 of the loss after one step
    assert torch.equal(t.codes, codes0)  # a P-step never touches the codes


def test_st_target_steps_by_rate_in_rms_without_momentum():
    # AQLM's code optimiser: Adam with beta1 = 0, scaled so that the step's RMS over the tensor is the rate
    gen = torch.Generator().manual_seed(3)
    w_hat, delta = torch.randn(16, 32, generator=gen), torch.randn(16, 32, generator=gen) * 0.01
    grad = torch.randn(16, 32, generator=gen) * 1e-2  # small gradients: the step's size must not follow them
    state = AdamState.zeros_like(w_hat)
    t1 = st_target(w_hat, delta, grad, state, 0.003)
    step = w_hat + delta - t1  # the first step of a bias-corrected Adam is sign(grad), so RMS 1 before scaling
    assert torch.allclose(step, 0.003 * grad.sign(), atol=1e-5)  # ε and float32 rounding
    assert abs(float(step.pow(2).mean().sqrt()) - 0.003) < 1e-7
    grad2 = torch.randn(16, 32, generator=gen) * 100  # ten thousand times larger: still RMS 0.003
    assert abs(float((w_hat - st_target(w_hat, torch.zeros_like(w_hat), grad2, state, 0.003)).pow(2).mean().sqrt())
               - 0.003) < 1e-6
    # no momentum: a zero gradient moves nothing (with beta1 = 0.9 it would keep going the last step's way)
    assert torch.equal(st_target(w_hat, delta, torch.zeros_like(grad), state, 0.003), w_hat + delta)
    assert state.t == 3


@pytest.mark.parametrize("shape,share", [((24, 32), "expert"), ((3, 16, 32), "expert"), ((3, 16, 32), "layer")])
def test_v_step_caps_changes_and_never_raises_the_objective(shape, share):
    cfg = AdditiveConfig(M=2, B=4, g=8, beam=2, init="kmeans", search_rounds=0, share=share)
    _, qt = _encoded(shape, cfg)
    t = AdditiveTrainable(qt)
    e, n = t.codes.shape[:2]
    w_hat = qt.dequantize().reshape(e, n, -1)  # [E, N, K]
    target = w_hat + torch.randn(w_hat.shape, generator=torch.Generator().manual_seed(2)) * w_hat.std()
    books = t._books(t.books.detach())
    scale = t.scale.detach()

    def objective(codes):
        return float((reconstruct(codes, books, scale) - target).pow(2).sum())

    base = objective(t.codes)
    fracs = []
    for cap in (0.0, 0.03, 1.0):
        new, frac = v_step(target, t.codes, books, scale, cap)
        assert frac == float((new != t.codes).sum()) / t.codes.numel() <= cap
        assert objective(new) <= base
        fracs.append(frac)
        if cap:
            assert 0 < frac and objective(new) < base  # not vacuous: codes move and the error falls
    assert fracs[0] == 0 and fracs[1] < fracs[2]  # 1.0: every useful change


def test_v_step_unbounded_single_codebook_is_the_nearest_codeword():
    # M = 1, no cap: every group's code is the brute-force nearest codeword to target / scale
    cfg = AdditiveConfig(M=1, B=5, g=8, beam=2, init="kmeans", search_rounds=0)
    _, qt = _encoded((20, 32), cfg, seed=3)
    t = AdditiveTrainable(qt)
    target = torch.randn(1, 20, 32, generator=torch.Generator().manual_seed(4))
    books, scale = t._books(t.books.detach()), t.scale.detach()
    new, _ = v_step(target, t.codes, books, scale, 1.0, sweeps=1)
    y = (target / scale[..., None]).reshape(-1, 8)  # [P, g]
    nearest = torch.cdist(y, books[0]).argmin(-1)  # [P]
    old_err = (decode_groups(t.codes, books).reshape(-1, 8) - y).pow(2).sum(-1)
    new_err = (books[0][nearest] - y).pow(2).sum(-1)
    want = torch.where(new_err < old_err, nearest, t.codes.reshape(-1))
    assert torch.equal(new.reshape(-1), want)


def _full_sweeps(y, codes, books, sweeps):
    """Coordinate descent as first written: every group searched for every codebook in every sweep, the remainder
    from ``decode_groups`` of all the codes less codebook m's. Returns the codes and how many groups each sweep
    changed."""
    e, n, G, m_count = codes.shape
    out, changed = codes.clone(), []
    for _ in range(sweeps):
        before = out.clone()
        for m in range(m_count):
            mine = decode_groups(out[..., m:m + 1], books[..., m:m + 1, :, :])
            rest = y - (decode_groups(out, books) - mine)
            for i in range(e):
                book = books[m] if books.dim() == 3 else books[i, m]
                out[i, ..., m] = _nearest(rest[i].reshape(-1, 8), book).reshape(n, G)
        changed.append(int((out != before).any(-1).sum()))
    return out, changed


@pytest.mark.parametrize("per_expert", [False, True])
def test_coordinate_descent_searching_only_what_moved_matches_full_sweeps(per_expert):
    # later sweeps search only the groups the sweep before changed: the codes must be those of searching every
    # group every time, to the bit, on a problem where the second and third sweeps still change codes
    gen = torch.Generator().manual_seed(5)
    e, n, G, m_count, c = 3, 16, 6, 3, 16
    books = torch.randn(*((e,) if per_expert else ()), m_count, c, 8, generator=gen)  # [(E,) M, C, g]
    codes = torch.randint(0, c, (e, n, G, m_count), generator=gen)  # [E, N, G, M]
    y = torch.randn(e, n, G, 8, generator=gen) * 2  # [E, N, G, g]
    want, changed = _full_sweeps(y, codes, books, 3)
    assert changed[1] > 0 and changed[2] > 0  # not vacuous: the later sweeps have work
    got, start, final = coordinate_descent(y, codes, books, 3)
    assert torch.equal(got, want)
    assert torch.equal(start, decode_groups(codes, books)) and torch.equal(final, decode_groups(got, books))


# ------------------------------------------------------------------------------------------------ the run

@pytest.fixture(scope="module")
def additive_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pv")
    src, text = save_toy_olmoe(tmp, "olmoe", 3000)
    run = tmp / "run"
    rc = main(["-q", "quantize", str(src), "--method", "additive", "--codebooks", "1x6", "--group", "8", "--init",
               "kmeans", "--beam", "2", "--search-rounds", "1", "--share", "layer", "--calib", str(text),
               "--calib-samples", "8", "--calib-seqlen", "32", "--out", str(run)])
    assert rc == 0
    return run


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".safetensors" or p.name == "config.json"}


def test_finetune_lowers_kl_and_loads_bit_exact(capsys, additive_run, tmp_path):
    from safetensors.torch import load_file

    import moequant
    from moequant.finetune.loop import mean_kl
    from moequant.models.loader import load_model
    from moequant.nn.packed import packed_names, packed_tensor

    out = tmp_path / "pv"
    rc = main(["-q", "finetune", str(additive_run), "--method", "pv", "--steps", "20", "--lr", "1e-2", "--code-lr", "0.05",
               "--max-change", "0.01", "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    ft = json.loads((out / "report.json").read_text())["finetune"]
    assert len(ft["train_loss"]) == 20 and len(ft["changed_fraction"]) == 20
    assert all(0 <= c <= 0.01 for c in ft["changed_fraction"]) and max(ft["changed_fraction"]) > 0
    # the summary line shows fractions of ~1e-5 too (four decimals printed 0.0000 for them)
    lo, hi = min(ft["changed_fraction"]), max(ft["changed_fraction"])
    assert f"codes changed per V-step {lo:.1e}-{hi:.1e}," in cap.out
    assert ft["loss_after"] < 0.7 * ft["loss_before"]  # measured 0.00110 -> 0.00063 (0.57)
    model = moequant.load(out)
    stored = {}
    for f in out.glob("*.safetensors"):
        stored.update(load_file(f))
    before = moequant.load(additive_run)
    moved = 0
    for name, mod in model.named_modules():
        for p in packed_names(mod):
            qt = packed_tensor(mod, p)
            for d, v in qt.data.items():
                assert torch.equal(v, stored[f"{name}.{p}_{d}"])
            old = packed_tensor(before.get_submodule(name), p)
            moved += int((qt.codes() != old.codes()).sum())
            assert not torch.equal(qt.data["codebooks"], old.data["codebooks"])  # the P-steps moved them
    assert moved > 0  # and the V-steps some codes
    teacher, tok, _ = load_model(json.loads((out / "report.json").read_text())["model"])
    from moequant.calib.data import CalibData, calibration_tokens

    c = ft["calib"]
    tokens = calibration_tokens(tok, CalibData(**c))
    assert mean_kl(model, teacher, tokens[:ft["eval_windows"]], ft["batch"]) == ft["loss_after"]


def test_resume_ends_byte_identical(additive_run, tmp_path):
    from moequant.finetune.loop import FinetuneJob, FinetuneSettings, run_finetune, work_dir_for

    settings = FinetuneSettings(steps=6, method="pv", lr=1e-2, code_lr=0.2, max_change=0.02, save_every=2,
                                eval_windows=2)
    a = run_finetune(FinetuneJob(additive_run, tmp_path / "a", settings, progress=False))

    def stop(step, _):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune(FinetuneJob(additive_run, tmp_path / "b", settings, progress=False), on_step=stop)
    state = json.loads((work_dir_for(tmp_path / "b") / "state.json").read_text())
    assert state["step"] == 4 and not (tmp_path / "b").exists()
    b = run_finetune(FinetuneJob(additive_run, tmp_path / "b", settings, resume=True, progress=False))
    assert not work_dir_for(tmp_path / "b").exists()
    assert max(a["finetune"]["changed_fraction"]) > 0  # codes moved, so the V-step state was resumed too
    assert a["finetune"]["train_loss"] == b["finetune"]["train_loss"]
    assert _files(tmp_path / "a") == _files(tmp_path / "b") and len(_files(tmp_path / "a")) >= 2


def test_refusals(capsys, additive_run, tmp_path):
    def err(*argv):
        rc = main(["-q", "finetune", *argv])
        e = capsys.readouterr().err
        assert rc == 2 and e.count("\n") == 1, e
        return e

    pv = ("--method", "pv")
    assert "--steps must be >= 1" in err(str(additive_run), *pv, "--steps", "0", "--out", str(tmp_path / "o"))
    assert "no such run directory" in err(str(tmp_path / "nope"), *pv, "--steps", "1")
    bad = tmp_path / "copy"
    bad.mkdir()
    for f in additive_run.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    rep = json.loads((bad / "report.json").read_text())
    (bad / "report.json").write_text(json.dumps({**rep, "model": str(tmp_path / "gone")}))
    assert "gone" in err(str(bad), *pv, "--steps", "1", "--out", str(tmp_path / "o"))
    (bad / "report.json").write_text(json.dumps({**rep, "bits_per_weight": "two"}))  # read through its schema
    e = err(str(bad), *pv, "--steps", "1", "--out", str(tmp_path / "o"))
    assert "report.json" in e and "bits_per_weight" in e, e
    (bad / "report.json").unlink()
    assert "no report.json naming the model" in err(str(bad), *pv, "--steps", "1", "--out", str(tmp_path / "o"))
    (tmp_path / ".o.moequant-finetune").mkdir()
    assert "--resume" in err(str(additive_run), *pv, "--steps", "1", "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
