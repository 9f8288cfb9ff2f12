"""BIG-bench task.json -> records -> JSONL + lm-eval YAML, on a synthetic task in BIG-bench's format."""

from __future__ import annotations

import json

import pytest

from moequant.errors import MoequantError
from moequant.eval.tasks_local import PROMPT, read_records, task_yaml, write_task_yaml
from moequant.zoo.bigbench import BIGBENCH_TASKS, bigbench_to_records, build_task_jsonl, write_jsonl

SYNTHETIC = {
    "name": "toy", "description": "d", "keywords": ["multiple choice"], "metrics": ["multiple_choice_grade"],
    "append_choices_to_input": True, "example_input_prefix": "\nQuestion: ",
    "examples": [
        {"input": "Tracy went home. Why? ", "target_scores": {"To rest": 0, "To eat ": 1, " To sleep": 0}},
        {"input": "generative only", "target": "an answer"},                      # skipped: no target_scores
        {"input": "A tie", "target_scores": {"x": 1, "y": 1, "z": 0}},           # skipped: two best choices
        {"input": "  Two choices\n", "target_scores": {"yes": 0.0, "no": 1.0}},
        {"input": "one choice", "target_scores": {"only": 1}},                    # skipped: < 2 choices
        {"input": "Graded", "target_scores": {"a": 0.25, "b": 0.5, "c": 0.75, "d": 0}},
    ],
}

EXPECTED = [
    {"idx": 0, "input": "Tracy went home. Why?", "choices": ["To rest", "To eat", "To sleep"], "answer": 1},
    {"idx": 3, "input": "Two choices", "choices": ["yes", "no"], "answer": 1},
    {"idx": 5, "input": "Graded", "choices": ["a", "b", "c", "d"], "answer": 2},
]


def test_converter_exact_records():
    assert bigbench_to_records(SYNTHETIC) == EXPECTED


def test_converter_rejects_tasks_without_mc_examples():
    with pytest.raises(MoequantError, match="no 'examples'"):
        bigbench_to_records({"name": "parent", "subtasks": ["a"]}, what="parent/task.json")
    with pytest.raises(MoequantError, match="no multiple-choice examples"):
        bigbench_to_records({"examples": [{"input": "q", "target": "a"}]})


def test_jsonl_roundtrip_and_cache(tmp_path):
    sha = write_jsonl(EXPECTED, tmp_path / "toy.jsonl")
    assert read_records(tmp_path / "toy.jsonl") == EXPECTED
    assert len(sha) == 64 and not list(tmp_path.glob("*.partial"))
    src = tmp_path / "task.json"
    src.write_text(json.dumps(SYNTHETIC))
    name = next(iter(BIGBENCH_TASKS))
    meta = build_task_jsonl(name, tmp_path / "out", src)
    assert meta["n_examples"] == 3 and meta["n_examples_in_file"] == 6
    assert read_records(tmp_path / "out" / f"{name}.jsonl") == EXPECTED
    assert build_task_jsonl(name, tmp_path / "out", src) == meta  # cached: same provenance


def test_yaml_is_a_local_multiple_choice_task(tmp_path):
    import yaml

    jsonl = tmp_path / "toy.jsonl"
    cfg = yaml.safe_load(task_yaml("toy", jsonl))
    assert cfg["task"] == "moequant_bb_toy" and cfg["dataset_path"] == "json"
    assert cfg["dataset_kwargs"] == {"data_files": {"test": str(jsonl.resolve())}}
    assert cfg["output_type"] == "multiple_choice" and cfg["test_split"] == "test"
    assert cfg["doc_to_text"] == "Q: {{input}}\nA:" and PROMPT == "Q: {input}\nA:"
    assert cfg["doc_to_choice"] == "{{choices}}" and cfg["doc_to_target"] == "answer"
    assert [m["metric"] for m in cfg["metric_list"]] == ["acc", "acc_norm"]
    p = write_task_yaml("toy", jsonl, tmp_path)
    assert yaml.safe_load(p.read_text()) == cfg


@pytest.mark.parametrize("line, what", [
    ('{"input": "q", "choices": ["a"], "answer": 0}', "record 0"),
    ('{"input": "q", "choices": ["a", "b"], "answer": 2}', "record 0"),
    ('{"input": "q", "choices": ["a", "a"], "answer": 0}', "record 0"),
    ("not json", "not JSON"),
])
def test_bad_records_name_the_file(tmp_path, line, what):
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(MoequantError, match=what) as e:
        read_records(p)
    assert "bad.jsonl" in str(e.value)


def test_cached_task_json_with_wrong_bytes_is_refused(tmp_path, monkeypatch):
    from moequant.zoo.bigbench import fetch_task_jsons

    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path))
    t = BIGBENCH_TASKS["social_iqa"]
    p = tmp_path / "packages" / "bigbench-1.0.0" / t.member
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps(SYNTHETIC))  # in the cache, but not bigbench's file: no download, an error
    with pytest.raises(MoequantError, match="SHA-256 .*social_iqa/task.json"):
        fetch_task_jsons(["social_iqa"])
