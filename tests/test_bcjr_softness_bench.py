"""benchmarks/bcjr_softness.py: the soft codeword is measured against the hard walk of the same sub-trellis."""

from __future__ import annotations

import pytest
import torch

from conftest import BENCHMARKS, bench_module
from moequant.codecs.config import TrellisConfig
from moequant.finetune.trellis_trainable import TrellisBCJR, TrellisTrainOptions
from moequant.formats.trellis import TrellisTensor

SMALL = TrellisConfig(bits=2, L=8, V=2, tile=16, code="hyb", Q=6)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _opened() -> TrellisBCJR:
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(0)) * 0.02
    return TrellisBCJR(TrellisTensor.encode(w, SMALL), TrellisTrainOptions(soft_bits=4))


def test_a_cold_posterior_is_the_hard_walk_and_a_hot_one_is_not():
    m = bench_module(BENCHMARKS / "bcjr_softness.py", "bcjr_softness_bench")
    start = m.measure(_opened(), 0.0, [1e-4, 100.0], seed=0)
    moved = m.measure(_opened(), 0.3, [1e-4, 100.0], seed=0)
    assert [(r["sigma"], r["tau"], r["F"]) for r in start + moved] == [
        (0.0, 1e-4, 4), (0.0, 100.0, 4), (0.3, 1e-4, 4), (0.3, 100.0, 4)]
    # on its codeword the latent's best sub-trellis walk is the PTQ walk itself
    assert start[0]["rel_rms_latent"] == 0.0
    # cold: the soft codeword is exactly the decoded hard walk, whether or not the latent sits on it
    assert start[0]["rel_rms"] == 0.0 and moved[0]["rel_rms"] == 0.0
    assert 0.25 < moved[0]["rel_rms_latent"] < 0.29  # 0.2698 here: sigma 0.3 of a unit-variance code
    # hot: the posterior spreads over the 16 walks and the soft codeword leaves the hard one
    assert start[1]["rel_rms"] > 0.7 and moved[1]["rel_rms"] > 0.7  # 0.774 and 0.769 here
