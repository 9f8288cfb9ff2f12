"""Bits/weight accounting of the peer scripts (benchmarks/peers): counted from stored tensors, not nominal.

The GGUF test needs only gguf-py (a core dependency); the HQQ test skips cleanly without ``hqq``."""

from __future__ import annotations


import json

import numpy as np
import pytest
import torch

from conftest import BENCHMARKS, bench_module

def _load(name: str):
    return bench_module(BENCHMARKS / "peers" / f"{name}.py", f"peers_{name}")


def test_gguf_bits_counts_decoder_linears_only(tmp_path):
    import gguf
    from gguf import GGMLQuantizationType as T

    mod = _load("llamacpp_peer")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    q8 = gguf.quants.quantize(rng.standard_normal((64, 96)).astype(np.float32), T.Q8_0)  # 34 B per 32 weights
    w.add_tensor("blk.0.attn_q.weight", q8, raw_shape=q8.shape, raw_dtype=T.Q8_0)
    w.add_tensor("blk.0.ffn_down.weight", rng.standard_normal((32, 64)).astype(np.float16))  # F16
    w.add_tensor("blk.0.attn_norm.weight", np.ones(96, np.float32))  # not a linear
    w.add_tensor("token_embd.weight", rng.standard_normal((10, 96)).astype(np.float16))  # not in blk.
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    acct = mod.gguf_bits(path)
    n_q8, n_f16 = 64 * 96, 32 * 64
    assert acct["quantized_elements"] == n_q8 + n_f16
    assert acct["quantized_bytes"] == n_q8 // 32 * 34 + n_f16 * 2
    assert acct["bits_per_weight"] == pytest.approx((n_q8 * 8.5 + n_f16 * 16) / (n_q8 + n_f16))
    assert acct["tensor_types"] == {"Q8_0": 1, "F16": 1}
    assert acct["non_block_tensors"] == {"token_embd.weight": "F16"}


@pytest.mark.parametrize("bits, expected", [(4, 4.5), (2, 2.5), (3, None)])
def test_hqq_bits_from_stored_tensors(bits, expected, one_thread):
    pytest.importorskip("hqq")
    mod = _load("hqq_peer")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.q_proj = torch.nn.Linear(128, 48, bias=False)  # 96 groups of 64

    m = Tiny()
    w0 = m.q_proj.weight.detach().clone()
    _, acct = mod.quantize_hqq(m, bits, 64)
    assert acct["quantized_elements"] == 48 * 128
    bpw = 8 * acct["quantized_bytes"] / acct["quantized_elements"]
    if expected is None:  # 3-bit: ten codes per int32, 96 group rows padded to 100 -> 10 words per column of 64
        expected = (10 * 64 * 32 + 96 * 2 * 16) / (48 * 128)
    assert bpw == pytest.approx(expected)
    err = (m.q_proj.weight - w0).pow(2).mean() / w0.pow(2).mean()
    assert 0 < err < {4: 0.02, 3: 0.06, 2: 0.3}[bits]  # weights replaced by HQQ's decode, not left alone


def test_an_interrupted_scoring_continues_where_it_stopped(tmp_path):
    pc = _load("peer_common")
    ids = torch.arange(5, 5 + 3000) % 97  # 3,000 tokens: 6 windows of 512 (the last one shorter)
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(97, 97, generator=gen)  # logits of the next token given this one: a fixed toy model
    calls = []

    def logits_of(tokens, stop_at=None):
        if stop_at is not None and len(calls) == stop_at:
            raise KeyboardInterrupt
        calls.append(tokens)
        return table[torch.tensor(tokens) % 97]  # [L, V]

    whole = pc.score_logits_fn(logits_of, ids, 96, 0)
    n = whole.n_windows
    assert n == 6 and len(calls) == n
    partial = tmp_path / "score.json.partial"
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        pc.score_logits_fn(lambda t: logits_of(t, stop_at=5), ids, 96, 0, partial=partial, model_key="m:1")
    assert len(json.loads(partial.read_text())["nll"]) == pc.PARTIAL_EVERY == 4  # kept every 4
    calls.clear()
    again = pc.score_logits_fn(logits_of, ids, 96, 0, partial=partial, model_key="m:1")
    assert len(calls) == n - 4  # only the windows not kept
    assert again.nll_per_window == whole.nll_per_window and again.ppl == whole.ppl
    calls.clear()
    pc.score_logits_fn(logits_of, ids, 96, 0, partial=partial, model_key="m:2")  # another file: start over
    assert len(calls) == n
