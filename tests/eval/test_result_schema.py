"""The result JSONs' schemas (``moequant.eval.result_schema``) on JSONs the code writes: a file parsed and
written back is the same bytes, the writers build what they built before the schemas, and a missing or
mistyped key is a ``MoequantError`` naming the file and the key."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from conftest import save_toy_olmoe

from moequant.errors import MoequantError
from moequant.eval.result_schema import ABSENT, CompareJson, PplJson, QuantizeReportJson
from moequant.fsutil import json_text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def written(tmp_path_factory, one_thread) -> dict[str, Path]:
    """A toy OLMoE quantized to int4 (report.json), scored (eval ppl --json, a model with QuantExperts) and
    compared with the unquantized model (which compare scores itself: a dense model's ppl JSON)."""
    from moequant.cli import main

    tmp = tmp_path_factory.mktemp("schema")
    model, text = save_toy_olmoe(tmp, "model", 3000)
    q4, fp, out = tmp / "q4", tmp / "fp", tmp / "cmp"
    assert main(["-q", "quantize", str(model), "--bits", "4", "--group-size", "32", "--solver", "rtn", "--out",
                 str(q4)]) == 0
    assert main(["-q", "eval", "ppl", str(q4), "--data", str(text), "--seqlen", "32", "--max-tokens", "320",
                 "--json", str(q4 / "ppl-text.json")]) == 0
    fp.mkdir()
    (fp / "run.json").write_text(json.dumps({"name": "fp", "model": str(model)}))
    assert main(["-q", "compare", str(fp), str(q4), "--ppl", str(text), "--out", str(out), "--n-boot", "200",
                 "--no-plots"]) == 0
    return {"report": q4 / "report.json", "ppl_quantized": q4 / "ppl-text.json", "ppl_dense": fp / "ppl-text.json",
            "compare": out / "compare.json"}


SCHEMAS = {"report": QuantizeReportJson, "ppl_quantized": PplJson, "ppl_dense": PplJson, "compare": CompareJson}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_round_trip_is_exact(written, name):
    path = written[name]
    text = path.read_text()
    obj = json.loads(text)
    rec = SCHEMAS[name].from_dict(obj, str(path))
    assert rec.extra == {}  # the schema names every key moequant writes
    back = rec.to_dict()
    assert back == obj
    assert json_text(back) == text  # written back: the same bytes
    assert SCHEMAS[name].from_dict(back, str(path)) == rec


def test_optional_keys_stay_absent_or_null(written):
    dense = PplJson.from_dict(json.loads(written["ppl_dense"].read_text()), "dense")
    quantized = PplJson.from_dict(json.loads(written["ppl_quantized"].read_text()), "quantized")
    assert dense.experts_total is ABSENT and "experts_total" not in dense.to_dict()  # no QuantExperts
    assert quantized.experts_total > 0 and quantized.max_tokens == 320
    peer = {"ppl": 3.5, "nll_per_window": [40.0, 41], "tokens_per_window": [32, 32], "max_tokens": None,
            "peer": "hqq", "config": "4bit-g64"}  # a peer's minimal JSON: null and absent keys, its own keys
    rec = PplJson.from_dict(peer, "peer.json")
    assert rec.max_tokens is None and rec.stride is ABSENT and rec.extra == {"peer": "hqq", "config": "4bit-g64"}
    assert rec.to_dict() == peer and rec.get("max_tokens", "gone") is None and rec.get("stride", "gone") == "gone"
    assert rec.get("peer") == "hqq"


def test_writers_build_what_they_built_before(written, tmp_path):
    """The dict each writer returns is the one the code before the schemas assembled by hand."""
    from moequant import api
    from moequant.alloc.recipe import Recipe
    from moequant.codecs.config import UniformConfig
    from moequant.eval.perplexity import PplConfig, evaluate_perplexity
    from moequant.formats.checkpoint import checkpoint_bytes
    from moequant.models.loader import load_model
    from moequant.runinfo import run_info
    from moequant.runs import PplJob, QuantizeJob, model_sizes, quantize_result, run_ppl
    from moequant.zoo.corpora import load_text, tokenize_corpus

    model_dir = written["report"].parent.parent / "model"
    text = str(written["report"].parent.parent / "text.txt")
    model, tok, _ = load_model(str(model_dir))
    job = PplJob(str(model_dir), data=text, seqlen=32, max_tokens=96, progress=False)
    new = run_ppl(job, ["eval"], model=model, tokenizer=tok)
    res = evaluate_perplexity(model, tokenize_corpus(tok, load_text(text, "test")),
                              PplConfig(seqlen=32, max_tokens=96), tok.bos_token_id, progress=False)
    old = {"model": job.model, "data": job.data, "split": job.split, **res.to_dict(), "seconds": new["seconds"],
           **run_info(["eval"])}
    assert list(new) == list(old) and json_text(new) == json_text(old)

    recipe = Recipe.uniform(UniformConfig(bits=4, group_size=32))
    qjob = QuantizeJob(str(model_dir), recipe, tmp_path / "q")
    api.quantize(model, recipe, progress=False)
    api.save(model, qjob.out, tokenizer=tok)
    report = model.moequant_report
    measures = {"peak_rss_bytes": 1, "rss_before_load_bytes": 2, "peak_rss_before_quantize_bytes": 3,
                "rss_start_quantize_bytes": None, "peak_rss_quantize_bytes": None,
                "seconds": {"load": 0.5, "quantize": 1.25}}
    new = quantize_result(qjob, "dir", report, model, measures, ["quantize"])
    old = {"model": qjob.model, "source": "dir", "out": str(qjob.out), "offload": qjob.offload,
           "config": qjob.recipe.to_dict(), "bits_per_weight": report.bits_per_weight(),
           "checkpoint_bytes": checkpoint_bytes(qjob.out), **model_sizes(model),
           **{k: v for k, v in report.to_dict().items() if k not in ("recipe", "bits_per_weight")},
           "table": report.table(), **measures, **run_info(["quantize"])}
    assert list(new) == list(old) and json_text(new) == json_text(old)
    assert not math.isnan(new["bits_per_weight"])


def test_compare_writes_the_result_it_returns(written):
    from moequant.compare_job import CompareJob, run_compare
    from moequant.eval.compare import StatsConfig

    out = written["compare"].parent.parent / "cmp2"
    fp, q4 = written["ppl_dense"].parent, written["report"].parent
    res = run_compare(CompareJob(runs=(str(fp), str(q4)), out=out, ppl=(str(fp.parent / "text.txt"),),
                                 stats=StatsConfig(n_boot=200), plots=False), argv=["compare"])
    saved = (out / "compare.json").read_text()
    assert saved == json_text({k: v for k, v in res.items() if k != "out"})


@pytest.mark.parametrize("name, key", [("report", "bits_per_weight"), ("ppl_dense", "nll_per_window"),
                                       ("ppl_quantized", "ppl"), ("compare", "baseline"), ("compare", "report_md")])
def test_missing_required_key_names_file_and_key(written, name, key):
    path = written[name]
    obj = json.loads(path.read_text())
    del obj[key]
    with pytest.raises(MoequantError, match=rf"{path}: not .*missing key '{key}'"):
        SCHEMAS[name].from_dict(obj, str(path))


def test_nested_and_mistyped_keys(written):
    path = str(written["compare"])
    obj = json.loads(written["compare"].read_text())
    data = re.escape(next(iter(obj["ppl"])))
    row = next(iter(obj["ppl"].values()))["rows"][1]
    del row["verdict"]
    with pytest.raises(MoequantError, match=rf"missing key 'ppl\.{data}\.rows\[1\]\.verdict'"):
        CompareJson.from_dict(obj, path)
    row["verdict"] = 3
    with pytest.raises(MoequantError, match=rf"'ppl\.{data}\.rows\[1\]\.verdict' should be str, got int"):
        CompareJson.from_dict(obj, path)
    ppl = json.loads(written["ppl_quantized"].read_text())
    for key, value, says in [("tokens_per_window", [32, 31.5], r"'tokens_per_window\[1\]' should be int"),
                             ("add_bos", 1, "'add_bos' should be bool, got int"),
                             ("max_tokens", "320", "'max_tokens' should be int or null, got str"),
                             ("nll_per_window", [1.0], "differ in length")]:
        with pytest.raises(MoequantError, match=says):
            PplJson.from_dict({**ppl, key: value}, "p.json")
    with pytest.raises(MoequantError, match="r.json: not a quantization report: expected a JSON object"):
        QuantizeReportJson.from_dict([], "r.json")


def test_readers_parse_through_the_schemas(written, tmp_path):
    from moequant.eval.runs_io import find_ppl, load_run

    run = tmp_path / "run"
    run.mkdir()
    report = json.loads(written["report"].read_text())
    (run / "report.json").write_text(json.dumps({**report, "bits_per_weight": "4.25"}))
    with pytest.raises(MoequantError, match=r"report.json: not a quantization report: 'bits_per_weight' should be"):
        load_run(run)
    (run / "report.json").write_text(json.dumps(report))
    ppl = json.loads(written["ppl_quantized"].read_text())
    (run / "ppl-text.json").write_text(json.dumps({k: v for k, v in ppl.items() if k != "tokens_per_window"}))
    r = load_run(run)
    assert r.report == QuantizeReportJson.from_dict(report, "x") and r.bits_per_weight == report["bits_per_weight"]
    with pytest.raises(MoequantError, match=r"ppl-text.json: not a perplexity JSON \(missing key 'tokens_per_window'"):
        find_ppl(r, ppl["data"])
