"""Trellis tensors opened for fine-tuning (finetune.trellis_trainable): BCJR-QAT, STE, KD."""

from __future__ import annotations

import pytest
import torch

from moequant.codecs.config import TrellisConfig
from moequant.codecs.trellis import code_values, encode_tiles, reconstruct, to_tiles
from moequant.finetune.trellis_trainable import (TRELLIS_TRAINABLES, TrellisBCJR, TrellisKD, TrellisSTE,
                                                 TrellisTrainOptions)
from moequant.formats.trellis import TrellisTensor

SMALL = TrellisConfig(bits=2, L=8, V=2, tile=16, code="hyb", Q=6)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def packed_input(shape=(32, 48), cfg=SMALL, seed=0) -> TrellisTensor:
    g = torch.Generator().manual_seed(seed)
    return TrellisTensor.encode(torch.randn(*shape, generator=g) * 0.02, cfg)


def same_packed(a, b) -> bool:
    return a.shape == b.shape and a.attrs == b.attrs and a.data.keys() == b.data.keys() and all(
        a.data[k].dtype == b.data[k].dtype and torch.equal(a.data[k], b.data[k]) for k in a.data)


def viterbi_decode(qt_like: TrellisTensor, code_w: torch.Tensor) -> torch.Tensor:
    """The codec's hardening of a code-domain ``[N, K]`` under ``qt_like``'s LUT and scale, decoded."""
    cfg = qt_like.config
    lut = qt_like.data.get("lut")
    lut = None if lut is None else lut.to(torch.float32)
    states = encode_tiles(to_tiles(code_w, cfg.tile).reshape(-1, cfg.tile ** 2), cfg, lut)
    nr, nc = code_w.shape[0] // cfg.tile, code_w.shape[1] // cfg.tile
    return reconstruct(states.reshape(nr, nc, -1), code_values(cfg, lut), qt_like.data["scale"], cfg.tile)


@pytest.mark.parametrize("cfg", [SMALL, TrellisConfig(bits=2, L=8, V=2, Q=6, tail_biting=False),
                                 TrellisConfig(bits=2, L=8, V=1, code="1mad")])
@pytest.mark.parametrize("shape", [(32, 48), (2, 16, 32)])
def test_untouched_kd_is_the_input_bit_for_bit(cfg, shape):
    qt = packed_input(shape, cfg)
    t = TrellisKD(qt)
    assert same_packed(t.packed(), qt)
    assert torch.equal(t.weight(), qt.dequantize())
    assert set(t.parameters()) == ({"scale", "lut"} if cfg.code == "hyb" else {"scale"})


@pytest.mark.parametrize("shape", [(32, 48), (2, 16, 32)])
def test_bcjr_small_tau_is_the_ptq_weight_and_packed_is_viterbi_of_the_latent(shape):
    qt = packed_input(shape)
    ptq = qt.dequantize()
    t = TrellisBCJR(qt, TrellisTrainOptions(tau=1e-4))
    w = t.weight()
    torch.testing.assert_close(w, ptq, atol=1e-7, rtol=1e-6)
    assert (w == ptq).float().mean() > 0.99
    t.set_temperature(1.0)
    assert (t.weight() - ptq).abs().max() > 0.1 * ptq.abs().max()  # the temperature matters
    for harden in TrellisTrainOptions.HARDEN:
        t = TrellisBCJR(qt, TrellisTrainOptions(tau=0.05, harden=harden))
        assert torch.equal(t.packed().dequantize(), ptq)  # a codeword: its Viterbi walk decodes to it
        with torch.no_grad():  # move the latent: packed() is the codec's Viterbi of the soft codeword / latent
            t.latent.add_(0.4 * torch.randn(t.latent.shape, generator=torch.Generator().manual_seed(1)))
        goal = t.harden_input()
        assert torch.equal(goal, t.latent.detach()) == (harden == "latent")
        out = t.packed()
        assert isinstance(out, TrellisTensor) and out.shape == qt.shape
        mats = [viterbi_decode(qt if len(shape) == 2 else qt.select(i), goal[i]) for i in range(t.e)]
        hard = torch.stack(mats).reshape(shape)
        assert torch.equal(out.dequantize(), hard) and not torch.equal(hard, ptq)


def test_bcjr_full_trellis_at_l16():
    """The stored default config (L=16): the soft pass at small τ returns the PTQ weight on the sub-trellis and
    on a larger one."""
    qt = packed_input((16, 32), TrellisConfig(bits=2))
    for bits in (4, 8):
        t = TrellisBCJR(qt, TrellisTrainOptions(tau=1e-4, soft_bits=bits))
        assert t.geometry().F == bits
        torch.testing.assert_close(t.weight(), qt.dequantize(), atol=1e-7, rtol=1e-6)


def toy_target(qt: TrellisTensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    w = qt.dequantize()
    return w + 0.5 * w.std() * torch.randn(w.shape, generator=g)


def adam_fit(t, target: torch.Tensor, steps: int, lr: float = 0.02) -> list[float]:
    """Adam with each parameter's step ``lr`` times its RMS (as the finetune loop sizes them)."""
    groups = [{"params": [p], "lr": lr * float(p.detach().square().mean().sqrt())} for p in t.parameters().values()]
    opt = torch.optim.Adam(groups)
    losses = []
    for _ in range(steps):
        loss = (t.weight() - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("cls", [TrellisBCJR, TrellisSTE, TrellisKD])
def test_adam_lowers_a_least_squares_loss(cls):
    qt = packed_input()
    target = toy_target(qt)
    t = cls(qt, TrellisTrainOptions(ste_every=1, refresh_every=2, tau=0.3))
    losses = adam_fit(t, target, 12)
    assert losses[-1] < 0.95 * losses[0], losses
    if cls is not TrellisKD:  # the hardened result fits the target better than the PTQ weight did
        before = (qt.dequantize() - target).square().mean()
        hardened = (t.packed().dequantize() - target).square().mean()
        assert hardened < before
    if cls is TrellisBCJR:  # and at a low temperature about as well as what training computed with
        t.set_temperature(0.02)
        assert hardened < 1.1 * (t.weight().detach() - target).square().mean()
    grads = {k: p.grad for k, p in t.parameters().items()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), list(grads)


def sgd_steps(t, target: torch.Tensor, n: int) -> None:
    for _ in range(n):
        params = list(t.parameters().values())
        loss = (t.weight() - target).square().sum()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(0.2 * p.square().mean().sqrt() * g / (g.abs().max() + 1e-12))


@pytest.mark.parametrize("cls", [TrellisBCJR, TrellisSTE, TrellisKD])
@pytest.mark.parametrize("shape", [(32, 48), (2, 16, 32)])
def test_state_round_trip_resumes_identically(cls, shape):
    qt = packed_input(shape)
    target = toy_target(qt)
    opts = TrellisTrainOptions(soft_bits=4, refresh_every=2, ste_every=2)  # a sub-trellis: rotations to resume
    a = cls(qt, opts)
    a.set_temperature(0.2)
    sgd_steps(a, target, 3)
    saved = {k: v.clone() for k, v in a.state().items()}
    sgd_steps(a, target, 3)
    b = cls(qt, opts)
    b.load_state(saved)
    sgd_steps(b, target, 3)
    sa, sb = a.state(), b.state()
    assert sa.keys() == sb.keys()
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    assert same_packed(a.packed(), b.packed())
    if cls is TrellisBCJR:
        assert int(sa["calls"]) == 6 and float(sa["tau"]) == 0.2
        assert not torch.equal(sa["states"], qt.states().reshape(sa["states"].shape))  # the refreshes moved it


def test_bcjr_refresh_never_worsens_the_fit_and_rotates():
    qt = packed_input()
    t = TrellisBCJR(qt, TrellisTrainOptions(refresh_every=1, soft_bits=4))
    with torch.no_grad():
        t.latent.add_(0.5 * torch.randn(t.latent.shape, generator=torch.Generator().manual_seed(2)))
    tables = t._tables(train=False)

    def err() -> float:
        return float((t._decode(t.states, tables) - t.latent.detach()).square().sum())

    errs, frees = [err()], []
    for _ in range(5):
        t.weight()
        errs.append(err())
        frees.append(t.geometry().free)
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:])) and errs[-1] < errs[0]
    assert len(set(frees)) == 2  # kv = 4, f = 2: the free positions alternate


def test_reencode_moves_codes_within_the_cap():
    qt = packed_input()
    target = toy_target(qt)
    t = TrellisKD(qt)
    e0 = float((t.weight().detach() - target).square().sum())
    assert t.reencode(target, 0.05) == 0.0  # whole tiles move: none of these fits in 5% of all steps
    frac = t.reencode(target, 0.3)
    assert 0.1 < frac <= 0.3
    e1 = float((t.weight().detach() - target).square().sum())
    assert e1 < e0
    full = TrellisKD(qt)
    assert full.reencode(target, 1.0) > frac
    assert float((full.weight().detach() - target).square().sum()) < e1
    assert TrellisKD(qt).reencode(qt.dequantize(), 1.0) == 0.0  # already the best walk of itself
    assert TrellisBCJR(qt).code_count() == qt.states().numel()


def test_registry_and_options():
    assert TRELLIS_TRAINABLES == {"bcjr": TrellisBCJR, "ste": TrellisSTE, "kd": TrellisKD}
    for bad in (dict(soft_bits=0), dict(ste_every=0), dict(refresh_every=-1), dict(tau=0.0), dict(harden="x")):
        with pytest.raises(ValueError):
            TrellisTrainOptions(**bad)
    t = TrellisBCJR(packed_input())
    with pytest.raises(ValueError):
        t.set_temperature(float("nan"))
    TrellisKD(packed_input()).set_temperature(0.1)  # meaningless there: no effect, no error
