"""Perplexity: the windowing protocol, and PPL on models whose answer is known."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from moequant.eval.perplexity import PplConfig, evaluate_perplexity, make_windows
from moequant.zoo.corpora import tokenize_corpus

BOS = 999


def _scored_positions(windows, stride, has_bos):
    """Absolute stream positions scored by each window (the last n_scored tokens of window i,
    which starts at i * stride)."""
    out = []
    for i, (ids, n_scored) in enumerate(windows):
        n_tok = ids.numel() - (1 if has_bos else 0)
        begin = i * stride
        out.extend(range(begin + n_tok - n_scored, begin + n_tok))
    return out


def _check_window_contents(stream, windows, stride, has_bos):
    for i, (ids, _) in enumerate(windows):
        body = ids[1:] if has_bos else ids
        if has_bos:
            assert ids[0].item() == BOS
        assert torch.equal(body, stream[i * stride:i * stride + body.numel()])


@pytest.mark.parametrize("has_bos", [True, False])
def test_non_overlapping_windows(has_bos):
    stream = torch.arange(1000)  # [1000]; token value == its position
    bos = BOS if has_bos else None
    windows = make_windows(stream, 100, 100, bos)
    assert len(windows) == 10
    assert all(ids.numel() == (101 if has_bos else 100) for ids, _ in windows)
    _check_window_contents(stream, windows, 100, has_bos)
    scored = _scored_positions(windows, 100, has_bos)
    assert len(scored) == len(set(scored)) == (1000 if has_bos else 990)
    expected = set(range(1000)) if has_bos else set(range(1000)) - set(range(0, 1000, 100))
    assert set(scored) == expected


@pytest.mark.parametrize("has_bos", [True, False])
def test_sliding_windows(has_bos):
    stream = torch.arange(1000)
    windows = make_windows(stream, 100, 50, BOS if has_bos else None)
    # starts 0, 50, ..., 900; the window starting at 900 reaches the end, so no window at 950
    assert len(windows) == 19
    _check_window_contents(stream, windows, 50, has_bos)
    assert [n for _, n in windows] == [100 if has_bos else 99] + [50] * 18
    scored = _scored_positions(windows, 50, has_bos)
    assert len(scored) == len(set(scored))  # none twice
    assert set(scored) == set(range(0 if has_bos else 1, 1000))  # all from the first once


def test_sliding_uneven_tail_and_partial_window():
    stream = torch.arange(1030)
    windows = make_windows(stream, 100, 70, None)
    scored = _scored_positions(windows, 70, False)
    assert sorted(scored) == list(range(1, 1030))
    # non-overlapping: the final partial window of 30 tokens is kept and scored on what it has
    windows = make_windows(stream, 100, 100, BOS)
    assert len(windows) == 11 and windows[-1][0].numel() == 31 and windows[-1][1] == 30
    # a one-token tail without BOS scores nothing and is dropped
    windows = make_windows(torch.arange(1001), 100, 100, None)
    assert len(windows) == 10 and sum(n for _, n in windows) == 990


def test_max_tokens():
    stream = torch.arange(1000)
    windows = make_windows(stream, 100, 100, BOS, max_tokens=250)
    assert [n for _, n in windows] == [100, 100, 50]
    assert max(_scored_positions(windows, 100, True)) == 249
    windows = make_windows(stream, 100, 50, None, max_tokens=250)
    assert sorted(_scored_positions(windows, 50, False)) == list(range(1, 250))


def test_config_checks():
    assert PplConfig().effective_stride == 512
    with pytest.raises(ValueError):
        PplConfig(seqlen=128, stride=256)
    with pytest.raises(ValueError):
        PplConfig(batch_size=0)
    with pytest.raises(ValueError):
        evaluate_perplexity(_UniformModel(8), torch.arange(8), PplConfig(seqlen=4), bos_id=None, progress=False)


# ---------------------------------------------------------------- models with a known answer


class _UniformModel(torch.nn.Module):
    """Logits [B, L, V] of zeros: every token has probability 1/V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))  # [B, L, V]


class _NextTokenModel(torch.nn.Module):
    """Probability ``p`` on ``(cur + 1) % V`` and ``(1 - p) / (V - 1)`` on every other token.
    Ids >= V (BOS) are read modulo V."""

    def __init__(self, vocab: int, p: float):
        super().__init__()
        self.vocab, self.p = vocab, p

    def forward(self, input_ids):
        nxt = (input_ids % self.vocab + 1) % self.vocab  # [B, L]
        logp = torch.full((*input_ids.shape, self.vocab), math.log((1 - self.p) / (self.vocab - 1)))  # [B, L, V]
        logp.scatter_(-1, nxt.unsqueeze(-1), math.log(self.p))
        return SimpleNamespace(logits=logp)


@pytest.mark.parametrize("cfg", [PplConfig(seqlen=64, batch_size=3), PplConfig(seqlen=64, stride=16, add_bos=False)])
def test_uniform_model_ppl_is_vocab(cfg):
    stream = torch.randint(0, 37, (1000,), generator=torch.Generator().manual_seed(0))  # [1000]
    res = evaluate_perplexity(_UniformModel(37), stream, cfg, bos_id=36, progress=False)
    assert res.ppl == pytest.approx(37.0, rel=1e-4)
    assert res.ci95[0] == pytest.approx(37.0, rel=1e-4) and res.ci95[1] == pytest.approx(37.0, rel=1e-4)
    assert res.tokens == (1000 if cfg.add_bos else 999) == sum(res.tokens_per_window)
    assert res.n_windows == len(res.nll_per_window) == (16 if cfg.add_bos else 60)


@pytest.mark.parametrize("cfg", [
    PplConfig(seqlen=60, batch_size=4),  # BOS = 9 predicts token 0, which starts every window
    PplConfig(seqlen=60, stride=20, batch_size=2),
    PplConfig(seqlen=37, add_bos=False, batch_size=5),
    PplConfig(seqlen=37, stride=11, add_bos=False, max_tokens=500),
])
def test_next_token_model_ppl_is_one_over_p(cfg):
    vocab, p = 10, 0.7
    stream = torch.arange(1234) % vocab  # [1234]: next = (cur + 1) % V throughout
    res = evaluate_perplexity(_NextTokenModel(vocab, p), stream, cfg, bos_id=vocab - 1, progress=False)
    assert res.ppl == pytest.approx(1 / p, rel=1e-6)
    n_used = min(1234, cfg.max_tokens or 1234)
    assert res.tokens == (n_used if cfg.add_bos else n_used - 1 if cfg.stride else n_used - res.n_windows)
    for nll, n in zip(res.nll_per_window, res.tokens_per_window):
        assert nll == pytest.approx(-math.log(p) * n, rel=1e-6)
    d = res.to_dict()
    assert d["seqlen"] == cfg.seqlen and d["stride"] == cfg.effective_stride and len(d["ci95"]) == 2


# ---------------------------------------------------------------- a real transformers model


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, bos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def test_llama_matches_hf_loss_single_window(llama):
    stream = torch.randint(2, 128, (64,), generator=torch.Generator().manual_seed(1))  # [64]
    res = evaluate_perplexity(llama, stream, PplConfig(seqlen=64, add_bos=False), bos_id=None, progress=False)
    with torch.no_grad():
        loss = llama(stream[None], labels=stream[None]).loss
    assert res.tokens == 63
    assert res.ppl == pytest.approx(math.exp(loss.item()), rel=1e-5)
    # with BOS, the window is [BOS] + stream and all 64 tokens are scored
    res = evaluate_perplexity(llama, stream, PplConfig(seqlen=64), bos_id=1, progress=False)
    ids = torch.cat([torch.tensor([1]), stream])[None]  # [1, 65]
    labels = ids.clone()
    labels[0, 0] = -100
    with torch.no_grad():
        loss = llama(ids, labels=labels).loss
    assert res.tokens == 64
    assert res.ppl == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_llama_sliding_matches_hf_recipe(llama):
    # The Hugging Face "perplexity of fixed-length models" loop, with its -100 masking of the context.
    stream = torch.randint(2, 128, (300,), generator=torch.Generator().manual_seed(2))  # [300]
    seqlen, stride = 64, 24
    nll_sum, n_tok, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, 300, stride):
            end = min(begin + seqlen, 300)
            trg_len = end - prev_end
            ids = stream[begin:end][None]  # [1, L]
            target = ids.clone()
            target[:, :-trg_len] = -100
            n_valid = int((target[:, 1:] != -100).sum())
            nll_sum += llama(ids, labels=target).loss.item() * n_valid
            n_tok += n_valid
            prev_end = end
            if end == 300:
                break
    cfg = PplConfig(seqlen=seqlen, stride=stride, add_bos=False, batch_size=3)
    res = evaluate_perplexity(llama, stream, cfg, bos_id=None, progress=False)
    assert res.tokens == n_tok == 299
    assert res.ppl == pytest.approx(math.exp(nll_sum / n_tok), rel=1e-5)


def test_llama_batching_does_not_change_windows(llama):
    stream = torch.randint(2, 128, (500,), generator=torch.Generator().manual_seed(3))
    one = evaluate_perplexity(llama, stream, PplConfig(seqlen=48, batch_size=1), bos_id=1, progress=False)
    many = evaluate_perplexity(llama, stream, PplConfig(seqlen=48, batch_size=4), bos_id=1, progress=False)
    assert one.tokens_per_window == many.tokens_per_window
    assert many.nll_per_window == pytest.approx(one.nll_per_window, rel=1e-5)


# ---------------------------------------------------------------- tokenization


def test_tokenize_corpus_whole_text_without_specials():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "the", "cat", "sat", "on", "mat", "\n"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>", model_max_length=8)
    text = "the cat sat on the mat dog\n" * 50  # far longer than model_max_length
    ids = tokenize_corpus(hf, text)
    assert ids.dtype == torch.long and ids.ndim == 1
    assert ids.tolist() == [2, 3, 4, 5, 2, 6, 0] * 50
    assert hf(text)["input_ids"][0] == 1  # the tokenizer does add BOS by default; we do not
