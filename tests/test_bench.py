"""``moequant bench``: the JSON holds every field, tokens are counted exactly (each sequence gets exactly
``--tokens`` new tokens, batch B decodes B sequences, the same tokens ``generate`` gives), ``--base`` benches
a run's unquantized model in the same process, bad input is one line and exit 2. No timing assertions."""

import argparse
import json

import pytest
import torch

from conftest import save_toy_olmoe, toy_lines, toy_tok_model, toy_words

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--tokens", "3", "--prompt", "5", "--prefill", "16", "--repeats", "1"]


@pytest.fixture()
def cli(monkeypatch):
    """``moequant.cli.main`` with the bench command (added here until cli.py registers it itself)."""
    from moequant import cli
    from moequant.bench import add_bench_parser

    build = cli.build_parser

    def with_bench():
        p = build()
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        if "bench" not in sub.choices:
            add_bench_parser(sub)
        return p

    monkeypatch.setattr(cli, "build_parser", with_bench)
    return cli.main


def _run(cli, capsys, *argv):
    rc = cli(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench") / "llama"
    tok, model = toy_tok_model("llama", toy_lines(toy_words(2000)))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_json_fields_and_exact_token_counts(cli, capsys, tmp_path, llama_dir):
    out = tmp_path / "b.json"
    rc, stdout, err = _run(cli, capsys, "-q", "bench", str(llama_dir), *TINY, "--batch", "1", "8", "--threads", "1",
                           "--json", str(out))
    assert rc == 0, err
    r = json.loads(out.read_text())
    assert {"model", "settings", "threads", "runs", "ratio_vs_base", "peak_rss_bytes", "command", "versions",
            "machine"} <= r.keys()
    assert r["settings"] == {"tokens": 3, "prompt": 5, "prefill": 16, "batches": [1, 8], "repeats": 1,
                             "kernels": "auto"}
    assert r["threads"] == 1 and r["ratio_vs_base"] is None and r["command"].startswith("moequant ")
    (run,) = r["runs"]
    assert run["source"] == "dir" and run["packed_tensors"] == 0 and run["kernels"] == "auto"
    assert [d["batch"] for d in run["decode"]] == [1, 8]
    for d in run["decode"]:
        assert d["sequences"] == d["batch"] and d["new_tokens_per_sequence"] == 3 and len(d["generated_ids"]) == 3
        assert d["prompt_tokens"] == 5 and len(d["seconds_all"]) == 1 and d["tokens_per_s"] > 0
        assert d["tokens_per_s"] == pytest.approx(d["batch"] * 3 / d["seconds"])
    # sequence 0 has the same prompt at every batch size, so the same greedy tokens
    assert run["decode"][0]["generated_ids"] == run["decode"][1]["generated_ids"]
    assert len(run["prompt_ids"]) == 5 and run["prompt_ids"][0] == 0  # BOS first
    assert run["prompt_source"].startswith("BOS + tokenizer")
    assert run["prefill"]["tokens"] == 16 and run["prefill"]["logits"] == "last position"
    mem = run["memory"]
    assert mem["resident_total_bytes"] == mem["resident_bytes"] + mem["attached_tensor_bytes"] > 0
    assert mem["packed_bytes"] == 0 and mem["resident_mib"] == pytest.approx(mem["resident_total_bytes"] / 2**20)
    assert run["peak_rss_bytes"] > 0 and run["peak_rss_sampled_bytes"] > 0  # two counters (ru_maxrss, statm)
    assert "decode b1 tok/s" in stdout and "decode b8 tok/s" in stdout


def test_decode_equals_generate(llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moequant.bench import decode_run, prompt_batch

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(llama_dir)
    prompt, _ = prompt_batch(tok, model.config.vocab_size, 3, 6)
    assert prompt.shape == (3, 6) and not torch.equal(prompt[0], prompt[1])  # distinct windows of the text
    new, seconds = decode_run(model, prompt, 5)
    assert new.shape == (3, 5) and seconds > 0
    ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=5,
                         min_new_tokens=5)
    assert torch.equal(ref[:, 6:], new)
    one, _ = decode_run(model, prompt[:1, :1], 2)  # a one-token prompt: no prefill forward
    assert one.shape == (1, 2)


def test_packed_run_and_its_base(cli, capsys, tmp_path):
    d, _ = save_toy_olmoe(tmp_path, "moe", 2000)
    q = tmp_path / "q"
    rc, _, err = _run(cli, capsys, "-q", "quantize", str(d), "--bits", "4", "--group-size", "32", "--solver", "rtn",
                      "--out", str(q))
    assert rc == 0, err
    out = tmp_path / "b.json"
    rc, stdout, err = _run(cli, capsys, "-q", "bench", str(q), *TINY, "--batch", "2", "--base", "--kernels",
                           "reference", "--json", str(out))
    assert rc == 0, err
    r = json.loads(out.read_text())
    assert r["base_model"] == str(d)
    base, run = r["runs"]
    assert (base["label"], base["source"], base["packed_tensors"]) == ("base", "dir", 0)
    assert (run["label"], run["source"], run["kernels"]) == ("model", "moequant", "reference")
    assert run["packed_tensors"] > 0 and run["formats"] == ["uniform-asym-packed"]
    assert run["memory"]["packed_bytes"] > 0 and run["memory"]["resident_total_bytes"] < base["memory"]["resident_total_bytes"]
    assert base["prompt_ids"] == run["prompt_ids"]  # the same tokenizer, the same prompt
    for x in (base, run):
        (dec,) = x["decode"]
        assert (dec["sequences"], dec["new_tokens_per_sequence"]) == (2, 3)
    rv = r["ratio_vs_base"]
    assert set(rv) == {"decode", "prefill", "resident"} and set(rv["decode"]) == {"2"}
    assert "model vs base" in stdout


@pytest.mark.parametrize("flags, msg", [
    (["--tokens", "0"], "--tokens must be >= 1"),
    (["--batch", "1", "0"], "--batch sizes must be >= 1"),
    (["--prompt", "0"], "--prompt must be >= 1"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--prefill", "100000"], "max_position_embeddings"),
    (["--base"], "--base:"),
])
def test_bad_options_are_one_line(cli, capsys, llama_dir, flags, msg):
    rc, _, err = _run(cli, capsys, "-q", "bench", str(llama_dir), *TINY, *flags)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("moequant: error:") and msg in lines[0], err


def test_missing_path_and_foreign_json(cli, capsys, tmp_path, llama_dir):
    rc, _, err = _run(cli, capsys, "-q", "bench", str(tmp_path / "nope"), *TINY)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "no such directory" in err
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    rc, _, err = _run(cli, capsys, "-q", "bench", str(llama_dir), *TINY, "--json", str(foreign))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "not a moequant result" in err
    assert json.loads(foreign.read_text()) == {"mine": 1}
