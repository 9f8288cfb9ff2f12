"""Coverage of the (expanded percentile) bootstrap CIs of ``moequant.eval.bootstrap``, by simulation.

Each check draws ``R`` data sets (fixed seed) from a distribution whose true value is known, builds
the 95% CI of each, and counts how often it covers the truth. If the CI is right, the count is
Binomial(R, 0.95); the test accepts the central 99.9% of that distribution, computed exactly
(``binomial_acceptance``), so a correct CI fails with probability 0.001 per check, and a CI whose
coverage is off by a few binomial standard deviations (sd = sqrt(0.95 * 0.05 / R) = 1.26 points at
R = 300) fails. Negative controls show the same check rejects the usual mistakes: resampling tokens
instead of windows (too narrow) and resampling two paired runs independently (too wide).

The slow variant (R = 4000, ``-m slow``) resolves ~1.5 points: it is what showed the plain percentile
interval undercovering (93.2% at 32 windows, 93.1% for the paired ratio, 93.7% for a skewed mean),
fixed by the expanded percentile interval now in ``moequant.eval.bootstrap`` (``expanded_tail``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from moequant.eval.bootstrap import (
    bootstrap_ci,
    bootstrap_mean_ci,
    expanded_tail,
    paired_delta_ci,
    paired_mean_delta_ci,
    t_quantile,
)

R, N_BOOT, LEVEL = 300, 500, 0.95


def binomial_acceptance(r: int, p: float = LEVEL, alpha: float = 1e-3) -> tuple[int, int]:
    """Smallest ``[lo, hi]`` with P(X < lo) <= alpha/2 and P(X > hi) <= alpha/2 for X ~ Binomial(r, p)."""
    k = np.arange(r + 1)
    log_pmf = (np.array([math.lgamma(r + 1) - math.lgamma(j + 1) - math.lgamma(r - j + 1) for j in k])
               + k * math.log(p) + (r - k) * math.log1p(-p))  # [r + 1]
    cdf = np.cumsum(np.exp(log_pmf))  # [r + 1]
    lo = int(np.searchsorted(cdf, alpha / 2, side="right"))  # first k with P(X <= k) > alpha/2
    hi = int(np.searchsorted(cdf, 1 - alpha / 2, side="left"))  # first k with P(X <= k) >= 1 - alpha/2
    return lo, hi


def test_binomial_acceptance_region():
    lo, hi = binomial_acceptance(300)
    assert (lo, hi) == (271, 296)  # i.e. coverage 0.903 .. 0.987 at R = 300
    # tails really are below alpha / 2 each
    p = [math.comb(300, k) * 0.95**k * 0.05 ** (300 - k) for k in range(301)]
    assert sum(p[:lo]) <= 5e-4 < sum(p[:lo + 1]) and sum(p[hi + 1:]) <= 5e-4 < sum(p[hi:])


def test_t_quantiles_and_expanded_tail():
    exact = {(1, 0.975): 12.7062047, (2, 0.975): 4.30265273, (3, 0.975): 3.18244631, (3, 0.995): 5.84090931,
             (4, 0.975): 2.77644511, (10, 0.975): 2.22813885, (30, 0.975): 2.04227246, (9, 0.995): 3.24983554}
    for (df, p), t in exact.items():
        assert t_quantile(p, df) == pytest.approx(t, rel=5e-4 if df == 4 else 1e-4 if df < 10 else 1e-5), (df, p)
    # 32 windows at 95%: quantiles at 1.91% / 98.09% instead of 2.5% / 97.5%; -> 2.5% as n grows
    assert expanded_tail(32, 0.95) == pytest.approx(0.019126, abs=2e-6)
    assert expanded_tail(1, 0.95) == pytest.approx(0.025) and 0.0249 < expanded_tail(10_000, 0.95) < 0.025
    # the one-window interval is still the point
    assert bootstrap_ci([20.0], [10]) == pytest.approx((math.exp(2.0), math.exp(2.0)))


def covered(hits: int, r: int = R) -> bool:
    lo, hi = binomial_acceptance(r)
    return lo <= hits <= hi


# ---------------------------------------------------------------- simulations (truth known)


def sim_mean_normal(rng, i):
    """Mean of 50 draws of N(3, 1): truth 3."""
    return bootstrap_mean_ci(rng.normal(3.0, 1.0, size=50), n_boot=N_BOOT, seed=i, level=LEVEL), 3.0


def sim_mean_gamma(rng, i):
    """Mean of 100 draws of Gamma(shape 2, scale 1.5) (skewness 1.4): truth 3."""
    return bootstrap_mean_ci(rng.gamma(2.0, 1.5, size=100), n_boot=N_BOOT, seed=i, level=LEVEL), 3.0


def sim_accuracy(rng, i):
    """Accuracy over 200 items answered right with probability 0.35: truth 0.35."""
    return bootstrap_mean_ci((rng.random(200) < 0.35).astype(float), n_boot=N_BOOT, seed=i, level=LEVEL), 0.35


def _windows(rng, n: int = 32):
    """``n`` windows of 256..512 scored tokens; a window's mean NLL per token ~ Gamma(50, 4/50) (mean 4,
    CV 14%, skewed), independent of its length: the true PPL is exp(4)."""
    counts = rng.integers(256, 513, size=n).astype(float)  # [n]
    per_token = rng.gamma(50.0, 4.0 / 50.0, size=n)  # [n]
    return counts, per_token


def sim_ppl(rng, i):
    counts, m = _windows(rng)
    return bootstrap_ci(counts * m, counts, n_boot=N_BOOT, seed=i, level=LEVEL), math.exp(4.0)


def _paired(rng):
    """Run B = run A plus a per-window shift d ~ N(0.05 + 0.1 (m - 4), 0.02^2) nats per token; E[d] = 0.05,
    so PPL_B / PPL_A = exp(0.05) and PPL_B - PPL_A = exp(4) (exp(0.05) - 1)."""
    counts, m = _windows(rng)
    d = 0.05 + 0.1 * (m - 4.0) + rng.normal(0.0, 0.02, size=m.size)  # [n]
    return counts, m, d


def sim_paired_ratio(rng, i):
    counts, m, d = _paired(rng)
    res = paired_delta_ci(counts * m, counts, counts * (m + d), counts, n_boot=N_BOOT, seed=i, level=LEVEL)
    return res.ratio_ci, math.exp(0.05)


def sim_paired_delta(rng, i):
    counts, m, d = _paired(rng)
    res = paired_delta_ci(counts * m, counts, counts * (m + d), counts, n_boot=N_BOOT, seed=i, level=LEVEL)
    return res.delta_ci, math.exp(4.0) * (math.exp(0.05) - 1.0)


def sim_paired_accuracy(rng, i):
    """A right with p = 0.5; B loses 15% of A's right answers and gains 5% of its wrong ones:
    acc_B - acc_A = 0.5 (0.05 - 0.15) = -0.05 over 200 items."""
    a = rng.random(200) < 0.5
    flip = rng.random(200) < np.where(a, 0.15, 0.05)
    b = a ^ flip
    res = paired_mean_delta_ci(a.astype(float), b.astype(float), n_boot=N_BOOT, seed=i, level=LEVEL)
    return res.delta_ci, -0.05


SIMULATIONS = {f.__name__[4:]: f for f in (sim_mean_normal, sim_mean_gamma, sim_accuracy, sim_ppl, sim_paired_ratio,
                                           sim_paired_delta, sim_paired_accuracy)}


def coverage_hits(sim, r: int = R, seed: int = 2026) -> int:
    rng = np.random.default_rng(seed)
    hits = 0
    for i in range(r):
        (lo, hi), truth = sim(rng, i)
        hits += lo <= truth <= hi
    return hits


@pytest.mark.parametrize("name", list(SIMULATIONS))
def test_ci_covers_the_truth_95_percent_of_the_time(name, one_thread):
    hits = coverage_hits(SIMULATIONS[name])
    lo, hi = binomial_acceptance(R)
    assert lo <= hits <= hi, f"{name}: {hits}/{R} = {hits / R:.3f} outside [{lo}, {hi}]"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SIMULATIONS))
def test_ci_coverage_4000_data_sets(name):
    r = 4000
    hits = coverage_hits(SIMULATIONS[name], r=r)
    lo, hi = binomial_acceptance(r)
    assert lo <= hits <= hi, f"{name}: {hits}/{r} = {hits / r:.4f} outside [{lo}, {hi}]"


# ---------------------------------------------------------------- negative controls


def test_resampling_tokens_instead_of_windows_undercovers(one_thread):
    # 32 windows x 16 tokens; a window effect N(0, 0.3^2) shared by its tokens plus token noise N(0, 0.5^2):
    # bootstrapping tokens as if independent ignores the window effect and gives far too narrow CIs.
    rng, hits_tokens, hits_windows = np.random.default_rng(7), 0, 0
    for i in range(R):
        nll = 4.0 + rng.normal(0.0, 0.3, size=(32, 1)) + rng.normal(0.0, 0.5, size=(32, 16))  # [32, 16]
        lo, hi = bootstrap_mean_ci(nll.reshape(-1), n_boot=N_BOOT, seed=i)
        hits_tokens += lo <= 4.0 <= hi
        lo, hi = bootstrap_ci(nll.sum(1), np.full(32, 16.0), n_boot=N_BOOT, seed=i)
        hits_windows += lo <= math.exp(4.0) <= hi
    assert hits_tokens < binomial_acceptance(R)[0] and hits_tokens / R < 0.8
    assert covered(hits_windows)


def test_unpaired_resampling_of_paired_runs_overcovers(one_thread):
    # resampling A's and B's windows independently keeps the between-window variance in the difference:
    # the CI of the ratio is several times too wide and covers almost always
    rng, hits = np.random.default_rng(8), 0
    for i in range(R):
        counts, m, d = _paired(rng)
        sa, sb = counts * m, counts * (m + d)
        ra = np.random.default_rng(10_000 + i).integers(0, m.size, size=(N_BOOT, m.size))  # [N_BOOT, n]
        rb = np.random.default_rng(20_000 + i).integers(0, m.size, size=(N_BOOT, m.size))
        ratio = np.exp(sb[rb].sum(1) / counts[rb].sum(1) - sa[ra].sum(1) / counts[ra].sum(1))  # [N_BOOT]
        lo, hi = np.quantile(ratio, [0.025, 0.975])
        hits += lo <= math.exp(0.05) <= hi
    assert hits > binomial_acceptance(R)[1]
