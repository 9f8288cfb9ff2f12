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
def test_soft_codeword_and_gradients_as_accurate_as_the_torch_path(ext, soft_bits, tau, monkeypatch):
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

    fused = []  # the auto run must take the fused kernel (forward and backward), not fall back to the torch path
    real_soft = KB.soft
    monkeypatch.setattr(KB, "soft", lambda *a, **k: fused.append(real_soft(*a, **k)) or fused[-1])
    truth, loop = run("reference", torch.float64), run("reference", torch.float32)
    fused.clear()
    kernel = run("auto", torch.float32)
    assert len(fused) >= 2 and all(r is not None for r in fused)
    for t, a, k, name in zip(truth, loop, kernel, ("y", "dx", "dlut")):
        loop_err, kernel_err = float((a - t).abs().max()), float((k - t).abs().max())
        assert kernel_err <= 1.5 * loop_err + 1e-6 * float(t.abs().max()), (name, kernel_err, loop_err)
        assert float((k - a).abs().max()) <= 1e-3 * float(t.abs().max()), name


def _pass(mode: str, x0: torch.Tensor, table0: torch.Tensor, tau: float, geom, ref, overlap, group, upstream):
    """(y, ∂x, ∂table) of ``soft_codeword`` under ``mode`` (float32)."""
    x = x0.clone().requires_grad_(True)
    table = table0.clone().requires_grad_(True)
    with kernels(mode):
        y = B.soft_codeword(x, table, tau, geom, ref, overlap, group)
        (y * upstream).sum().backward()
    return y.detach(), x.grad, table.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case,V", [("experts", 2), ("full-trellis", 2), ("free-start", 2), ("experts", 1),
                                    ("experts", 4)])
def test_the_fused_pass_matches_the_chunked_torch_path(ext, case, V):
    # one C++ call for the whole pass (kernels.bcjr.soft) against the chunked torch path: several tables with a
    # group per tile, the full trellis without a reference walk, a sub-trellis without the tail-biting overlap
    gen = torch.Generator().manual_seed(11)
    L, kv, tiles, steps = 8, 4, 30, 32
    tables = 3 if case == "experts" else 1
    table = torch.randn(tables, 1 << L, V, generator=gen)  # [G, 2^L, V]
    ref = torch.randint(0, 1 << L, (tiles, steps), generator=gen)  # [B, S]
    group = torch.randint(0, tables, (tiles,), generator=gen) if case == "experts" else None
    geom = B.full_geometry(L, kv) if case == "full-trellis" else B.soft_geometry(L, kv, 4)
    overlap = None if case == "free-start" else B.soft_overlap(ref, geom)
    flat = table.reshape(-1, V)
    x = flat[ref + (0 if group is None else group[:, None] << L)] + 0.3 * torch.randn(tiles, steps, V, generator=gen)
    upstream = torch.randn(tiles, steps, V, generator=gen)
    refs = None if case == "full-trellis" else ref
    if tables == 1:
        table = table[0]
    dep, mask = geom.deposit()
    assert KB.soft(x, B._columns(flat), refs, dep, ~mask, group, L, geom.f, 0.2, overlap) is not None  # it applies
    truth = _pass("reference", x.double(), table.double(), 0.2, geom, refs, overlap, group, upstream.double())
    loop = _pass("reference", x, table, 0.2, geom, refs, overlap, group, upstream)
    got = _pass("auto", x, table, 0.2, geom, refs, overlap, group, upstream)
    for g, a, t, name in zip(got, loop, truth, ("y", "dx", "dtable")):
        # as close to float64 as the float32 torch path (∂x carries fp32 cancellation: ~1e-4 of its scale in both)
        kernel_err, loop_err = float((g - t).abs().max()), float((a - t).abs().max())
        assert kernel_err <= 1.5 * loop_err + 1e-6 * float(t.abs().max()), (name, kernel_err, loop_err)
        assert _rel(g.double(), t) <= 1e-3, name


def test_the_fused_backward_is_the_same_every_run(ext):
    # the table terms are summed per task, then the tasks in order: the same bits for the same thread count
    gen = torch.Generator().manual_seed(12)
    table = torch.randn(1 << 8, 2, generator=gen)
    ref = torch.randint(0, 1 << 8, (64, 32), generator=gen)
    geom = B.soft_geometry(8, 4, 4)
    overlap = B.soft_overlap(ref, geom)
    x = table[ref] + 0.3 * torch.randn(64, 32, 2, generator=gen)
    upstream = torch.randn(64, 32, 2, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [_pass("auto", x, table, 0.2, geom, ref, overlap, None, upstream) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


def test_a_state_outside_the_table_is_refused(ext):
    table = torch.randn(1 << 8, 2)
    ref = torch.randint(0, 1 << 8, (4, 16), generator=torch.Generator().manual_seed(13))
    geom = B.soft_geometry(8, 4, 4)
    dep, mask = geom.deposit()
    x = torch.randn(4, 16, 2)
    group = torch.tensor([0, 0, 1, 0])  # a second table that is not there
    with pytest.raises(RuntimeError, match="is outside the 256 table rows"):
        KB.soft(x, B._columns(table), ref, dep, ~mask, group, 8, geom.f, 0.2, None)


def test_zero_steps_are_refused_not_a_crash(ext):
    # S = 0 once read before the start of the beta buffer (a segfault); now an error from the kernel and from the API
    with pytest.raises(RuntimeError, match=r"no steps \(S = 0\)"):
        KB.alpha_beta(torch.zeros(0, 3, 16), 1, None)
    with pytest.raises(RuntimeError, match=r"no steps \(S = 0\)"):
        KB.expectations(*(torch.zeros(0, 3, 16) for _ in range(4)), torch.zeros(0, 3, 8), 1)
    cfg = TrellisConfig(bits=2, L=8, V=2, tile=16, code="hyb")
    table = code_values(cfg, hyb_lut_init(cfg.Q))  # [2^L, 2]
    geom = B.soft_geometry(cfg.L, cfg.bits * cfg.V, 4)
    for mode in ("auto", "reference"):
        with kernels(mode), pytest.raises(ValueError, match=r"has no trellis steps"):
            B.soft_codeword(torch.zeros(3, 0, 2), table, 0.2, geom, torch.zeros(3, 0, dtype=torch.int64))


@pytest.mark.parametrize("case,V,soft_bits", [("experts", 2, 4), ("full-trellis", 2, 4), ("free-start", 2, 4),
                                              ("experts", 1, 6), ("experts", 4, 8), ("one-table", 2, 8)])
def test_the_hard_path_kernel_is_the_torch_viterbi_walk_for_walk(ext, case, V, soft_bits, monkeypatch):
    # kernels.bcjr.hard_path against the chunked torch Viterbi of finetune.bcjr.hard_path: the same scores (the
    # fused multiply-adds of torch's addcmul) and the same tie rule, so the same walks exactly; the tiles sit near
    # codewords of other walks, so the best walk moves off the reference on most tiles
    gen = torch.Generator().manual_seed(21)
    L, kv, tiles, steps = 8, 4, 40, 32
    tables = 3 if case == "experts" else 1
    table = torch.randn(tables, 1 << L, V, generator=gen)  # [G, 2^L, V]
    ref = torch.randint(0, 1 << L, (tiles, steps), generator=gen)  # [B, S]
    other = torch.randint(0, 1 << L, (tiles, steps), generator=gen)
    group = torch.randint(0, tables, (tiles,), generator=gen) if case == "experts" else None
    geom = B.full_geometry(L, kv) if case == "full-trellis" else B.soft_geometry(L, kv, soft_bits)
    overlap = None if case == "free-start" else B.soft_overlap(ref, geom)
    flat = table.reshape(-1, V)
    x = flat[other + (0 if group is None else group[:, None] << L)] + 0.1 * torch.randn(tiles, steps, V, generator=gen)
    refs = None if case == "full-trellis" else ref
    if tables == 1:
        table = table[0]
    calls = []
    real = KB.hard_path
    monkeypatch.setattr(KB, "hard_path", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    with kernels("reference"):
        want = B.hard_path(x, table, geom, refs, overlap, group)
    assert calls == [None]
    got = B.hard_path(x, table, geom, refs, overlap, group)
    assert len(calls) == 2 and calls[1] is not None  # the auto run took the kernel
    assert got.dtype == torch.int64 and torch.equal(got, want)
    moved = (want != (ref if refs is not None else want.roll(1, 0))).any(1).float().mean()
    assert moved > 0.5  # the walks differ from the reference: the comparison is not of two copies of ref


def test_the_hard_path_kernel_misses_a_wrong_tie_or_mask(ext):
    # the same walk only where the rule is the same: the first end state on a tie, the overlap masked at both ends
    gen = torch.Generator().manual_seed(22)
    table = torch.zeros(1 << 8, 2)  # every branch ties: the walk is the one the tie rules choose
    ref = torch.randint(0, 1 << 8, (6, 16), generator=gen)
    geom = B.soft_geometry(8, 4, 4)
    overlap = B.soft_overlap(ref, geom)
    x = torch.zeros(6, 16, 2)
    with kernels("reference"):
        want = B.hard_path(x, table, geom, ref, overlap)
        free = B.hard_path(x, table, geom, ref, None)
    assert torch.equal(B.hard_path(x, table, geom, ref, overlap), want)
    assert torch.equal(B.hard_path(x, table, geom, ref, None), free)
    assert not torch.equal(want, free)  # the overlap changes the tie-broken walk: the mask is checked
