"""Hessian statistics: accumulation, damping, aggregates and starved-expert policies on hand examples."""

from __future__ import annotations

import pytest
import torch

from conftest import close_fp32_products
from moequant.calib.hessian import (DEFAULT_MIN_EXPERT_TOKENS, ExpertHessianStat, HessianStat, StarvedExpert, damp,
                                    expert_hessians)
from moequant.errors import MoequantError

pytestmark = pytest.mark.usefixtures("one_thread")


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_hessian_stat_accumulates_tokens_of_any_leading_shape():
    stat = HessianStat.zeros(3)
    x = torch.randn(2, 5, 3)
    y = torch.randn(4, 3)
    stat.add(x)
    stat.add(y)
    rows = torch.cat([x.reshape(-1, 3), y]).double()  # [14, 3]
    assert stat.count == 14 and stat.xtx.dtype == torch.float64
    close_fp32_products(stat.mean(), rows.T @ rows / 14)
    with pytest.raises(MoequantError):
        HessianStat.zeros(3).mean()


def test_damp_hand_example_and_dead_inputs():
    h = t64([[[2.0, 1.0], [1.0, 4.0]],  # mean diag 3 -> +0.3 with lam 0.1
             [[4.0, 0.0], [0.0, 0.0]],  # input 1 dead: mean diag 2 -> +0.2 on input 0, 1 on input 1
             [[0.0, 0.0], [0.0, 0.0]]])  # all dead -> identity
    out = damp(h, 0.1)
    want = t64([[[2.3, 1.0], [1.0, 4.3]], [[4.2, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    torch.testing.assert_close(out, want, rtol=0, atol=1e-15)
    assert h[0, 0, 0] == 2.0  # the input is not modified
    torch.testing.assert_close(damp(t64([[2.0, 1.0], [1.0, 4.0]])), t64([[2.03, 1.0], [1.0, 4.03]]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_damp_rejects_non_finite_naming_the_tensor(bad):
    where = "model.layers.3.mlp.experts.down_proj expert 5"
    with pytest.raises(MoequantError, match="model.layers.3.mlp.experts.down_proj expert 5"):
        damp(t64([[1.0, bad], [bad, 1.0]]), where=where)


def three_experts() -> ExpertHessianStat:
    """Experts with 1, 2 and 3 tokens and a fourth without any, K = 2."""
    stat = ExpertHessianStat.zeros(4, 2)
    stat.add(0, t64([[1.0, 0.0]]))  # H0 = [[1, 0], [0, 0]]
    stat.add(1, t64([[0.0, 2.0], [0.0, 2.0]]))  # H1 = [[0, 0], [0, 4]]
    stat.add(2, t64([[1.0, 1.0]] * 3))  # H2 = [[1, 1], [1, 1]]
    return stat


H_LAYER = t64([[4.0, 3.0], [3.0, 11.0]]) / 6  # (Σ xxᵀ over all experts) / 6 tokens


def test_aggregates_hand_checked():
    stat = three_experts()
    assert stat.counts.tolist() == [1, 2, 3, 0]
    per = stat.mean_per_expert()
    torch.testing.assert_close(per[1], t64([[0.0, 0.0], [0.0, 4.0]]))
    assert torch.equal(per[3], torch.zeros(2, 2, dtype=torch.float64))  # no tokens: zeros
    torch.testing.assert_close(stat.layer_mean(), t64([[2.0, 1.0], [1.0, 5.0]]) / 3, rtol=0, atol=1e-15)
    torch.testing.assert_close(stat.layer_token_weighted(), H_LAYER, rtol=0, atol=1e-15)
    with pytest.raises(MoequantError):
        ExpertHessianStat.zeros(2, 2).layer_mean()


def test_starved_shrink_blends_towards_the_layer_hessian():
    h, starved = expert_hessians(three_experts(), "per-expert", min_tokens=3, policy="shrink")
    assert starved == [StarvedExpert(0, 1, "shrink"), StarvedExpert(1, 2, "shrink"), StarvedExpert(3, 0, "shrink")]
    # tau = min_tokens = 3: (n H_e + 3 H_layer) / (n + 3)
    torch.testing.assert_close(h[0], t64([[0.75, 0.375], [0.375, 1.375]]), rtol=0, atol=1e-15)
    torch.testing.assert_close(h[1], t64([[0.4, 0.3], [0.3, 2.7]]), rtol=0, atol=1e-15)
    torch.testing.assert_close(h[2], t64([[1.0, 1.0], [1.0, 1.0]]), rtol=0, atol=1e-15)  # enough tokens: its own
    torch.testing.assert_close(h[3], H_LAYER, rtol=0, atol=1e-15)
    h1, _ = expert_hessians(three_experts(), "per-expert", min_tokens=3, policy="shrink", tau=1.0)
    torch.testing.assert_close(h1[0], (t64([[1.0, 0.0], [0.0, 0.0]]) + H_LAYER) / 2, rtol=0, atol=1e-15)


def test_starved_layer_and_rtn_policies():
    h, starved = expert_hessians(three_experts(), "per-expert", min_tokens=2, policy="layer")
    assert starved == [StarvedExpert(0, 1, "layer"), StarvedExpert(3, 0, "layer")]
    for e in (0, 3):
        torch.testing.assert_close(h[e], H_LAYER, rtol=0, atol=1e-15)
    torch.testing.assert_close(h[1], t64([[0.0, 0.0], [0.0, 4.0]]))
    h, starved = expert_hessians(three_experts(), "per-expert", min_tokens=2, policy="rtn")
    assert [s.expert for s in starved] == [0, 3]
    for e in (0, 3):  # mean(diag H_layer) = (4/6 + 11/6) / 2 = 1.25
        torch.testing.assert_close(h[e], 1.25 * torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-15)


def test_layer_modes_give_every_expert_the_same_matrix():
    for mode, want in (("layer-mean", t64([[2.0, 1.0], [1.0, 5.0]]) / 3), ("layer-token-weighted", H_LAYER)):
        h, starved = expert_hessians(three_experts(), mode, min_tokens=2, policy="rtn")
        assert h.shape == (4, 2, 2)
        for e in range(4):
            torch.testing.assert_close(h[e], want, rtol=0, atol=1e-15)
        assert starved == [StarvedExpert(0, 1, mode), StarvedExpert(3, 0, mode)]


def test_names_are_validated():
    stat = three_experts()
    with pytest.raises(ValueError, match="per-expert, layer-mean, layer-token-weighted"):
        expert_hessians(stat, "mean", min_tokens=2)
    with pytest.raises(ValueError, match="shrink, layer, rtn"):
        expert_hessians(stat, "per-expert", min_tokens=2, policy="drop")
    assert DEFAULT_MIN_EXPERT_TOKENS > 0
    _, starved = expert_hessians(stat, "per-expert")  # defaults: every expert here is starved
    assert [s.count for s in starved] == [1, 2, 3, 0]
