"""The C++ soft-trellis recursions (``kernels.bcjr``) against the torch loops of ``finetune.bcjr``: the log-space
forward–backward and the two expectation recursions on random scores over every predecessor count the geometries
use (f = 1, 2, 3), with and without the tail-biting overlap; and the whole soft codeword with its gradients, where
the kernel must be as close to a float64 computation as the torch float32 path is.

The kernel's exp is a polynomial within ~2 ulp of the libm one and sums run in the same order, so the recursions
agree to float rounding: measured max |kernel − torch| ≤ ~1e-6 of the values' scale here. An off-by-one state,
predecessor or step is O(1) off."""

from __future__ import annotations

import pytest
import torch
from conftest import require_extension

from moequant.codecs.config import TrellisConfig
from moequant.codecs.trellis import code_values, hyb_lut_init
from moequant.finetune import bcjr as B
from moequant.kernels import bcjr as KB
from moequant.kernels.select import kernels, reference_kernels


@pytest.fixture(scope="module")
def ext():
    return require_extension(KB.extension, "bcjr")


def _scores(steps: int, b: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(steps, b, n, generator=g) * 40  # [S, b, n]: branch scores -‖v − x‖²/τ, spread over 40 nats


def _torch_loop(fn, *args):
    with reference_kernels():
        return fn(*args)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 2e-6) -> None:
    finite = want > -1e29  # excluded states are -1e30 in both
    assert torch.equal(got[~finite], want[~finite])
    scale = want[finite].abs().max().clamp_min(1.0)
    err = float((got[finite] - want[finite]).abs().max() / scale)
    assert err <= tol, err


@pytest.mark.parametrize("n,f", [(16, 1), (256, 2), (64, 3), (8, 1), (32, 2)])
@pytest.mark.parametrize("tail_biting", [False, True])
def test_forward_backward_matches_the_torch_loop(ext, n, f, tail_biting):
    scores = _scores(24, 11, n, seed=n + f)
    overlap = torch.randint(0, n >> f, (11,), generator=torch.Generator().manual_seed(1)) if tail_biting else None
    want = _torch_loop(B._forward_backward, scores, f, overlap)
    got = KB.alpha_beta(scores, f, overlap)
    assert got is not None
    for g, w, name in zip(got, want, ("alpha", "beta", "lse")):
        assert g.shape == w.shape, name
        _close(g, w)


@pytest.mark.parametrize("n,f", [(16, 1), (256, 2), (64, 3)])
@pytest.mark.parametrize("tail_biting", [False, True])
def test_expectations_match_the_torch_loop(ext, n, f, tail_biting):
    scores = _scores(24, 9, n, seed=3 * n + f)
    overlap = torch.randint(0, n >> f, (9,), generator=torch.Generator().manual_seed(2)) if tail_biting else None
    alpha, beta, lse = _torch_loop(B._forward_backward, scores, f, overlap)
    c = torch.randn(24, 9, n, generator=torch.Generator().manual_seed(4))  # [S, b, n]: ⟨g_t, v_t(σ)⟩
    want = _torch_loop(B._expectations, c, scores, alpha, beta, lse, f)
    got = KB.expectations(c, scores, alpha, beta, lse, f)
    assert got is not None
    for g, w in zip(got, want):
        scale = w.abs().max()
        assert float((g - w).abs().max() / scale) <= 2e-6


def test_a_wrong_predecessor_is_caught(ext):
    # the kernel on the scores with two states swapped in one step is not the loop on the originals
    scores = _scores(8, 3, 16, seed=5)
    want = _torch_loop(B._forward_backward, scores, 1, None)[0]
    swapped = scores.clone()
    swapped[4, :, [1, 9]] = swapped[4, :, [9, 1]]
    assert (KB.alpha_beta(swapped, 1, None)[0] - want).abs().max() > 1.0


def test_reference_mode_and_other_dtypes_take_the_torch_loop(ext):
    scores = _scores(4, 2, 16, seed=6)
    with reference_kernels():
        assert KB.alpha_beta(scores, 1, None) is None
    assert KB.alpha_beta(scores.double(), 1, None) is None


@pytest.mark.parametrize("soft_bits,tau", [(4, 0.3), (8, 0.05)])
def test_soft_codeword_and_gradients_as_accurate_as_the_torch_path(ext, soft_bits, tau):
    # L = 10 HYB tiles near their codewords; float64 through the torch path is the truth
    cfg = TrellisConfig(bits=2, L=10, V=2, tile=16, code="hyb", tail_biting=True)
    gen = torch.Generator().manual_seed(7)
    ref = torch.randint(0, 1 << cfg.L, (40, 128), generator=gen)  # [B, S]
    noise = torch.randn(40, 128, 2, generator=gen, dtype=torch.float64)
    upstream = torch.randn(40, 128, 2, generator=gen, dtype=torch.float64)
    geom = B.soft_geometry(cfg.L, cfg.bits * cfg.V, soft_bits)
    overlap = B.soft_overlap(ref, geom)

    def run(mode: str, dtype: torch.dtype):
        lut = hyb_lut_init(cfg.Q).double().requires_grad_(True)
        table = code_values(cfg, lut)  # [2^L, 2]
        x = (table.detach()[ref] + 0.3 * noise).to(dtype).requires_grad_(True)
        with kernels(mode):
            y = B.soft_codeword(x, table.to(dtype), tau, geom, ref, overlap)
            (y * upstream.to(dtype)).sum().backward()
        return [t.double() for t in (y.detach(), x.grad, lut.grad)]

    truth = run("reference", torch.float64)
    loop, kernel = run("reference", torch.float32), run("auto", torch.float32)
    for t, a, k, name in zip(truth, loop, kernel, ("y", "dx", "dlut")):
        loop_err, kernel_err = float((a - t).abs().max()), float((k - t).abs().max())
        assert kernel_err <= 1.5 * loop_err + 1e-6 * float(t.abs().max()), (name, kernel_err, loop_err)
        assert float((k - a).abs().max()) <= 1e-3 * float(t.abs().max()), name
