"""The one tie rule (``checkpoint_io.stored_ties``): what ``api.save`` records from a materialized model's
storage and what the offloaded quantizer records from the meta skeleton's config must agree, for every
architecture, tied or not; and the storage view still finds a tie the config does not declare."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, tiny_config

from moequant.checkpoint_io import stored_ties, ties_by_config, ties_by_storage


def _models(arch: str, tie: bool):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch)
    cfg.tie_word_embeddings = tie
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with init_empty_weights(include_buffers=False):
        meta = AutoModelForCausalLM.from_config(cfg)
    return real, meta


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_skeleton_and_materialized_models_record_the_same_ties(arch, tie):
    real, meta = _models(arch, tie)
    want = {"lm_head.weight": "model.embed_tokens.weight"} if tie else {}
    assert ties_by_storage(real) == want
    assert stored_ties(real) == want
    assert stored_ties(meta) == ties_by_config(meta) == want  # the skeleton has no storage to compare


def test_storage_view_finds_undeclared_ties():
    real, _ = _models("llama", False)
    real.model.layers[1].mlp.up_proj.weight = real.model.layers[0].mlp.up_proj.weight  # shared, not declared
    assert stored_ties(real) == {"model.layers.1.mlp.up_proj.weight": "model.layers.0.mlp.up_proj.weight"}
    assert stored_ties(real, {"model.layers.0.mlp.up_proj.weight"}) == {}  # a packed tensor is not a tie source
