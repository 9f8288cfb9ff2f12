"""The layer-wise distillation loss (``moequant finetune --loss layer``, ``finetune/layer_loss.py``) on tiny
3-layer models of every architecture: the teacher's captured hidden states are its own (``output_hidden_states``),
each student layer is scored on the teacher's input to it (not on the student's own hidden state), the terms
are averaged, no gradient crosses layers, the layers before the set do not compute, and the model stops after the
last layer of the set."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_config
from moequant.finetune.layer_loss import layer_loss, teacher_targets, trained_layers


def _models(arch: str):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch)
    cfg.num_hidden_layers = 3
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = (list(cfg.layer_types) * 2)[:3]
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".layers." in name and p.dim() >= 2:  # the decoder layers drift; embeddings stay the teacher's
                p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    return teacher, student


def _nmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).sum() / b.pow(2).sum())


def _hidden(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True, use_cache=False).hidden_states  # layer inputs, then outputs


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3_text", "olmoe", "qwen2_moe", "mixtral"])
def test_layer_loss_scores_each_layer_on_the_teachers_input(arch):
    teacher, student = _models(arch)
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(2))  # [b, L]
    t_hs, s_hs = _hidden(teacher, ids), _hidden(student, ids)
    targets = teacher_targets(teacher, ids, (0, 1))
    assert sorted(targets) == [0, 1]
    assert torch.equal(targets[0][0], t_hs[0]) and torch.equal(targets[0][1], t_hs[1])
    assert torch.equal(targets[1][0], t_hs[1]) and torch.equal(targets[1][1], t_hs[2])

    with torch.no_grad():
        loss0 = float(layer_loss(student, ids, {0: targets[0]}))
        loss1 = float(layer_loss(student, ids, {1: targets[1]}))
        both = float(layer_loss(student, ids, targets))
    # layer 0's input is the embeddings, the same in both models: its term is the student's own output error
    assert loss0 == pytest.approx(_nmse(s_hs[1], t_hs[1]), rel=1e-5) and loss0 > 1e-5
    # layer 1 on the teacher's input: the student with the teacher's layer 0 in front computes exactly that
    hybrid = copy.deepcopy(student)
    hybrid.model.layers[0] = teacher.model.layers[0]
    want1 = _nmse(_hidden(hybrid, ids)[2], t_hs[2])
    assert loss1 == pytest.approx(want1, rel=1e-5)
    assert abs(_nmse(s_hs[2], t_hs[2]) - want1) > 0.05 * want1  # its own path would have scored differently
    assert both == pytest.approx((loss0 + loss1) / 2, rel=1e-6)


def test_no_gradient_crosses_layers_and_the_model_stops_after_the_last():
    teacher, student = _models("llama")
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    calls = []
    student.model.layers[2].register_forward_pre_hook(lambda m, a: calls.append(2))
    student.model.norm.register_forward_pre_hook(lambda m, a: calls.append("norm"))
    student.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: calls.append("0.mlp"))
    loss = layer_loss(student, ids, teacher_targets(teacher, ids, (1,)))
    loss.backward()
    assert calls == []  # neither layer 2 nor the final norm ran, and layer 0 (before the set) did not compute
    assert "forward" not in vars(student.model.layers[0])  # its own forward is back
    with torch.no_grad():
        student(ids, use_cache=False)
    assert calls == ["0.mlp", 2, "norm"]
    grads = {n: p.grad for n, p in student.named_parameters()}
    assert all(g is None for n, g in grads.items() if ".layers.0." in n or "embed" in n)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".layers.1." in n)
    assert trained_layers(student, None) == (0, 1, 2) and trained_layers(student, (1,)) == (1,)


def test_an_instance_forward_of_a_skipped_layer_is_put_back():
    teacher, student = _models("llama")
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    layer0 = student.model.layers[0]
    ran = []

    def wrapped(*args, **kwargs):  # what a hook library leaves on a module
        ran.append(0)
        return type(layer0).forward(layer0, *args, **kwargs)

    layer0.forward = wrapped
    with torch.no_grad():
        layer_loss(student, ids, teacher_targets(teacher, ids, (1, 2)))
    assert ran == [] and vars(layer0)["forward"] is wrapped
    with torch.no_grad():
        student(ids, use_cache=False)
    assert ran == [0]
