"""LayerCapture: per-expert routing-conditioned Hessians equal a brute-force recomputation from the
routed tokens; linear Hessians equal XᵀX; q/k/v share one statistic; hooks are removed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import ARCHS, tiny_model
from moequant.calib.capture import LayerCapture
from moequant.calib.hessian import ExpertHessianStat, HessianStat
from moequant.models.adapters import adapter_for, iter_targets

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer0(model):
    ad = adapter_for(model)
    targets = [t for t in iter_targets(model, ad) if t.layer == 0]
    return ad, model.model.layers[0], targets


@pytest.mark.parametrize("arch", ["olmoe", "mixtral"])
def test_expert_hessians_brute_force(arch):
    model = tiny_model(arch).eval()
    ad, layer, targets = _layer0(model)
    experts = layer.get_submodule(ad.experts)
    recorded = []
    h = experts.register_forward_pre_hook(lambda m, a: recorded.append((a[0].detach().clone(), a[1].clone())))
    x = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with LayerCapture(layer, "model.layers.0", targets, ad) as cap, torch.no_grad():
        model(x)
    h.remove()
    assert not experts._forward_pre_hooks and not layer._forward_pre_hooks
    res = cap.result()
    gu, dn = res["model.layers.0.mlp.experts.gate_up_proj"], res["model.layers.0.mlp.experts.down_proj"]
    assert isinstance(gu, ExpertHessianStat)
    hidden, index = recorded[0]  # [T, H], [T, k]
    k = index.shape[1]
    assert int(gu.counts.sum()) == hidden.shape[0] * k == 32 * k
    for e in range(experts.gate_up_proj.shape[0]):
        tok = (index == e).any(-1)
        xe = hidden[tok].double()  # [n_e, H]
        assert int(gu.counts[e]) == xe.shape[0] == int(dn.counts[e])
        torch.testing.assert_close(gu.xtx[e], xe.T @ xe, rtol=1e-10, atol=1e-10)
        g, u = F.linear(xe.float(), experts.gate_up_proj[e]).chunk(2, -1)
        a = (experts.act_fn(g) * u).double()  # before the routing weight
        torch.testing.assert_close(dn.xtx[e], a.T @ a, rtol=1e-10, atol=1e-10)


def test_linear_hessians_shared_and_exact():
    model = tiny_model("llama").eval()
    ad, layer, targets = _layer0(model)
    seen = {}
    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("qkv", []).append(a[0])),
             layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("o", []).append(a[0]))]
    x = torch.randint(3, 256, (3, 10), generator=torch.Generator().manual_seed(1))
    with LayerCapture(layer, "model.layers.0", targets, ad) as cap, torch.no_grad():
        model(x[:2])
        model(x[2:])
    for hk in hooks:
        hk.remove()
    res = cap.result()
    q = res["model.layers.0.self_attn.q_proj.weight"]
    assert q is res["model.layers.0.self_attn.k_proj.weight"] is res["model.layers.0.self_attn.v_proj.weight"]
    assert res["model.layers.0.mlp.gate_proj.weight"] is res["model.layers.0.mlp.up_proj.weight"]
    assert res["model.layers.0.self_attn.o_proj.weight"] is not q
    xs = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen["qkv"]]).double()
    assert q.count == 30
    torch.testing.assert_close(q.xtx, xs.T @ xs, rtol=1e-10, atol=1e-10)
    xo = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen["o"]]).double()
    torch.testing.assert_close(res["model.layers.0.self_attn.o_proj.weight"].xtx, xo.T @ xo, rtol=1e-10, atol=1e-10)
    groups = sorted(sorted(n.split(".")[-2] for n in g) for g in cap.shared_groups())
    assert groups == [["down_proj"], ["gate_proj", "up_proj"], ["k_proj", "q_proj", "v_proj"], ["o_proj"]]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_target_gets_a_statistic(arch):
    model = tiny_model(arch).eval()
    ad, layer, targets = _layer0(model)
    with LayerCapture(layer, "model.layers.0", targets, ad) as cap, torch.no_grad():
        model(torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(2)))
    res = cap.result()
    assert sorted(res) == sorted(t.name for t in targets)
    for t in targets:
        s = res[t.name]
        assert (s.count > 0) if isinstance(s, HessianStat) else int(s.counts.sum()) > 0
