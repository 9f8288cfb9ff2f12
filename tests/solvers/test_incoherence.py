"""Random Hadamard transform, under both rules (``paley``: ``H_p ⊗ B_m``; ``hartley``: ``C_o ⊗ H_p``):
orthonormal for any size, the fast path equals the dense Kronecker matrix, the weight transform round-trips (shared and per-expert signs), keeps the Hessian-weighted
error, flattens outliers, and its signs are seeded and stored exactly."""

from __future__ import annotations

import pytest
import torch

from moequant.codecs.hadamard import RULES, _hartley
from moequant.solvers.incoherence import (Incoherence, hadamard_factors, hadamard_matrix, hadamard_transform,
                                          random_signs)

pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("n", [64, 96, 768, 1024, 576, 896, 1536, 3072, 7, 1])
def test_orthonormal_any_size(n, rule):
    h = hadamard_matrix(n, rule=rule)  # [n, n] float64, built by torch.kron, independent of the fast path
    eye = torch.eye(n, dtype=h.dtype)
    if n <= 1024:
        assert (h.T @ h - eye).abs().max() <= 1e-10
    # H_nᵀ H_n with the fast path on one side: I only if dense and fast are the same orthonormal H_n
    assert (hadamard_transform(h.T.contiguous(), transpose=True, rule=rule) - eye).abs().max() <= 1e-10


@pytest.mark.parametrize("n,factors", [(64, (64, 1)), (96, (8, 12)), (576, (16, 36)), (768, (64, 12)),
                                       (896, (32, 28)), (1536, (128, 12)), (3072, (256, 12)),
                                       (4864, (64, 76)), (14336, (512, 28)), (6, (2, 3)), (7, (1, 7))])
def test_factorisation_rule(n, factors):
    assert hadamard_factors(n) == factors == hadamard_factors(n, "paley")


@pytest.mark.parametrize("n,factors", [(64, (64, 1)), (96, (32, 3)), (576, (64, 9)), (896, (128, 7)),
                                       (1536, (512, 3)), (4864, (256, 19)), (8960, (256, 35)), (7, (1, 7))])
def test_hartley_factorisation_is_the_odd_part(n, factors):
    assert hadamard_factors(n, "hartley") == factors


@pytest.mark.parametrize("o", [1, 3, 5, 9, 19, 35])
def test_hartley_block(o):
    c = _hartley(o)
    eye = torch.eye(o, dtype=torch.float64)
    torch.testing.assert_close(c, c.T, rtol=0, atol=0)  # symmetric
    torch.testing.assert_close(c @ c, eye, rtol=0, atol=1e-12)  # C² = I: orthogonal and symmetric
    assert float(c.abs().max()) <= 2 ** 0.5 / o ** 0.5 + 1e-12


@pytest.mark.parametrize("n", [576, 1536, 896, 4864])
def test_hartley_entries_bounded(n):
    """Every entry of ``C_o ⊗ H_p`` is at most ``√2/√n`` (incoherence ``μ ≤ √2``); a random orthogonal block
    of the same order reaches ~3/√n (``codecs.hadamard._block``)."""
    h = hadamard_matrix(n, rule="hartley")
    assert float(h.abs().max()) * n ** 0.5 <= 2 ** 0.5 + 1e-9
    assert float(h.abs().max()) * n ** 0.5 > 1.3  # not a true Hadamard: the bound is what is checked


def test_unknown_rule_is_named():
    with pytest.raises(ValueError, match="'walsh'"):
        hadamard_factors(64, "walsh")
    with pytest.raises(ValueError, match="'walsh'"):
        Incoherence(torch.ones(4), torch.ones(4), "walsh")


def test_sylvester_closed_form():
    i = torch.arange(32)
    bits = (i[:, None] & i[None, :]).to(torch.int64)
    parity = sum((bits >> b) & 1 for b in range(5))  # popcount(i & j)
    torch.testing.assert_close(hadamard_matrix(32), (1 - 2 * (parity % 2)).double() / 32 ** 0.5, rtol=0, atol=0)


@pytest.mark.parametrize("rule", ["paley", "paley-outer"])
@pytest.mark.parametrize("n", [64, 96, 768, 576, 896])
def test_true_hadamard_entries(n, rule):
    h = hadamard_matrix(n, rule=rule)
    assert torch.allclose(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("n", [96, 576, 1536])
def test_paley_outer_is_paley_permuted(n):
    """``B_m ⊗ H_p = P (H_p ⊗ B_m) Pᵀ`` with ``P`` the perfect shuffle (index ``b·p + a`` <- ``a·m + b``)."""
    p, m = hadamard_factors(n)
    assert hadamard_factors(n, "paley-outer") == (p, m)
    perm = torch.arange(n).reshape(p, m).T.reshape(-1)  # position b·p + a holds a·m + b
    inner, outer = hadamard_matrix(n), hadamard_matrix(n, rule="paley-outer")
    torch.testing.assert_close(outer, inner[perm][:, perm], rtol=0, atol=0)
    assert not torch.equal(outer, inner)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("n", [8, 12, 24, 96, 576, 768, 20, 7, 6, 2048, 1536])
def test_fast_equals_dense(n, rule):
    x = _randn(2, 3, n, seed=n, dtype=torch.float64)
    h = hadamard_matrix(n, rule=rule)
    torch.testing.assert_close(hadamard_transform(x, rule=rule), x @ h.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(hadamard_transform(x, True, rule), x @ h, rtol=0, atol=1e-12)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x, rule=rule), True, rule), x, rtol=0, atol=1e-12)
    x32 = x.float()
    torch.testing.assert_close(hadamard_transform(x32, rule=rule), (x @ h.T).float(), rtol=0, atol=1e-5)


def test_large_paley_ii_block_keeps_norms():
    x = _randn(4, 4864, dtype=torch.float64)  # 64 x Paley-II 76
    y = hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(hadamard_transform(y, transpose=True), x, rtol=0, atol=1e-10)


def _check_runtime(inc, w, x, expert=None):
    """``W x == S_V H_Nᵀ W̃ H_K S_U x`` for one 2-D weight."""
    y = inc.restore_output(inc.transform_input(x, expert) @ inc.weight(w, expert).T, expert)
    want = x @ w.T
    assert (y - want).norm() <= 1e-4 * want.norm()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shape,per_expert", [((48, 96), False), ((3, 64, 40), False), ((3, 64, 40), True),
                                              ((2, 12, 7), True)])
def test_weight_round_trip_and_runtime(shape, per_expert, rule):
    w, x = _randn(*shape), _randn(7, shape[-1], seed=1)
    inc = Incoherence.make(shape, seed=5, per_expert=per_expert, rule=rule)
    assert inc.rule == rule and inc.select(0).rule == rule
    assert inc.sign_in.dim() == 1 + per_expert
    w_rot = inc.weight(w)
    torch.testing.assert_close(inc.weight_inverse(w_rot), w, rtol=0, atol=1e-5)
    assert (w_rot - w).abs().max() > 0.1  # it did rotate
    if w.dim() == 2:  # against the dense formula H_N S_V W S_U H_Kᵀ
        h_n, h_k = hadamard_matrix(shape[0], rule=rule), hadamard_matrix(shape[1], rule=rule)
        want = h_n @ torch.diag(inc.sign_out.double()) @ w.double() @ torch.diag(inc.sign_in.double()) @ h_k.T
        torch.testing.assert_close(w_rot.double(), want, rtol=0, atol=1e-5)
        return _check_runtime(inc, w, x)
    for e in range(shape[0]):
        _check_runtime(inc, w[e], x, expert=e)
        _check_runtime(inc.select(e), w[e], x)
        torch.testing.assert_close(inc.weight(w[e], expert=e), w_rot[e], rtol=0, atol=1e-6)
        torch.testing.assert_close(inc.weight_inverse(w_rot[e], expert=e), w[e], rtol=0, atol=1e-5)
    xe = _randn(shape[0], 5, shape[-1], seed=2)  # per expert tokens [E, T, K] through the leading dim
    y = inc.restore_output(inc.transform_input(xe) @ w_rot.transpose(-1, -2))
    torch.testing.assert_close(y, xe @ w.transpose(-1, -2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("per_expert,shared_h", [(False, True), (True, True), (True, False)])
def test_hessian_error_invariance(per_expert, shared_h, rule):
    e, n, k = 2, 40, 96
    x = _randn(e, 300, k, seed=3, dtype=torch.float64)
    h = x.transpose(-1, -2) @ x / 300  # [E, K, K] SPD
    h = h[0] if shared_h else h
    d = _randn(e, n, k, seed=4, dtype=torch.float64)
    inc = Incoherence.make((e, n, k), seed=3, per_expert=per_expert, rule=rule)
    inc = Incoherence(inc.sign_in.double(), inc.sign_out.double(), rule)
    dt, ht = inc.weight(d), inc.hessian(h)
    assert ht.dtype == torch.float64 and ht.shape == ((e, k, k) if per_expert or not shared_h else (k, k))
    for i in range(e):
        hi, hti = (h if shared_h else h[i]), (ht if ht.dim() == 2 else ht[i])
        a = float(torch.trace(d[i] @ hi @ d[i].T))
        b = float(torch.trace(dt[i] @ hti @ dt[i].T))
        assert abs(a - b) <= 1e-8 * abs(a)
        torch.testing.assert_close(inc.hessian(hi, expert=i), hti, rtol=0, atol=1e-12)


def test_outlier_is_spread():
    w = _randn(256, 512, seed=2)
    w[3, 7] = 200.0
    ratio = lambda m: float(m.abs().max() / m.pow(2).mean().sqrt())  # noqa: E731
    inc = Incoherence.make(w.shape, seed=0)
    # max/rms of a Gaussian [256, 512] alone is ~4.3-4.6 (the max of 131k draws); rotating one side only, ~10
    assert ratio(w) > 150 and ratio(inc.weight(w)) <= 5
    spike = torch.zeros(256, 512)
    spike[3, 7] = 200.0
    flat = inc.weight(spike).abs()  # true Hadamard on both sides: every entry is 200 / sqrt(N K)
    torch.testing.assert_close(flat, torch.full_like(flat, 200 / (256 * 512) ** 0.5), rtol=1e-5, atol=0)


def test_signs_seeded_and_state_dict():
    a, b, c = random_signs(100, 1), random_signs(100, 1), random_signs(100, 2)
    assert torch.equal(a, b) and not torch.equal(a, c) and set(a.tolist()) == {-1.0, 1.0}
    per = Incoherence.make((4, 8, 16), seed=0, per_expert=True)
    assert per.sign_in.shape == (4, 16) and per.sign_out.shape == (4, 8)
    assert not torch.equal(per.sign_in[0], per.sign_in[1])
    assert torch.equal(Incoherence.make((4, 8, 16), seed=0, per_expert=True).sign_in, per.sign_in)
    shared = Incoherence.make((4, 8, 16), seed=0)
    assert shared.sign_in.shape == (16,) and shared.nbytes() == 24 and per.nbytes() == 4 * 24
    for inc in (per, shared):
        sd = inc.to_state_dict("layers.0.mlp.experts.")
        assert sorted(sd) == ["layers.0.mlp.experts.sign_in", "layers.0.mlp.experts.sign_out"]
        assert all(t.dtype == torch.int8 for t in sd.values()) and sum(t.numel() for t in sd.values()) == inc.nbytes()
        back = Incoherence.from_state_dict(sd, "layers.0.mlp.experts.")
        assert torch.equal(back.sign_in, inc.sign_in) and torch.equal(back.sign_out, inc.sign_out)
    assert torch.equal(per.select(2).sign_out, per.sign_out[2]) and shared.select(2).sign_in is shared.sign_in


def test_shape_errors_name_the_shape():
    per = Incoherence.make((3, 8, 16), seed=0, per_expert=True)
    with pytest.raises(ValueError, match=r"\(8, 12\)"):
        per.weight(torch.zeros(8, 12), expert=0)
    with pytest.raises(ValueError, match=r"\(8, 16\).*expert"):
        per.weight(torch.zeros(8, 16))  # per-expert signs, no expert named
    with pytest.raises(ValueError, match=r"\(2, 8, 16\)"):
        per.weight(torch.zeros(2, 8, 16))
    with pytest.raises(ValueError, match="expert 3"):
        per.select(3)
    with pytest.raises(ValueError, match=r"\(16, 15\)"):
        per.hessian(torch.zeros(16, 15))
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 16\)"):
        Incoherence.make((2, 3, 8, 16), seed=0)
    with pytest.raises(ValueError, match="other than"):
        Incoherence(torch.full((4,), 0.5), torch.ones(4)).to_state_dict()
