"""The grouped routed-experts path (``QuantExperts.forward``, ``ALL_EXPERTS_FUNCTIONS["moequant"]``) against
the per-expert loop and transformers' eager experts, dense and packed, and the per-expert view cache."""

import copy

import pytest
import torch

from conftest import MOE_ARCHS, tiny_config
from moequant import api
from moequant.alloc.recipe import Recipe, Rule
from moequant.codecs.config import UniformConfig
from moequant.formats.registry import encode
from moequant.kernels.select import reference_kernels
from moequant.nn import experts_impl
from moequant.nn.experts_impl import IMPLEMENTATION, moequant_experts_forward, use_moequant_experts
from moequant.nn.packed import packed_tensor, register_packed
from moequant.nn.quant_experts import QuantExperts, expert_views, route_by_expert

E, K_TOP, H = 8, 2, 64
IDS = torch.tensor([[1, 5, 9, 77, 3, 200, 31, 8, 15, 99, 4, 250, 17, 60]])


def moe_model(arch: str, seed: int = 0):
    """A tiny random ``arch`` model with 8 experts (hidden 64, 2 layers), fp32, eval."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch)
    setattr(cfg, "num_local_experts" if arch == "mixtral" else "num_experts", E)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def routing(T: int, seed: int = 1, unrouted: tuple[int, ...] = (3,)):
    """x [T, H], top_k_index [T, k] (distinct experts per token, never those in ``unrouted``), weights [T, k]."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in unrouted])
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K_TOP]] for _ in range(T)])
    return torch.randn(T, H, generator=g), idx, torch.softmax(torch.randn(T, K_TOP, generator=g), -1)


def eager(ex: torch.nn.Module, *args) -> torch.Tensor:
    """transformers' own eager experts loop (the undecorated forward) on the stock module ``ex``."""
    return type(ex).forward.__wrapped__(ex, *args)


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    scale = float(want.abs().max()) or 1.0
    assert (got - want).abs().max().item() <= rel * scale, (got - want).abs().max().item() / scale


def packed_experts(ex, bits: int) -> QuantExperts:
    cfg = UniformConfig(bits=bits, group_size=32)
    return QuantExperts(encode(ex.gate_up_proj.detach(), cfg), encode(ex.down_proj.detach(), cfg), ex.act_fn)


def dequantized_stock(ex, q: QuantExperts):
    ref = copy.deepcopy(ex)
    with torch.no_grad():
        ref.gate_up_proj.copy_(torch.stack([q.expert_weight("gate_up_proj", e) for e in range(E)]))
        ref.down_proj.copy_(torch.stack([q.expert_weight("down_proj", e) for e in range(E)]))
    return ref


# ---------------------------------------------------------------- routing


def test_route_by_expert_sorts_stably_and_drops_masked_slots():
    idx = torch.tensor([[2, 0], [-1, 2], [0, 8], [2, 1]])  # E=8: -1 and 8 are masked
    r = route_by_expert(idx, 8)
    assert r.counts == (2, 1, 3, 0, 0, 0, 0, 0)
    assert r.token.tolist() == [0, 2, 3, 0, 1, 3]  # expert 0: tokens 0, 2; expert 1: 3; expert 2: 0, 1, 3
    assert r.pair.tolist() == [1, 4, 7, 0, 3, 6]
    assert r.offsets.tolist() == [2, 3, 6, 6, 6, 6, 6, 6]
    assert list(r.slices()) == [(0, 0, 2), (1, 2, 3), (2, 3, 6)]


# ---------------------------------------------------------------- dense and packed vs the loop and eager


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("T", [1, 37])
def test_dense_grouped_equals_loop_eager_and_registered(arch, T):
    ex = moe_model(arch).model.layers[0].mlp.experts
    q = QuantExperts(ex.gate_up_proj.detach(), ex.down_proj.detach(), ex.act_fn)
    x, idx, w = routing(T)
    with torch.no_grad():
        want = eager(ex, x, idx, w)
        close(q(x, idx, w), want)
        close(q.reference_forward(x, idx, w), want)
        close(moequant_experts_forward(ex, x, idx, w), want)
        close(moequant_experts_forward(q, x, idx, w), want)


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("bits", [4, 3])
def test_packed_grouped_equals_loop_and_eager_on_dequantized(arch, bits):
    ex = moe_model(arch).model.layers[1].mlp.experts
    q = packed_experts(ex, bits)
    ref = dequantized_stock(ex, q)
    x, idx, w = routing(29, seed=bits)
    with torch.no_grad():
        got = q(x, idx, w)
        close(got, q.reference_forward(x, idx, w))  # same per-expert arithmetic (fast kernels or not)
        with reference_kernels():
            close(q(x, idx, w), eager(ref, x, idx, w))
    # quantization did change the weights (the comparison is not vacuous)
    assert (ref.gate_up_proj - ex.gate_up_proj).abs().max() > 1e-3


def test_stock_module_with_packed_buffers_runs_grouped():
    """A stock OlmoeExperts holding packed buffers (``register_packed``) through the registered function."""
    ex = moe_model("olmoe").model.layers[0].mlp.experts
    q = packed_experts(ex, 4)
    ref = dequantized_stock(ex, q)
    stock = copy.deepcopy(ex)
    for name in ("gate_up_proj", "down_proj"):
        delattr(stock, name)
        register_packed(stock, name, packed_tensor(q, name))
    x, idx, w = routing(23)
    with torch.no_grad(), reference_kernels():
        close(moequant_experts_forward(stock, x, idx, w), eager(ref, x, idx, w))


@pytest.mark.parametrize("hid,inter", [(6, 3), (4, 2), (8, 4)])
def test_dense_unaligned_widths_fall_back_to_the_loop(hid, inter):
    """grouped_mm on CPU needs 16-byte row strides: widths that are not multiples of 4 floats use the loop."""
    g = torch.Generator().manual_seed(0)
    q = QuantExperts(torch.randn(3, 2 * inter, hid, generator=g), torch.randn(3, hid, inter, generator=g),
                     torch.nn.functional.silu)
    idx = torch.tensor([[0, 2], [2, -1], [1, 3], [0, 1], [-1, -1]])
    x, w = torch.randn(5, hid, generator=g), torch.rand(5, 2, generator=g)
    with torch.no_grad():
        close(q(x, idx, w), q.reference_forward(x, idx, w))
        close(q(x[1:], idx[1:], w[1:]), q.reference_forward(x[1:], idx[1:], w[1:]))  # offset storage


def test_zero_tokens_masked_slots_and_empty_batches():
    ex = moe_model("qwen3_moe").model.layers[0].mlp.experts
    q = packed_experts(ex, 4)
    x, idx, w = routing(11, unrouted=(0, 5, 6))
    idx[2, 1] = -1  # masked slots contribute nothing
    idx[7, 0] = E
    with torch.no_grad():
        got = q(x, idx, w)
        close(got, q.reference_forward(x, idx, w))
        keep = (idx >= 0) & (idx < E)
        close(got, q(x, torch.where(keep, idx, 1), torch.where(keep, w, 0.0)))
        assert torch.equal(q(x, torch.full_like(idx, -1), w), torch.zeros_like(x))
        assert q(x[:0], idx[:0], w[:0]).shape == (0, H)


def test_packed_decodes_only_routed_experts(monkeypatch):
    ex = moe_model("mixtral").model.layers[0].mlp.experts
    q = packed_experts(ex, 3)
    seen = []
    orig = QuantExperts._expert_linear
    monkeypatch.setattr(QuantExperts, "_expert_linear", lambda self, n, e, x: seen.append((n, e, x.shape[0])) or
                        orig(self, n, e, x))
    idx = torch.tensor([[5, 2], [2, 5], [5, 7]])
    with torch.no_grad():
        q(torch.randn(3, H), idx, torch.full((3, 2), 0.5))
    # one call per routed expert and projection, on that expert's whole slice
    assert sorted(seen) == sorted([(n, e, c) for n in ("gate_up_proj", "down_proj") for e, c in ((2, 2), (5, 3), (7, 1))])


# ---------------------------------------------------------------- the per-expert view cache


def test_views_persist_across_calls_and_are_rebuilt_after_to():
    ex = moe_model("olmoe").model.layers[0].mlp.experts
    q = packed_experts(ex, 4)
    x, idx, w = routing(9)
    with torch.no_grad():
        first = q(x, idx, w)
        views = expert_views(q, "gate_up_proj")
        views[1].runtime_marker = "kept"  # stands for a kernel's per-tensor cache (e.g. an int4 repack)
        assert q(x, idx, w).equal(first)
        assert expert_views(q, "gate_up_proj") is views and views[1].runtime_marker == "kept"
        assert "views" not in " ".join(q.state_dict())
        q.to("cpu")  # any _apply drops the views: their caches belong to the old tensors
        again = expert_views(q, "gate_up_proj")
        assert again is not views and not hasattr(again[1], "runtime_marker")
        assert q(x, idx, w).equal(first)
        q.double()
        assert all(t.data_ptr() == getattr(q, f"gate_up_proj_{d}")[2].data_ptr()
                   for d, t in expert_views(q, "gate_up_proj")[2].data.items())
        close(q(x.double(), idx, w).float(), first)


def test_views_of_a_stock_module_follow_its_buffers():
    ex = moe_model("olmoe").model.layers[0].mlp.experts
    q = packed_experts(ex, 4)
    stock = copy.deepcopy(ex)
    delattr(stock, "gate_up_proj")
    register_packed(stock, "gate_up_proj", packed_tensor(q, "gate_up_proj"))
    views = expert_views(stock, "gate_up_proj")
    assert expert_views(stock, "gate_up_proj") is views
    name = next(n for n, _ in stock.named_buffers())
    getattr(stock, name).add_(0)  # an in-place write: a repack made from the old values would be stale
    assert expert_views(stock, "gate_up_proj") is not views
    views = expert_views(stock, "gate_up_proj")
    setattr(stock, name, getattr(stock, name).clone())  # a new tensor under the same name
    assert expert_views(stock, "gate_up_proj") is not views


# ---------------------------------------------------------------- transformers registration


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_registered_implementation_matches_eager_logits(arch, monkeypatch):
    model = moe_model(arch)
    model.set_experts_implementation("eager")
    with torch.no_grad():
        want = model(IDS).logits
    calls = []
    orig = experts_impl.grouped_experts
    monkeypatch.setattr(experts_impl, "grouped_experts", lambda *a: calls.append(1) or orig(*a))
    assert use_moequant_experts(model)
    assert model.config._experts_implementation == IMPLEMENTATION
    with torch.no_grad():
        got = model(IDS).logits
        close(got, want)
        decode = model(IDS[:, :1]).logits  # T=1
    close(decode, want[:, :1])
    assert len(calls) == 2 * model.config.num_hidden_layers
    assert "experts_implementation" not in model.config.to_dict()  # never written into a saved config


def test_registration_is_idempotent_and_guarded(monkeypatch):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    experts_impl.register_experts_implementation()
    experts_impl.register_experts_implementation()
    assert ALL_EXPERTS_FUNCTIONS[IMPLEMENTATION] is moequant_experts_forward
    monkeypatch.setitem(ExpertsInterface._global_mapping, IMPLEMENTATION, lambda *a: None)
    with pytest.raises(ValueError, match="already registered"):
        experts_impl.register_experts_implementation()


def test_dense_model_is_left_alone():
    from conftest import tiny_model

    model = tiny_model("llama")
    assert not use_moequant_experts(model)


def test_api_load_selects_moequant_experts(tmp_path, monkeypatch):
    """A checkpoint whose layer-1 experts are kept dense: after ``api.load`` the stock module dispatches to
    the registered grouped path and the logits match the in-memory quantized model's."""
    model = moe_model("olmoe")
    cfg = UniformConfig(bits=4, group_size=32)
    recipe = Recipe((Rule(r"re:model\.layers\.1\.mlp\.experts\..*", None), Rule("kind:experts", cfg),
                     Rule("kind:linear", cfg)))
    api.quantize(model, recipe, progress=False)
    with torch.no_grad():
        before = model(IDS).logits
    api.save(model, tmp_path / "c")
    loaded = api.load(tmp_path / "c")
    assert loaded.config._experts_implementation == IMPLEMENTATION
    assert isinstance(loaded.model.layers[0].mlp.experts, QuantExperts)
    stock = loaded.model.layers[1].mlp.experts
    assert not isinstance(stock, QuantExperts)
    calls = []
    orig = experts_impl.grouped_experts
    monkeypatch.setattr(experts_impl, "grouped_experts", lambda *a: calls.append(1) or orig(*a))
    with torch.no_grad():
        close(loaded(IDS).logits, before)
    assert len(calls) == 1  # the stock layer-1 experts; layer 0 is a QuantExperts, called directly
