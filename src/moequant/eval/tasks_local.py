"""Local lm-eval tasks: BIG-bench multiple-choice JSONL files (``moequant.zoo.bigbench``) plus a
generated lm-eval task YAML each, in one include directory for ``TaskManager(include_path=...)``.

Prompt format (the same for every task, zero-shot, choices not listed in the prompt)::

    context      = "Q: {input}\\nA:"
    continuation = " {choice}"          (lm-eval's target_delimiter " " + the choice)

``acc`` picks the choice with the highest summed log-likelihood of its continuation tokens;
``acc_norm`` divides each by the choice's length in characters (lm-eval's definition).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moequant.errors import MoequantError
from moequant.fsutil import atomic_write_text
from moequant.zoo.bigbench import BIGBENCH_TASKS, BIGBENCH_VERSION, build_task_jsonl, fetch_task_jsons
from moequant.zoo.fetch import cache_root, sha256_file

PROMPT = "Q: {input}\nA:"  # + " {choice}" per choice
LM_EVAL_PREFIX = "moequant_bb_"  # lm-eval task names, kept apart from lm-eval's own (it has a hub social_iqa)


def lm_eval_task_name(name: str) -> str:
    return LM_EVAL_PREFIX + name


def task_yaml(name: str, jsonl: Path) -> str:
    """The lm-eval task config for one local JSONL file (records with input / choices / answer).

    Written as JSON, which is valid YAML, so every string is quoted exactly."""
    cfg = {
        "task": lm_eval_task_name(name),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(jsonl).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Q: {{input}}\nA:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return json.dumps(cfg, indent=1) + "\n"


def write_task_yaml(name: str, jsonl: Path, out_dir: Path) -> Path:
    path = out_dir / f"{name}.yaml"
    text = task_yaml(name, jsonl)
    if not (path.is_file() and path.read_text() == text):
        atomic_write_text(path, text)
    return path


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a local multiple-choice JSONL file, checked: ``input`` (str), ``choices`` (>= 2
    distinct str), ``answer`` (index into choices); ``idx`` defaults to the line number (0-based)."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise MoequantError(f"task file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise MoequantError(f"task file {path}: not UTF-8 (byte offset {e.start}: {e.reason})") from None
    for i, line in enumerate(ln for ln in lines if ln.strip()):
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise MoequantError(f"task file {path}: record {i} is not JSON ({e.msg})") from None
        ch = r.get("choices") if isinstance(r, dict) else None
        ok = (isinstance(r, dict) and isinstance(r.get("input"), str) and isinstance(ch, list) and len(ch) >= 2
              and all(isinstance(c, str) for c in ch) and len(set(ch)) == len(ch)
              and isinstance(r.get("answer"), int) and 0 <= r["answer"] < len(ch))
        if not ok:
            raise MoequantError(f"task file {path}: record {i} needs input (str), choices (>= 2 distinct str) "
                                "and answer (index into choices)")
        out.append({"idx": r.get("idx", i), "input": r["input"], "choices": ch, "answer": r["answer"]})
    if not out:
        raise MoequantError(f"task file {path}: no records")
    return out


@dataclass(frozen=True)
class LocalTasks:
    """Per requested local task: its lm-eval name, its YAML (in ``include_dir``) and provenance."""

    include_dir: Path
    lm_eval_names: dict[str, str]
    provenance: dict[str, dict[str, Any]]


def local_task_dir() -> Path:
    return cache_root() / "tasks" / f"bigbench-{BIGBENCH_VERSION}"


def is_jsonl_task(name: str) -> bool:
    return name.endswith(".jsonl")


def is_local_task(name: str) -> bool:
    """A BIG-bench task we convert, or a path to a JSONL file of multiple-choice records."""
    return name in BIGBENCH_TASKS or is_jsonl_task(name)


def task_label(name: str) -> str:
    """The name a task has in results: a JSONL task is named by its file stem."""
    return Path(name).stem if is_jsonl_task(name) else name


def prepare_local_tasks(names: list[str], yaml_dir: Path) -> LocalTasks:
    """JSONL (BIG-bench tasks: fetched and converted once into the cache) and a task YAML in
    ``yaml_dir`` for every local task in ``names``."""
    yaml_dir.mkdir(parents=True, exist_ok=True)
    prov: dict[str, dict[str, Any]] = {}
    lm_names: dict[str, str] = {}
    sources = fetch_task_jsons([n for n in names if n in BIGBENCH_TASKS])  # one download at most
    for n in names:
        label = task_label(n)
        if label in prov:
            raise MoequantError(f"--tasks: {label!r} given twice")
        if is_jsonl_task(n):
            path = Path(n).resolve()
            n_records = len(read_records(path))
            meta = {"task": label, "source": str(path), "jsonl": str(path), "jsonl_sha256": sha256_file(path),
                    "n_examples": n_records}
        else:
            meta = build_task_jsonl(n, local_task_dir(), sources[n])
        write_task_yaml(label, Path(meta["jsonl"]), yaml_dir)  # the YAML is temporary: not in the provenance
        prov[label] = meta
        lm_names[label] = lm_eval_task_name(label)
    return LocalTasks(yaml_dir, lm_names, prov)
