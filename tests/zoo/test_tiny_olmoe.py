"""The tiny OLMoE fixture builder, on a micro config (seconds): determinism, reload, training record."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from moequant.errors import MoequantError
from moequant.zoo.tiny_olmoe import (
    VARIANTS,
    TinyOlmoeConfig,
    build_tiny_olmoe,
    load_balancing_loss,
    lr_at,
    make_windows,
)

MICRO = TinyOlmoeConfig(
    vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_experts=4, top_k=2, num_heads=2,
    max_position_embeddings=128, seq_len=64, batch_size=8, lr=3e-3, warmup_steps=2, max_steps=20, log_every=5,
    bf16_autocast=False, max_train_chars=100_000, max_valid_chars=20_000, count_seqs=8,
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_tiny_olmoe(tmp_path_factory.mktemp("a") / "tiny", "tiny-olmoe", config=MICRO, progress=False)


def test_same_seed_gives_identical_files(built, tmp_path):
    again = build_tiny_olmoe(tmp_path / "tiny", "tiny-olmoe", config=MICRO, progress=False)
    assert _sha(again / "model.safetensors") == _sha(built / "model.safetensors")
    assert _sha(again / "tokenizer.json") == _sha(built / "tokenizer.json")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_reloads_with_auto_classes(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built)
    model = AutoModelForCausalLM.from_pretrained(built)
    assert tok.bos_token_id is not None and model.config.bos_token_id == tok.bos_token_id
    assert model.config.output_router_logits is False
    ids = [tok.bos_token_id, *tok("the company said it expects", add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits  # [1, T, V]
    assert logits.shape == (1, len(ids), len(tok))
    assert torch.isfinite(logits).all()


def test_training_record(built):
    rec = json.loads((built / "training.json").read_text())
    assert rec["config"]["seed"] == MICRO.seed and rec["steps"] == MICRO.max_steps
    assert [p["step"] for p in rec["loss_curve"]] == [5, 10, 15, 20]
    assert all({"loss", "aux_loss", "lr"} <= set(p) for p in rec["loss_curve"])
    counts = rec["expert_counts"]
    assert len(counts) == MICRO.num_layers and all(len(c) == MICRO.num_experts for c in counts)
    tokens = rec["expert_counts_tokens"]
    assert tokens == MICRO.count_seqs * MICRO.seq_len
    assert sum(map(sum, counts)) == tokens * MICRO.top_k * MICRO.num_layers
    assert rec["valid"]["ppl"] > 1 and rec["tokens_seen"] == 20 * MICRO.batch_size * MICRO.seq_len


def test_loss_decreases(built):
    curve = json.loads((built / "training.json").read_text())["loss_curve"]
    assert curve[-1]["loss"] < curve[0]["loss"] - 0.2


def test_windows_start_with_bos():
    w = make_windows(torch.arange(10, 30), seq_len=5, bos_id=0)  # 20 tokens -> 5 windows of BOS + 4
    assert w.shape == (5, 5) and (w[:, 0] == 0).all() and w[1, 1:].tolist() == [14, 15, 16, 17]


def test_balance_loss_is_one_when_uniform_and_larger_when_collapsed():
    uniform = torch.zeros(64, 4)  # ties: topk picks the same experts, but probs are uniform
    balanced = torch.eye(4).repeat(16, 1) * 5  # each expert first choice for a quarter of tokens
    collapsed = torch.tensor([5.0, 4.0, 0.0, 0.0]).repeat(64, 1)
    assert load_balancing_loss((balanced,), top_k=1).item() == pytest.approx(1.0)
    assert load_balancing_loss((uniform,), top_k=2).item() == pytest.approx(1.0)
    assert load_balancing_loss((collapsed, balanced), top_k=2).item() > 1.4


def test_lr_schedule():
    cfg = TinyOlmoeConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)


def test_variants_and_errors(tmp_path):
    assert VARIANTS["tiny-olmoe"].router_aux_loss_coef > 0 and VARIANTS["tiny-olmoe-collapsed"].router_aux_loss_coef == 0
    with pytest.raises(MoequantError, match="test split"):
        TinyOlmoeConfig(train_corpora=(("ptb", "test"),))
    with pytest.raises(MoequantError, match="unknown tiny OLMoE variant"):
        build_tiny_olmoe(tmp_path / "x", "tiny-mixtral", progress=False)
