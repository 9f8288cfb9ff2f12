import pytest
import torch

from conftest import ARCHS, MOE_ARCHS, tiny_model
from moequant.errors import MoequantError
from moequant.models.adapters import adapter_for, iter_targets


@pytest.mark.parametrize("arch", ARCHS)
def test_targets_cover_every_linear_and_expert_tensor(arch):
    model = tiny_model(arch)
    targets = list(iter_targets(model, adapter_for(model)))
    per_layer = [t for t in targets if t.layer == 0]
    names = {t.name.split("layers.0.")[1] for t in per_layer}
    attn = {f"self_attn.{p}_proj.weight" for p in "qkvo"}
    assert attn <= names
    if arch in MOE_ARCHS:
        experts = [t for t in per_layer if t.kind == "experts"]
        assert [t.param for t in experts] == ["gate_up_proj", "down_proj"]
        assert experts[0].shape == (4, 128, 64) and experts[1].shape == (4, 64, 64)
        # the router is never a target
        assert not any(".mlp.gate." in t.name for t in targets)
    else:
        assert {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"} <= names
    n_layers = model.config.num_hidden_layers
    assert len(targets) == n_layers * len(per_layer)


def test_unsupported_architecture_is_named():
    class Cfg:
        model_type = "gpt2"

    class M(torch.nn.Module):
        config = Cfg()

    with pytest.raises(MoequantError, match="unsupported architecture 'gpt2'"):
        adapter_for(M())
