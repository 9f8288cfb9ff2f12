"""``eval tasks`` log-likelihoods from the output head at the continuation positions only
(``make_lm``'s ``ChunkedHFLM``) equal lm-eval's stock ``HFLM`` (full logits ``[B, L, V]``): same
numbers, same ``is_greedy``, same order, with left truncation, batch padding and shared-prefix groups;
the head sees only the continuation rows; a model whose head cannot be reproduced falls back to stock."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from conftest import tiny_config, toy_tok_model, toy_words

pytest.importorskip("lm_eval")

from moequant.eval import perplexity  # noqa: E402
from moequant.eval.lm_eval_adapter import make_lm  # noqa: E402

MAX_LEN = 24


@pytest.fixture(scope="module")
def tok():
    return toy_tok_model("llama", toy_words(3000))[0]


def build(arch: str, **overrides):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch)
    cfg.vocab_size = 320  # the toy tokenizer's
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def greedy(model, ctx: list[int], n: int) -> list[int]:
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(ctx):]


def token_requests(model, seed: int = 0):
    """(strings, context ids, continuation ids) of every length the scoring has cases for: short and long,
    over ``MAX_LEN + 1`` (left-truncated; one continuation of exactly ``MAX_LEN`` tokens), one-token
    choices of one context (one shared row), continuations of different lengths ending one row
    (same ``context + continuation[:-1]``), an exact duplicate, and the model's own greedy continuations
    (``is_greedy`` True). Returns the requests and the indices of the shorter continuations that end
    another request's row (see ``test_equals_stock_hflm``)."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(3, 320) for _ in range(n)]  # noqa: E731
    reqs = [(ids(c), ids(k)) for c, k in [(1, 1), (3, 2), (7, 1), (12, 5), (20, 3), (23, 1), (30, 4), (45, 10),
                                          (2, MAX_LEN), (9, 6), (16, 16), (5, 1)]]
    shared = ids(8)
    reqs += [(shared, [t]) for t in (5, 17, 99, 250)]  # one question, one-token choices
    base = ids(10)
    uneven = [len(reqs) + 1, len(reqs) + 2]
    reqs += [(base, [40, 41, 42]), (base + [40], [41, 77]), (base + [40, 41], [42])]  # one row, three answers
    reqs.append(reqs[3])  # a duplicate
    for c in (4, 11, 18):
        ctx = ids(c)
        reqs.append((ctx, greedy(model, ctx[-MAX_LEN:], 3)))
    reqs.append((reqs[-1][0], reqs[-1][1][:1]))  # greedy one-token prefix of the same context
    return [(("c", f"x{i}"), c, k) for i, (c, k) in enumerate(reqs)], uneven


def scores(lm, reqs):
    return lm._loglikelihood_tokens(reqs, disable_tqdm=True)


def same(got, want, skip=()) -> None:
    got, want = ([a for i, a in enumerate(x) if i not in skip] for x in (got, want))
    assert [g for _, g in got] == [g for _, g in want]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-4, rel=0)


def stock_lm(model, tok, batch_size: int, logits_cache: bool = True):
    lm = make_lm(model, tok, batch_size=batch_size, max_length=MAX_LEN, chunked=False)
    lm.logits_cache = logits_cache
    return lm


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("gemma3_text", {"final_logit_softcapping": 2.0})])
def test_equals_stock_hflm(one_thread, tok, arch, overrides, caplog):
    """Every request equals stock HFLM, but for one case where stock is wrong: requests with one
    ``context + continuation[:-1]`` and continuations of different lengths share one row, and stock
    gathers a shorter continuation's log-probs from the *first* positions of the longest one's (its
    ``is_greedy`` uses the last, right, ones). Those equal stock without that sharing (``logits_cache=False``),
    i.e. each request scored on its own, as every request does."""
    model = build(arch, **overrides)
    reqs, uneven = token_requests(model)
    calls = []
    orig = perplexity.head_target_logprobs

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    for bs, chunk_rows in [(1, None), (3, 1), (4, 5), (32, None)]:
        want = scores(stock_lm(model, tok, bs), reqs)
        alone = scores(stock_lm(model, tok, bs, logits_cache=False), reqs)
        lm = make_lm(model, tok, batch_size=bs, max_length=MAX_LEN, chunk_rows=chunk_rows)
        with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING):
            mp.setattr(perplexity, "head_target_logprobs", spy)
            got = scores(lm, reqs)
        assert calls and lm._scorer.reason is None  # the chunked path ran, no fallback
        assert not any("full logits" in r.getMessage() for r in caplog.records)
        same(got, want, skip=uneven)
        same(got, alone)
        assert all(abs(want[i][0] - alone[i][0]) > 1e-2 for i in uneven)  # stock's slip, still there
    assert sum(g for _, g in want) >= 4  # the greedy continuations are found greedy, the rest are not
    assert not all(g for _, g in want)


def test_strings_through_loglikelihood(one_thread, tok):
    """The public path (``loglikelihood`` on Instances, empty contexts included) and the cache hook."""
    from lm_eval.api.instance import Instance

    model = build("llama")
    pairs = [("Q: w3 w10 w17\nA:", " w24"), ("Q: w5\nA:", " w12 w19 w26"), ("Q: w5\nA:", " w12"),
             ("", "w1 w2 w3"), ("Q: " + " ".join(f"w{i}" for i in range(30)) + "\nA:", " w1 w2")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    want = stock_lm(model, tok, 2).loglikelihood(reqs, disable_tqdm=True)
    lm = make_lm(model, tok, batch_size=2, max_length=MAX_LEN)
    cached = []
    lm.cache_hook.add_partial = lambda kind, key, value: cached.append((kind, key, value))
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    same(got, want)
    assert sorted(cached, key=str) == sorted([("loglikelihood", p, a) for p, a in zip(pairs, got)], key=str)


def test_head_applied_to_continuation_rows_only(one_thread, tok):
    """The head's rows: per batch row, one for the model's own ``logits_to_keep=1`` and one for the check
    that reproduces it, then the continuation positions; the stock path applies it to every position of
    the padded batch (``B × L``), and so would any regression that materialises the full logits."""
    model = build("llama", tie_word_embeddings=False)
    rng = random.Random(3)
    reqs = [(("c", str(i)), [rng.randrange(3, 320) for _ in range(c)], [rng.randrange(3, 320) for _ in range(k)])
            for i, (c, k) in enumerate([(20, 2), (14, 1), (18, 3), (9, 1), (16, 4), (11, 2), (22, 1)])]
    rows: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[:-1].numel()))
    try:
        bs, chunk = 3, 4
        got = scores(make_lm(model, tok, batch_size=bs, max_length=MAX_LEN, chunk_rows=chunk), reqs)
        ours, rows[:] = list(rows), []
        want = scores(stock_lm(model, tok, bs), reqs)
        stock = list(rows)
    finally:
        hook.remove()
    same(got, want)
    n_cont = sum(len(k) for _, _, k in reqs)
    assert sum(ours) == n_cont + 2 * len(reqs)
    assert max(ours) <= max(bs, chunk)
    # stock: three batches, sorted longest first, each padded to its longest row
    lens = sorted((len(c) + len(k) - 1 for _, c, k in reqs), reverse=True)
    padded = sum(len(lens[k:k + bs]) * lens[k] for k in range(0, len(lens), bs))
    assert sum(stock) == padded > 3 * sum(ours)


def granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    return GraniteForCausalLM(GraniteConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                            logits_scaling=4.0, bos_token_id=0)).eval()


def test_fallback_when_the_head_check_fails(one_thread, tok, caplog):
    """Granite divides its logits by ``logits_scaling``: the check catches it and lm-eval's own path
    scores every request, said once."""
    model = granite()
    reqs, _ = token_requests(model, seed=1)
    want = scores(stock_lm(model, tok, 3), reqs)
    lm = make_lm(model, tok, batch_size=3, max_length=MAX_LEN)
    with caplog.at_level(logging.WARNING, logger="moequant.eval.lm_eval_adapter"):
        got = scores(lm, reqs)
        again = scores(lm, reqs[:5])
    assert lm._scorer.reason.startswith("its output head")
    assert sum("full logits" in r.getMessage() for r in caplog.records) == 1
    assert got == want  # the stock computation itself
    assert again == want[:5]


def test_fallback_midway_keeps_answers_and_order(one_thread, tok, monkeypatch):
    """A check that fails on a later batch: the batches already scored keep their answers, the rest go to
    lm-eval's path, every answer in its request's place."""
    model = build("llama")
    reqs, uneven = token_requests(model, seed=2)
    want = scores(stock_lm(model, tok, 4), reqs)
    lm = make_lm(model, tok, batch_size=4, max_length=MAX_LEN)
    lm._scorer = perplexity.ChunkedScorer(lm.model, None)
    orig, n = lm._scorer.hidden_states, [0]

    def flaky(input_ids, kwargs):
        n[0] += 1
        if n[0] == 3:
            lm._scorer.reason = "test"
        return orig(input_ids, kwargs)

    monkeypatch.setattr(lm._scorer, "hidden_states", flaky)
    got = scores(lm, reqs)
    assert n[0] == 3
    same(got, want, skip=uneven)  # those: right from us, slipped from lm-eval, by where the cut falls
