"""Hessian statistics: damping, aggregates, starved-expert policies (exact numbers)."""

from __future__ import annotations

import pytest
import torch

from moequant.calib.hessian import ExpertHessianStat, HessianStat, damp, expert_hessians
from moequant.errors import MoequantError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_damp_exact_and_dead_inputs():
    h = torch.tensor([[4.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    out = damp(h, 0.5)
    # mean(diag) = 2 -> +1 on the diagonal; the dead input (diag 0) gets 1
    assert torch.equal(out, torch.tensor([[5.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64))
    assert torch.equal(damp(torch.zeros(2, 2), 0.01), torch.eye(2, dtype=torch.float64))
    bad = h.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(MoequantError, match="layers.3.mlp.experts.down_proj expert 5"):
        damp(bad, 0.01, where="model.layers.3.mlp.experts.down_proj expert 5")


def test_stat_accumulates_in_float64():
    s = HessianStat.zeros(3)
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    s.add(x[None])  # [1, 2, 3]: leading dims are tokens too
    assert s.count == 2 and s.xtx.dtype == torch.float64
    torch.testing.assert_close(s.mean(), (x.T @ x).double() / 2)


def _three_experts():
    st = ExpertHessianStat.zeros(3, 2)
    st.add(0, torch.tensor([[1.0, 0.0]] * 4))  # n=4, H_0 = diag(1, 0)
    st.add(1, torch.tensor([[0.0, 2.0]] * 2))  # n=2, H_1 = diag(0, 4)
    st.add(2, torch.tensor([[1.0, 1.0]]))  # n=1, H_2 = ones
    return st


def test_aggregates_hand_checked():
    st = _three_experts()
    d = torch.float64
    torch.testing.assert_close(st.layer_mean(), (torch.diag(torch.tensor([1.0, 0.0], dtype=d)) +
                                                 torch.diag(torch.tensor([0.0, 4.0], dtype=d)) + torch.ones(2, 2, dtype=d)) / 3)
    # token weighted: (4*diag(1,0) + 2*diag(0,4) + ones) / 7
    torch.testing.assert_close(st.layer_token_weighted(), torch.tensor([[5.0, 1.0], [1.0, 9.0]], dtype=d) / 7)
    h, starved = expert_hessians(st, "layer-mean", min_tokens=2)
    assert h.shape == (3, 2, 2) and torch.equal(h[0], h[2]) and [(s.expert, s.count) for s in starved] == [(2, 1)]


def test_starved_policies_exact():
    st = _three_experts()
    layer = st.layer_token_weighted()
    own = torch.ones(2, 2, dtype=torch.float64)
    h, starved = expert_hessians(st, "per-expert", min_tokens=2, policy="shrink", tau=3.0)
    torch.testing.assert_close(h[2], (1 * own + 3 * layer) / 4)  # weight n/(n+tau) = 1/4 on its own estimate
    torch.testing.assert_close(h[0], torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)))
    assert [(s.expert, s.count, s.policy) for s in starved] == [(2, 1, "shrink")]
    h, _ = expert_hessians(st, "per-expert", min_tokens=3, policy="layer")
    assert torch.equal(h[1], layer) and torch.equal(h[2], layer)
    h, starved = expert_hessians(st, "per-expert", min_tokens=3, policy="rtn")
    torch.testing.assert_close(h[2], torch.eye(2, dtype=torch.float64) * torch.diagonal(layer).mean())
    assert [s.expert for s in starved] == [1, 2]
    with pytest.raises(ValueError, match="per-expert"):
        expert_hessians(st, "nope")
    with pytest.raises(ValueError, match="shrink"):
        expert_hessians(st, "per-expert", policy="nope")
