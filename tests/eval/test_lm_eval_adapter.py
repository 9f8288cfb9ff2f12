"""The lm-eval adapter scores continuations exactly like a direct forward pass, for a float model and
for a packed (quantized, saved and reloaded) one."""

from __future__ import annotations

import pytest
import torch
from conftest import toy_tok_model, toy_words

pytest.importorskip("lm_eval")

from moequant import api  # noqa: E402
from moequant.alloc.recipe import Recipe  # noqa: E402
from moequant.codecs.config import UniformConfig  # noqa: E402
from moequant.eval.lm_eval_adapter import make_lm  # noqa: E402
from moequant.nn.quant_linear import QuantLinear  # noqa: E402

PAIRS = [("Q: w3 w10 w17\nA:", " w24"), ("Q: w5\nA:", " w12 w19 w26"), ("Q: w40 w47 w54 w61\nA:", " w68"),
         ("Q: w1 w2\nA:", " w3 w4"), ("Q: w90\nA:", " w0 w7")]


@pytest.fixture(scope="module")
def tok_and_model():
    tok, model = toy_tok_model("llama", toy_words(3000))
    return tok, model.eval()


def direct_loglik(model, tok, context: str, continuation: str) -> float:
    """Sum of log-softmax of the continuation tokens, one unpadded forward pass of context+continuation."""
    whole = tok(context + continuation)["input_ids"]
    n_ctx = len(tok(context)["input_ids"])
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits.double().log_softmax(-1)[0]  # [T, V]
    return float(sum(logp[p - 1, whole[p]] for p in range(n_ctx, len(whole))))


def adapter_logliks(model, tok, batch_size: int) -> list[float]:
    from lm_eval.api.instance import Instance

    lm = make_lm(model, tok, batch_size=batch_size, max_length=128)
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)]
    return [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]


def test_adapter_matches_forward_pass(one_thread, tok_and_model):
    tok, model = tok_and_model
    want = [direct_loglik(model, tok, c, x) for c, x in PAIRS]
    for bs in (1, 3):  # batch 3 pads the shorter rows: padding must not leak into the scores
        got = adapter_logliks(model, tok, bs)
        assert got == pytest.approx(want, abs=1e-4)
    assert max(want) - min(want) > 1.0  # the five continuations really differ


def test_adapter_on_packed_checkpoint(one_thread, tok_and_model, tmp_path):
    import copy

    tok, model = tok_and_model
    q = copy.deepcopy(model)
    api.quantize(q, Recipe.uniform(UniformConfig(bits=2, symmetric=False, group_size=32)), progress=False)
    api.save(q, tmp_path / "q", tokenizer=tok)
    loaded = api.load(tmp_path / "q")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 2 * 7  # packed modules, not fp copies
    want = [direct_loglik(loaded, tok, c, x) for c, x in PAIRS]
    got = adapter_logliks(loaded, tok, 2)
    assert got == pytest.approx(want, abs=1e-4)
    fp = [direct_loglik(model, tok, c, x) for c, x in PAIRS]
    assert max(abs(a - b) for a, b in zip(got, fp)) > 1e-3  # the quantized model is the one being scored
