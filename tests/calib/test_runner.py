"""Layer-wise runner: running the captured inputs through the layers one by one reproduces the
model's own forward (per-layer kwargs included: Gemma3 alternates sliding and full attention), in
memory and spilled to files; calibration windows are seeded and carry BOS."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, tiny_model
from moequant.calib.data import sample_windows
from moequant.calib.runner import LayerwiseRunner
from moequant.errors import MoequantError
from moequant.models.adapters import adapter_for, decoder_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def _last_layer_output(model, tokens):
    out = []
    layers = decoder_layers(model, adapter_for(model))
    h = layers[-1].register_forward_hook(lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for b in tokens.split(3):
            model(input_ids=b, use_cache=False)
    h.remove()
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spill", [False, True])
def test_layerwise_matches_forward(arch, spill, tmp_path):
    model = tiny_model(arch).eval()
    if arch == "gemma3_text":
        model.config.sliding_window = 8  # windows shorter than the sequence: the two mask kinds differ
    tokens = torch.randint(3, 256, (5, 24), generator=torch.Generator().manual_seed(0))
    ref = _last_layer_output(model, tokens)
    runner = LayerwiseRunner(model, adapter_for(model), tokens, batch_size=3, spill_dir=tmp_path if spill else None)
    assert [runner.hidden(j).shape[0] for j in range(2)] == [3, 2] and runner.tokens == 5 * 24
    for i in range(len(runner.layers)):
        runner.run(i, keep_outputs=True)
    for j, want in enumerate(ref):
        torch.testing.assert_close(runner.hidden(j), want, rtol=1e-5, atol=1e-5)
    if spill:
        assert sorted(p.name for p in tmp_path.iterdir())[:2] == ["act_0_0.bin", "act_0_1.bin"]


def test_layers_restored_after_capture():
    model = tiny_model("olmoe")
    before = list(decoder_layers(model, adapter_for(model)))
    LayerwiseRunner(model, adapter_for(model), torch.zeros(2, 8, dtype=torch.long))
    assert list(decoder_layers(model, adapter_for(model))) == before


def test_sample_windows_seeded_with_bos():
    ids = torch.arange(1000)
    a = sample_windows(ids, 4, 16, seed=0, bos_id=7)
    b = sample_windows(ids, 4, 16, seed=0, bos_id=7)
    c = sample_windows(ids, 4, 16, seed=1, bos_id=7)
    assert a.shape == (4, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == 7).all()
    assert torch.equal(a[:, 2:] - a[:, 1:-1], torch.ones(4, 14, dtype=torch.long))  # consecutive text
    assert sample_windows(ids, 2, 16, seed=0, bos_id=None).shape == (2, 16)
    with pytest.raises(MoequantError, match="fewer than one window"):
        sample_windows(torch.arange(10), 1, 16, seed=0, bos_id=None)
