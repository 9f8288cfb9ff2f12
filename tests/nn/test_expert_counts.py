"""``count_routed_experts``: the experts ``QuantExperts`` computes, counted exactly, and nothing changed when off."""

import torch

from conftest import tiny_model
from moequant import api
from moequant.alloc.recipe import Recipe
from moequant.codecs.config import UniformConfig
from moequant.eval.perplexity import PplConfig, evaluate_perplexity
from moequant.nn.quant_experts import QuantExperts, count_routed_experts

IDS = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))  # [B, L]


def quantized_olmoe():
    """tiny OLMoE (2 layers, 4 experts, top-2), every linear and expert tensor int4 RTN."""
    model = tiny_model("olmoe")
    api.quantize(model, Recipe.uniform(UniformConfig(bits=4, group_size=32)), progress=False)
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    assert len(experts) == 2 and all(m.is_packed("gate_up_proj") and m.is_packed("down_proj") for m in experts)
    return model


def force_routing(model, pick) -> None:
    """Replace each layer's routing by ``pick(layer, T) -> top_k_index [T, 2]`` (equal weights)."""
    for i, layer in enumerate(model.model.layers):
        def hook(_module, args, out, i=i):
            t = args[0].reshape(-1, args[0].shape[-1]).shape[0]
            idx = pick(i, t)  # [T, 2]
            return out[0], torch.full(idx.shape, 0.5, dtype=out[1].dtype), idx
        layer.mlp.gate.register_forward_hook(hook)


def layer_subsets(layer: int, t: int) -> torch.Tensor:
    """layer 0: every token to experts {0, 2}; layer 1: to {1, 3} or {1, 2} by token parity -> {1, 2, 3}."""
    if layer == 0:
        return torch.tensor([[0, 2]]).expand(t, 2)
    other = torch.where(torch.arange(t) % 2 == 0, 3, 2)  # [T]
    return torch.stack([torch.ones(t, dtype=torch.long), other], dim=1)


def test_counts_equal_the_known_routed_subsets_and_the_decodes(monkeypatch):
    model = quantized_olmoe()
    force_routing(model, layer_subsets)
    decoded = []
    orig = QuantExperts._expert_linear
    monkeypatch.setattr(QuantExperts, "_expert_linear",
                        lambda self, name, e, x: decoded.append((id(self), e)) or orig(self, name, e, x))
    with torch.no_grad(), count_routed_experts(model) as counts:
        model(IDS)
        model(IDS[:1, :4])
    a, b = counts["model.layers.0.mlp.experts"], counts["model.layers.1.mlp.experts"]
    assert (a.computed, a.total, a.calls) == (2 * 2, 2 * 4, 2)
    assert (b.computed, b.total, b.calls) == (2 * 3, 2 * 4, 2)
    # each counted expert was decoded exactly once per projection, and no other expert was
    assert len(decoded) == 2 * (a.computed + b.computed)
    ex0, ex1 = (id(layer.mlp.experts) for layer in model.model.layers)
    assert sorted({e for m, e in decoded if m == ex0}) == [0, 2] and sorted({e for m, e in decoded if m == ex1}) == [1, 2, 3]
    # one token, routed to {1, 3} in layer 1: a single-token call computes fewer experts than a dense pass
    with torch.no_grad(), count_routed_experts(model) as counts:
        model(IDS[:1, :1])
    assert [(c.computed, c.total) for c in counts.values()] == [(2, 4), (2, 4)]


def test_counts_follow_the_models_own_routing():
    """Unforced routing: the count is the number of distinct experts the router picked, seen from its output."""
    model = quantized_olmoe()
    picked = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda _m, _a, out: picked.append(torch.unique(out[2]).numel()))
    with torch.no_grad(), count_routed_experts(model) as counts:
        model(IDS)
        model(IDS[:1, :1])
    assert sum(c.computed for c in counts.values()) == sum(picked)
    assert picked[-2:] == [2, 2] and sum(picked) > 4  # the one-token pass routed 2 of 4 experts per layer


def test_off_is_the_unchanged_path():
    model = quantized_olmoe()
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        before = model(IDS).logits
        with count_routed_experts(model) as counts:
            during = model(IDS).logits
            with count_routed_experts(model) as inner:
                model(IDS[:1, :1])
            model(IDS[:1, :1])
        after = model(IDS).logits
    assert torch.equal(before, during) and torch.equal(before, after)
    assert sum(c.calls for c in inner.values()) == 2 and sum(c.calls for c in counts.values()) == 4
    assert "_moequant_expert_counts" not in experts.__dict__  # nothing left behind: the off path does no counting


def test_perplexity_reports_the_counts_only_for_quantized_experts():
    model = quantized_olmoe()
    force_routing(model, layer_subsets)
    passes = []
    model.model.register_forward_hook(lambda *_: passes.append(1))
    stream = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(1))  # [n]
    res = evaluate_perplexity(model, stream, PplConfig(seqlen=16, batch_size=2), bos_id=1, progress=False)
    assert res.n_windows == 3 and len(passes) == 2  # windows of 17, 17 and 9 positions: two batches
    assert (res.experts_computed, res.experts_total) == (len(passes) * (2 + 3), len(passes) * 2 * 4)
    assert res.experts_per_layer["model.layers.1.mlp.experts"] == {"computed": 2 * 3, "total": 2 * 4, "calls": 2}
    assert res.to_dict()["experts_computed"] == 10
    dense = evaluate_perplexity(tiny_model("olmoe"), stream, PplConfig(seqlen=16), bos_id=1, progress=False)
    assert dense.experts_total is None and "experts_total" not in dense.to_dict()


def test_no_routed_pair_counts_no_expert():
    model = quantized_olmoe()
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad(), count_routed_experts(model) as counts:
        out = experts(torch.randn(3, 64), torch.full((3, 2), -1), torch.full((3, 2), 0.5))  # every slot masked
    assert torch.equal(out, torch.zeros(3, 64))
    c = counts["model.layers.0.mlp.experts"]
    assert (c.computed, c.total, c.calls) == (0, 4, 1)


def test_bench_decode_counts_the_single_token_steps_only():
    """``moequant bench``'s decode: batch 1, one token per step -> top-2 of 4 experts in each of 2 layers per step,
    exactly, and the prompt's forward is not counted; the timed runs' output is unchanged by the counting."""
    from moequant.bench import decode_run, time_decode

    model = quantized_olmoe()
    prompt = IDS[:1, :6]  # [1, 6]: a 5-token prompt forward, then the steps
    counts: dict = {}
    new, _ = decode_run(model, prompt, 3, counts)
    assert [(c.computed, c.total, c.calls) for c in counts.values()] == [(3 * 2, 3 * 4, 3)] * 2
    res = time_decode(model, prompt, 3, repeats=1)
    assert (res["experts_computed"], res["experts_total"]) == (2 * 3 * 2, 2 * 3 * 4)
    assert res["generated_ids"] == new[0].tolist()
    dense = time_decode(tiny_model("llama"), prompt, 2, repeats=1)
    assert "experts_total" not in dense
