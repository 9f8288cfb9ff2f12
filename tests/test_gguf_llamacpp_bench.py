"""benchmarks/export/gguf_llamacpp.py: the calibration text written for llama-imatrix keeps every window in its
own chunk — each window's text is followed by a one-token separator, and the last one by a separator that does
not end in a newline (llama.cpp drops a prompt file's final newline, which cost llama-imatrix the last chunk); and
llama-quantize stores the token embedding and the output in the types our file has them in (same size)."""

from __future__ import annotations

from conftest import BENCHMARKS, bench_module, toy_lines, toy_words


def _tok():
    from moequant.zoo.tiny_olmoe import train_tokenizer

    return train_tokenizer([toy_lines(toy_words(3000))], 320)


def test_the_last_window_is_not_followed_by_a_newline():
    m = bench_module(BENCHMARKS / "export" / "gguf_llamacpp.py", "gguf_llamacpp_bench")
    tok = _tok()
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    text, nxt = "w3 w17 w5 w44", "w8 w61 w2"
    body, next_body = ids(text), ids(nxt)
    inner = m.pick_separator(tok, body, text, next_body, nxt)
    last = m.pick_separator(tok, body, text, None, None)
    assert inner == "\n"  # the first choice between windows: one token on both sides
    assert not last.endswith("\n") and last in m.SEPARATORS
    after = ids(text + last)
    assert len(after) == len(body) + 1 and after[:-1] == body  # still exactly one token after the window


def test_llama_quantize_gets_our_embedding_and_output_types():
    # our q2_k run of qwen2.5-coder-1.5b stores token_embd in Q4_K and output in Q6_K: llama.cpp's file must match
    m = bench_module(BENCHMARKS / "export" / "gguf_llamacpp.py", "gguf_llamacpp_bench")
    ours = {"token_embd.weight": ("Q4_K", 1), "output.weight": ("Q6_K", 2), "blk.0.attn_q.weight": ("Q2_K", 3)}
    assert m.embedding_and_output_types(ours, "f16") == ("Q4_K", "Q6_K")
    tied = {"token_embd.weight": ("Q8_0", 1)}  # a tied head (no output.weight): the kept type, nothing to apply to
    assert m.embedding_and_output_types(tied, "bf16") == ("Q8_0", "BF16")
    assert m.embedding_and_output_types({}, "f16") == ("F16", "F16")


def _delta(ratio, lo, hi):
    return {"ratio": ratio, "ratio_ci": [lo, hi], "verdict": "x"}


def test_the_parity_rows_say_whether_each_run_is_within_one_percent():
    # vs-llamacpp --parity: our run scored in moequant and its GGUF in llama.cpp; one row per run, 1% either side
    m = bench_module(BENCHMARKS / "export" / "gguf_llamacpp.py", "gguf_llamacpp_bench")
    base = {"llamacpp_score": {"ppl": 56.49}, "ours_contents": {"tensor_bytes": 7}, "llamacpp_contents":
            {"tensor_bytes": 7}, "ours_over_llamacpp": _delta(0.9, 0.89, 0.91)}
    rows = [{**base, "name": "q2_k", "ours_score": {"ppl": 50.5}, "ours_moequant_score": {"ppl": 50.0},
             "ours_llamacpp_over_moequant": _delta(1.0099, 1.0094, 1.0104), "ours_generation": {"greedy_text": " P"}},
            {**base, "name": "q3_k", "ours_score": {"ppl": 40.0}, "ours_moequant_score": {"ppl": 39.5},
             "ours_llamacpp_over_moequant": _delta(1.0101, 1.0096, 1.0106), "ours_generation": {"greedy_text": "\n"}},
            {**base, "name": "q4_k", "ours_score": {"ppl": 35.0}}]  # scored without --parity: no parity row
    lines = m.vs_table(rows, "llama-imatrix").splitlines()
    assert lines[2] == "| Q2_K | 7 / 7 | 56.490 | 50.500 | 0.9000 [0.8900, 0.9100] | x |"
    assert lines[-2:] == ["| Q2_K | 50.000 | 50.500 | 1.0099 [1.0094, 1.0104] | True | ' P' |",
                          "| Q3_K | 39.500 | 40.000 | 1.0101 [1.0096, 1.0106] | False | '\\n' |"]
    assert len(lines) == 2 + 3 + 1 + 2 + 2  # the k-quant table, a blank line, the parity table
