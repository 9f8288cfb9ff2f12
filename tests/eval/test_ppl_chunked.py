"""Perplexity from chunked logits (``chunked_window_nll``) equals the full-logits computation, and its
largest tensor does not grow with batch × window × vocabulary."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_config
from moequant.codecs.config import UniformConfig
from moequant.eval import perplexity
from moequant.eval.perplexity import PplConfig, default_chunk_rows, evaluate_perplexity
from moequant.formats.registry import encode
from moequant.nn.quant_linear import QuantLinear


class FullLogits(torch.nn.Module):
    """``model`` seen only through ``model(input_ids).logits``: the full-logits path (no decoder, no
    ``logits_to_keep``), i.e. the computation before chunking."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, input_ids, **kwargs):
        return self.inner(input_ids, **kwargs)


def build(arch: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def stream(n: int, vocab: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))  # [n]


@pytest.fixture
def chunk_calls(monkeypatch):
    calls: list[int] = []
    orig = perplexity.chunked_window_nll

    def spy(hidden, input_ids, n_scored, head, chunk_rows):
        calls.append(chunk_rows)
        return orig(hidden, input_ids, n_scored, head, chunk_rows)

    monkeypatch.setattr(perplexity, "chunked_window_nll", spy)
    return calls


def same_result(got, want, rel: float = 1e-6) -> None:
    assert got.tokens_per_window == want.tokens_per_window
    assert got.nll_per_window == pytest.approx(want.nll_per_window, rel=rel)
    assert got.ppl == pytest.approx(want.ppl, rel=rel)
    assert got.to_dict().keys() == want.to_dict().keys()


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("olmoe", {}),
    ("gemma3_text", {"final_logit_softcapping": 2.0}),  # a small cap: most logits are bent by it
])
def test_chunked_equals_full_logits(arch, overrides, chunk_calls):
    model = build(arch, **overrides)
    ids = stream(300, model.config.vocab_size)
    cfg = PplConfig(seqlen=64, stride=40, batch_size=3)
    want = evaluate_perplexity(FullLogits(model), ids, cfg, bos_id=1, progress=False)
    assert not chunk_calls
    got = evaluate_perplexity(model, ids, cfg, bos_id=1, progress=False)
    assert chunk_calls  # the chunked path ran, no silent fallback
    same_result(got, want)


@pytest.mark.parametrize("chunk_rows", [1, 7, 48, 63, 64, 10_000])
@pytest.mark.parametrize("add_bos,stride", [(True, None), (False, 23)])
def test_chunk_boundaries(chunk_rows, add_bos, stride, chunk_calls):
    """Chunks smaller than a window, not dividing it, equal to it, spanning windows and the whole batch."""
    model = build("llama")
    ids = stream(250, model.config.vocab_size, seed=7)  # a partial last window too
    cfg = PplConfig(seqlen=64, stride=stride, add_bos=add_bos, batch_size=4)
    want = evaluate_perplexity(FullLogits(model), ids, cfg, bos_id=1 if add_bos else None, progress=False)
    got = evaluate_perplexity(model, ids, cfg, bos_id=1 if add_bos else None, progress=False, chunk_rows=chunk_rows)
    assert chunk_calls and set(chunk_calls) == {chunk_rows}
    same_result(got, want)


def test_packed_head_is_called_as_a_module(chunk_calls):
    model = build("llama", tie_word_embeddings=False)
    model.lm_head = QuantLinear(encode(model.lm_head.weight.detach(), UniformConfig(bits=4, group_size=32)))
    ids = stream(200, model.config.vocab_size, seed=9)
    cfg = PplConfig(seqlen=48, batch_size=2)
    want = evaluate_perplexity(FullLogits(model), ids, cfg, bos_id=1, progress=False)
    got = evaluate_perplexity(model, ids, cfg, bos_id=1, progress=False, chunk_rows=20)
    assert chunk_calls
    same_result(got, want, rel=1e-5)  # a fast kernel may pick another path for another number of rows


def test_head_it_cannot_reproduce_falls_back_to_full_logits(chunk_calls, caplog):
    """Granite divides its logits by ``logits_scaling``: the check on the last position catches it."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    model = GraniteForCausalLM(GraniteConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                             logits_scaling=4.0, bos_token_id=1)).eval()
    ids = stream(150, 128, seed=11)
    cfg = PplConfig(seqlen=32, batch_size=2)
    want = evaluate_perplexity(FullLogits(model), ids, cfg, bos_id=1, progress=False)
    with caplog.at_level(logging.WARNING, logger="moequant.eval.perplexity"):
        got = evaluate_perplexity(model, ids, cfg, bos_id=1, progress=False)
    assert not chunk_calls
    assert sum("full logits" in r.getMessage() for r in caplog.records) == 1  # said once, not per batch
    same_result(got, want, rel=0)


def test_default_chunk_rows():
    assert default_chunk_rows(262_144) == 256  # 256 × 262k fp32 logits = 256 MiB
    assert default_chunk_rows(49_152) == 1024
    assert default_chunk_rows(10**9) == 1


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an aten op returns inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_largest_tensor_is_one_chunk_of_logits():
    """Vocabulary 50k, windows of 256 (+BOS), batch 4: the chunked path never holds more than
    ``chunk_rows × V`` logits; the full-logits path holds ``B × L × V`` (a regression would show here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, chunk = 50_000, 64
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab,
                                         max_position_embeddings=512, bos_token_id=1,
                                         tie_word_embeddings=False)).eval()
    ids = stream(1024, vocab, seed=3)
    cfg = PplConfig(seqlen=256, batch_size=4)
    with LargestTensor() as chunked:
        got = evaluate_perplexity(model, ids, cfg, bos_id=1, progress=False, chunk_rows=chunk)
    assert chunked.largest <= chunk * vocab
    with LargestTensor() as full:
        want = evaluate_perplexity(FullLogits(model), ids, cfg, bos_id=1, progress=False)
    assert full.largest >= 4 * 257 * vocab > 10 * chunked.largest
    same_result(got, want)
