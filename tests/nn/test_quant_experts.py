import copy

import pytest
import torch

from conftest import MOE_ARCHS, tiny_model
from moequant.codecs.config import UniformConfig
from moequant.formats.registry import encode
from moequant.nn.quant_experts import QuantExperts


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_quant_experts_matches_reference_forward_on_dequantized_weights(arch):
    model = tiny_model(arch)
    ref = copy.deepcopy(model.model.layers[0].mlp.experts)
    cfg = UniformConfig(bits=3, group_size=32)
    gu = encode(ref.gate_up_proj.detach(), cfg)  # [E, 2I, H]
    dn = encode(ref.down_proj.detach(), cfg)  # [E, H, I]
    q = QuantExperts(gu, dn, ref.act_fn)
    with torch.no_grad():
        ref.gate_up_proj.copy_(gu.dequantize())
        ref.down_proj.copy_(dn.dequantize())
    g = torch.Generator().manual_seed(1)
    T, E, k = 37, ref.num_experts, 2
    x = torch.randn(T, 64, generator=g)  # [T, H]
    # expert 3 never routed: it must not be needed
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])  # [T, k]
    w = torch.softmax(torch.randn(T, k, generator=g), -1)  # [T, k]
    with torch.no_grad():
        expected = ref(x, idx, w)
        got = q(x, idx, w)
    assert (got - expected).abs().max().item() <= 1e-5
    # and quantization did change the weights (the comparison is not vacuous)
    assert (gu.dequantize() - model.model.layers[0].mlp.experts.gate_up_proj).abs().max() > 1e-3


def test_quant_experts_decodes_only_routed_experts(monkeypatch):
    model = tiny_model("olmoe")
    ex = model.model.layers[0].mlp.experts
    cfg = UniformConfig(bits=4, group_size=32)
    q = QuantExperts(encode(ex.gate_up_proj.detach(), cfg), encode(ex.down_proj.detach(), cfg), ex.act_fn)
    decoded = []
    orig = QuantExperts._expert_linear

    def spy(self, name, e, x):
        decoded.append(e)
        return orig(self, name, e, x)

    monkeypatch.setattr(QuantExperts, "_expert_linear", spy)
    idx = torch.tensor([[0, 2], [2, 0], [0, 2]])
    q(torch.randn(3, 64), idx, torch.full((3, 2), 0.5))
    assert sorted(set(decoded)) == [0, 2] and len(decoded) == 4
