"""LayerCapture: per-expert routing-conditioned Hessians equal a brute-force recomputation from the
routed tokens; linear Hessians equal XᵀX; inputs fed to several linears share one statistic; hooks
are removed, also on error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ARCHS, MOE_ARCHS, tiny_model, close_fp32_products
from moequant.calib.capture import LayerCapture
from moequant.calib.hessian import ExpertHessianStat, HessianStat
from moequant.models.adapters import ADAPTERS, Target, adapter_for, iter_targets
from moequant.nn.quant_experts import QuantExperts

pytestmark = pytest.mark.usefixtures("one_thread")
PREFIX = "model.layers.0"


def _layer0(model):
    ad = adapter_for(model)
    targets = [t for t in iter_targets(model, ad) if t.layer == 0]
    return ad, model.model.layers[0], targets


def _tokens(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _no_hooks(module: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in module.modules())


def _brute_force(hidden: torch.Tensor, index: torch.Tensor, gate_up: torch.Tensor, n_experts: int):
    """Per-token loop in float64: Σ x xᵀ of the block input and of silu(gate)·up for every (token, expert)."""
    k_in, k_mid = gate_up.shape[-1], gate_up.shape[1] // 2
    h_in = torch.zeros(n_experts, k_in, k_in, dtype=torch.float64)
    h_mid = torch.zeros(n_experts, k_mid, k_mid, dtype=torch.float64)
    counts = [0] * n_experts
    for t in range(hidden.shape[0]):
        x = hidden[t].double()  # [H]
        for e in index[t].tolist():
            w = gate_up[e].double()  # [2I, H]
            a = F.silu(w[:k_mid] @ x) * (w[k_mid:] @ x)  # [I]
            h_in[e] += torch.outer(x, x)
            h_mid[e] += torch.outer(a, a)
            counts[e] += 1
    return h_in, h_mid, counts


@pytest.mark.parametrize("arch,swap", [("olmoe", False), ("qwen3_moe", True)])
def test_expert_hessians_equal_brute_force(arch, swap):
    """Recorded independently: the MoE block's input and the router's top-k choice."""
    model = tiny_model(arch).double()
    model.set_experts_implementation("eager")  # grouped_mm has no float64 on the CPU
    assert model.config.hidden_act == "silu"
    ad, layer, targets = _layer0(model)
    block, experts = layer.get_submodule("mlp"), layer.get_submodule(ad.experts)
    if swap:  # the statistic must use the module's *current* weights (here a QuantExperts, changed)
        experts = QuantExperts(experts.gate_up_proj.detach() * 0.5, experts.down_proj.detach(), experts.act_fn)
        block.experts = experts
        targets = [t for t in iter_targets(model, ad) if t.layer == 0]
    record: dict[str, torch.Tensor] = {}

    def keep_input(module, args):
        record["x"] = args[0].detach().clone()  # [B, S, H]

    def keep_choice(module, args, out):
        record["idx"] = out[2].clone()  # (router_logits, top_k_weights, top_k_index [T, k])

    hooks = [block.register_forward_pre_hook(keep_input), block.gate.register_forward_hook(keep_choice)]
    with LayerCapture(layer, PREFIX, targets, ad) as cap, torch.no_grad():
        model(_tokens(2, 16, 0))
    for h in hooks:
        h.remove()
    assert _no_hooks(model)
    res = cap.result()
    gu, dn = res[f"{PREFIX}.mlp.experts.gate_up_proj"], res[f"{PREFIX}.mlp.experts.down_proj"]
    assert isinstance(gu, ExpertHessianStat) and isinstance(dn, ExpertHessianStat)
    hidden = record["x"].reshape(-1, record["x"].shape[-1])  # [32, H]
    index = record["idx"]  # [32, k]
    n_experts, k = experts.gate_up_proj.shape[0], model.config.num_experts_per_tok
    h_in, h_mid, counts = _brute_force(hidden, index, experts.gate_up_proj.detach(), n_experts)
    assert gu.counts.tolist() == counts == dn.counts.tolist()
    assert sum(counts) == 32 * k
    close_fp32_products(gu.xtx, h_in)
    close_fp32_products(dn.xtx, h_mid)


def test_experts_called_with_keywords_skip_padded_slots():
    torch.manual_seed(0)
    n_experts, hid, inter = 3, 4, 2
    experts = QuantExperts(torch.randn(n_experts, 2 * inter, hid), torch.randn(n_experts, hid, inter), F.silu)
    layer = nn.Module()
    layer.mlp = nn.Module()
    layer.mlp.experts = experts
    targets = [Target(f"{PREFIX}.mlp.experts.{p}", f"{PREFIX}.mlp.experts", p, "experts", tuple(w.shape), 0)
               for p, w in (("gate_up_proj", experts.gate_up_proj), ("down_proj", experts.down_proj))]
    x = torch.randn(5, hid)
    index = torch.tensor([[0, 2], [2, -1], [1, 3], [0, 1], [-1, -1]])  # -1 and 3 (= E) are padding
    with LayerCapture(layer, PREFIX, targets, ADAPTERS["olmoe"]) as cap:
        experts(hidden_states=x, top_k_index=index, top_k_weights=torch.ones(5, 2))
        experts(x, top_k_index=index, top_k_weights=torch.ones(5, 2))
    gu = cap.result()[targets[0].name]
    assert gu.counts.tolist() == [4, 4, 4]  # twice: expert 0 <- tokens 0, 3; 1 <- 2, 3; 2 <- 0, 1
    x2 = x[[0, 1]].double()
    close_fp32_products(gu.xtx[2], 2 * x2.T @ x2)
    assert _no_hooks(layer)


def test_linear_hessians_shared_and_exact():
    model = tiny_model("llama")
    ad, layer, targets = _layer0(model)
    seen: dict[str, list[torch.Tensor]] = {"qkv": [], "o": []}
    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen["qkv"].append(a[0])),
             layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen["o"].append(a[0]))]
    x = _tokens(3, 10, 1)
    with LayerCapture(layer, PREFIX, targets, ad) as cap, torch.no_grad():
        model(x[:2])
        model(x[2:])
    for h in hooks:
        h.remove()
    assert _no_hooks(model)
    res = cap.result()
    q = res[f"{PREFIX}.self_attn.q_proj.weight"]
    assert q is res[f"{PREFIX}.self_attn.k_proj.weight"] is res[f"{PREFIX}.self_attn.v_proj.weight"]
    assert res[f"{PREFIX}.mlp.gate_proj.weight"] is res[f"{PREFIX}.mlp.up_proj.weight"]
    o = res[f"{PREFIX}.self_attn.o_proj.weight"]
    assert o is not q and q.count == o.count == 30  # counted once, not three times
    for stat, key in ((q, "qkv"), (o, "o")):
        xs = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[key]]).double()  # [30, K]
        close_fp32_products(stat.xtx, xs.T @ xs)
    groups = sorted(sorted(n.split(".")[-2] for n in g) for g in cap.shared_groups())
    assert groups == [["down_proj"], ["gate_proj", "up_proj"], ["k_proj", "q_proj", "v_proj"], ["o_proj"]]


def test_hooks_removed_on_error():
    model = tiny_model("olmoe")
    ad, layer, targets = _layer0(model)
    with pytest.raises(RuntimeError, match="boom"):
        with LayerCapture(layer, PREFIX, targets, ad):
            assert not _no_hooks(layer)
            raise RuntimeError("boom")
    assert _no_hooks(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_target_gets_a_statistic(arch):
    model = tiny_model(arch)
    ad, layer, targets = _layer0(model)
    with LayerCapture(layer, PREFIX, targets, ad) as cap, torch.no_grad():
        model(_tokens(2, 12, 2))
    res = cap.result()
    assert sorted(res) == sorted(t.name for t in targets)
    for t in targets:
        s = res[t.name]
        if isinstance(s, HessianStat):
            assert s.count == 24 and s.xtx.shape == (t.shape[-1],) * 2
        else:  # some experts may see no token; all routings together are tokens x top-k
            assert int(s.counts.sum()) == 24 * model.config.num_experts_per_tok
    names = {frozenset(n[len(PREFIX) + 1:] for n in g) for g in cap.shared_groups()}
    assert {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"} in names
    if arch not in MOE_ARCHS:
        assert {"mlp.gate_proj.weight", "mlp.up_proj.weight"} in names
    if arch == "qwen2_moe":
        assert {"mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight",
                "mlp.shared_expert_gate.weight"} in names
    assert _no_hooks(model)


def test_sharing_follows_memory_not_objects():
    """Views of the same memory share a statistic; an in-place write in between splits it."""
    layer = nn.Module()
    layer.a, layer.b, layer.c = nn.Linear(4, 3), nn.Linear(4, 2), nn.Linear(4, 2)
    targets = [Target(f"{PREFIX}.{n}.weight", f"{PREFIX}.{n}", "weight", "linear", (3, 4), 0) for n in "abc"]

    def forward(x):
        layer.a(x)
        layer.b(x.view(x.shape))  # another object, the same numbers
        x.mul_(2.0)
        layer.c(x)  # same memory, other numbers
    layer.forward = forward
    with LayerCapture(layer, PREFIX, targets, ADAPTERS["llama"]) as cap, torch.no_grad():
        layer(torch.ones(2, 4))
        with torch.inference_mode():
            layer(torch.ones(2, 4))  # no version counter: grouping from the first call still holds
    groups = sorted(sorted(n.split(".")[-2] for n in g) for g in cap.shared_groups())
    assert groups == [["a", "b"], ["c"]]
    res = cap.result()
    assert res[targets[0].name].count == 4 and res[targets[2].name].count == 4
    # c saw rows of 2s: 2 rows x 2 x 2 per call, two calls
    torch.testing.assert_close(res[targets[2].name].xtx, torch.full((4, 4), 16.0, dtype=torch.float64))
