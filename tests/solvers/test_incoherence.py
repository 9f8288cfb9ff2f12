"""Random Hadamard transform: orthonormal for any size, fast path equals the dense matrix, the weight
transform round-trips, preserves the Hessian-weighted error, and flattens outliers."""

from __future__ import annotations

import pytest
import torch

from moequant.solvers.incoherence import (Incoherence, hadamard_factors, hadamard_matrix, hadamard_transform,
                                          random_signs)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n", [64, 96, 768, 1024, 3072, 576, 896, 1536, 7, 1])
def test_orthonormal_any_size(n):
    h = hadamard_matrix(n)
    assert (h.T @ h - torch.eye(n, dtype=h.dtype)).abs().max() <= 1e-6


def test_large_odd_factor_preserves_norms():
    x = torch.randn(16, 4864, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # 64 x Paley-76
    y = hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(hadamard_transform(y, transpose=True), x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n,factors", [(64, (64, 1)), (96, (8, 12)), (576, (16, 36)), (768, (64, 12)),
                                       (896, (32, 28)), (3072, (256, 12)), (4864, (64, 76)), (7, (1, 7))])
def test_factorisation_rule(n, factors):
    assert hadamard_factors(n) == factors


@pytest.mark.parametrize("n", [64, 96, 768, 576])
def test_true_hadamard_entries(n):
    assert torch.allclose(hadamard_matrix(n).abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("n", [8, 12, 24, 96, 576, 768, 20, 7])
def test_fast_equals_dense(n):
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    h = hadamard_matrix(n)
    torch.testing.assert_close(hadamard_transform(x), x @ h.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x), transpose=True), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(48, 96), (3, 64, 40)])
def test_weight_round_trip_and_runtime(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g)
    inc = Incoherence.make(shape, seed=5)
    torch.testing.assert_close(inc.weight_inverse(inc.weight(w)), w, rtol=0, atol=1e-5)
    x = torch.randn(7, shape[-1], generator=g)
    we = w if w.dim() == 2 else w[1]
    ie = inc if w.dim() == 2 else Incoherence(inc.sign_in[1], inc.sign_out[1])
    y = ie.restore_output(ie.transform_input(x) @ ie.weight(we).T)
    torch.testing.assert_close(y, x @ we.T, rtol=1e-4, atol=1e-4)


def test_hessian_error_invariance():
    g = torch.Generator().manual_seed(1)
    k, n = 96, 40
    x = torch.randn(300, k, dtype=torch.float64, generator=g)
    h = x.T @ x / 300
    d = torch.randn(n, k, dtype=torch.float64, generator=g)
    inc = Incoherence.make((n, k), seed=3)
    inc = Incoherence(inc.sign_in.double(), inc.sign_out.double())
    dt, ht = inc.weight(d), inc.hessian(h)
    a = float(torch.trace(d @ h @ d.T))
    b = float(torch.trace(dt @ ht @ dt.T))
    assert abs(a - b) <= 1e-8 * abs(a)


def test_outlier_is_spread():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(2))
    w[3, 7] = 200.0
    ratio = lambda m: float(m.abs().max() / m.pow(2).mean().sqrt())  # noqa: E731
    assert ratio(w) > 50
    assert ratio(Incoherence.make(w.shape, seed=0).weight(w)) <= 5


def test_signs_seeded():
    a, b, c = random_signs(100, 1), random_signs(100, 1), random_signs(100, 2)
    assert torch.equal(a, b) and not torch.equal(a, c) and set(a.tolist()) == {-1.0, 1.0}
    e = Incoherence.make((4, 8, 16), seed=0)
    assert e.sign_in.shape == (4, 16) and e.sign_out.shape == (4, 8) and not torch.equal(e.sign_in[0], e.sign_in[1])
