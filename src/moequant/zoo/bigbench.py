"""BIG-bench multiple-choice tasks from the PyPI sdist ``bigbench==1.0.0``: fetch only the needed
``task.json`` members into the cache (SHA-256 recorded), convert their examples into plain records
``{"idx", "input", "choices", "answer"}`` and write them as JSONL.

Only the examples are used, not BIG-bench's prompt fields (``task_prefix``, ``example_input_prefix``,
...): the prompt format is ours and the same for every task (see ``moequant.eval.tasks_local``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moequant.errors import MoequantError
from moequant.fsutil import atomic_file, atomic_write_json, make_temp_dir
from moequant.zoo.fetch import cache_lock, cache_root, fetch_members, sha256_file

log = logging.getLogger(__name__)

BIGBENCH_DIST = "bigbench"
BIGBENCH_VERSION = "1.0.0"
# sha256 of bigbench-1.0.0.tar.gz as listed by the PyPI simple index (checked on the fallback download)
BIGBENCH_SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
_SIMPLE_INDEX = "https://pypi.org/simple/bigbench/"


@dataclass(frozen=True)
class BigbenchTask:
    """One local task: ``member`` is the ``task.json`` inside the sdist (relative to its top folder)."""

    name: str
    member: str
    description: str
    sha256: str  # of the task.json in bigbench-1.0.0


def _bt(name: str, sub: str, description: str, sha256: str) -> BigbenchTask:
    return BigbenchTask(name, f"bigbench/benchmark_tasks/{sub}/task.json", description, sha256)


BIGBENCH_TASKS: dict[str, BigbenchTask] = {t.name: t for t in (
    _bt("social_iqa", "social_iqa",
        "Social IQa: motivations and reactions in everyday situations (1,954 ex., 3 choices)",
        "edc9f568b70ae6d4af0783764dbe4e4f18aa1242c675a93f534338d73a565348"),
    _bt("logical_deduction", "logical_deduction/three_objects",
        "logical_deduction, three_objects subtask: order of 3 objects (300 ex., 3 choices)",
        "5e3f4a7569cb70bb1469374d3d34fb7883445a9d5743e1a81fd8dcdaf6fcb40f"),
    _bt("logical_deduction_five_objects", "logical_deduction/five_objects", "logical_deduction, 5 objects (500 ex.)",
        "552dec4d5067bdbe033e78e80fdf1f5a8061d17b385379b8ec5104fa17d07918"),
    _bt("logical_deduction_seven_objects", "logical_deduction/seven_objects", "logical_deduction, 7 objects (700 ex.)",
        "5e24146d600b1b2e2d8958e23851e7c958b1a7644a2540fa0de7fa3e51a68cf7"),
    _bt("abstract_narrative_understanding", "abstract_narrative_understanding/4_distractors",
        "abstract_narrative_understanding, 4_distractors subtask: proverb for a narrative (1,000 ex., 5 choices)",
        "66ed0deb50b8d8fafdc54fb90f96dcfdc7d814f281ca4d96347954178e8aa55b"),
    _bt("abstract_narrative_understanding_9_distractors", "abstract_narrative_understanding/9_distractors",
        "abstract_narrative_understanding, 9 distractors (1,000 ex., 10 choices)",
        "f56f4e8d0c2f511c9ff0a41b5eaa01e61b0a1163af4b564d72205a960c5d3d11"),
    _bt("timedial", "timedial", "TimeDial: temporal span that fits a dialog (2,550 ex., 3 choices)",
        "fccc6b6981fcd3bacdf9a3467e6be9ada9efcd75510175d98b1c8e9269bb5cfb"),
)}


# ------------------------------------------------------------------------------- conversion (pure)

def bigbench_to_records(task: dict[str, Any], what: str = "task.json") -> list[dict[str, Any]]:
    """Multiple-choice records from a BIG-bench ``task.json`` dict.

    Every example with ``target_scores`` and exactly one top-scoring choice becomes
    ``{"idx": i (position in "examples"), "input": input.strip(), "choices": [keys stripped, in file
    order], "answer": index of the top-scoring choice}``; the others (generative examples, ties,
    fewer than 2 choices) are skipped and counted in the log. ``what`` names the file in errors."""
    examples = task.get("examples")
    if not isinstance(examples, list):
        raise MoequantError(f"{what}: no 'examples' list (a BIG-bench task with subtasks? use a subtask's task.json)")
    out: list[dict[str, Any]] = []
    skipped = 0
    for i, ex in enumerate(examples):
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not isinstance(scores, dict) or len(scores) < 2 or not isinstance(ex.get("input"), str):
            skipped += 1
            continue
        choices = [str(c).strip() for c in scores]
        values = [float(v) for v in scores.values()]
        best = max(values)
        if values.count(best) != 1 or len(set(choices)) != len(choices):
            skipped += 1
            continue
        out.append({"idx": i, "input": ex["input"].strip(), "choices": choices, "answer": values.index(best)})
    if skipped:
        log.info("%s: skipped %d of %d examples (not single-answer multiple choice)", what, skipped, len(examples))
    if not out:
        raise MoequantError(f"{what}: no multiple-choice examples (target_scores with one best choice)")
    return out


def write_jsonl(records: list[dict[str, Any]], path: Path) -> str:
    """Write records one JSON object per line (temp file, then rename); returns the file's SHA-256."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    return sha256_file(path)


# ------------------------------------------------------------------------------- fetching (glue)

def _sdist_url() -> tuple[str, str]:
    """(URL, sha256) of bigbench-1.0.0.tar.gz from the PyPI simple index (PEP 691 JSON)."""
    req = urllib.request.Request(_SIMPLE_INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    name = f"{BIGBENCH_DIST}-{BIGBENCH_VERSION}.tar.gz"
    for f in files:
        if f["filename"] == name:
            return f["url"], f["hashes"]["sha256"]
    raise MoequantError(f"{_SIMPLE_INDEX} lists no {name}")


def _download_members(members: list[str], targets: list[Path]) -> None:
    """Fallback when ``pip download`` refuses the sdist (pip >= 26 rejects bigbench's direct-URL
    dependency on bleurt): fetch the archive from the index, check its SHA-256, extract ``members``."""
    try:
        url, sha = _sdist_url()
    except OSError as e:
        raise MoequantError(f"could not reach the PyPI index for {BIGBENCH_DIST}=={BIGBENCH_VERSION}: {e}") from None
    if sha != BIGBENCH_SDIST_SHA256:
        raise MoequantError(f"{BIGBENCH_DIST}=={BIGBENCH_VERSION}: index sha256 {sha[:16]}... is not the expected "
                            f"{BIGBENCH_SDIST_SHA256[:16]}...")
    tmp = make_temp_dir(Path(tempfile.gettempdir()))
    try:
        archive = tmp / "bigbench.tar.gz"
        log.info("downloading %s (358 MB, once)", url)
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=120) as r, open(archive, "wb") as f:
                while block := r.read(1 << 22):
                    h.update(block)
                    f.write(block)
        except OSError as e:
            raise MoequantError(f"could not download {url}: {e}") from None
        if h.hexdigest() != BIGBENCH_SDIST_SHA256:
            raise MoequantError(f"{url}: SHA-256 mismatch (got {h.hexdigest()[:16]}...)")
        top = f"{BIGBENCH_DIST}-{BIGBENCH_VERSION}/"
        with tarfile.open(archive) as t:
            for m, out in zip(members, targets):
                src = t.extractfile(top + m)
                if src is None:
                    raise MoequantError(f"{archive.name} has no member {m!r}")
                with src, atomic_file(out) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_task_jsons(names: list[str]) -> dict[str, Path]:
    """Paths of the ``task.json`` of each named task: installed ``bigbench==1.0.0``, the cache, or
    downloaded once (``fetch_members``; if pip refuses the sdist, straight from the index)."""
    unknown = [n for n in names if n not in BIGBENCH_TASKS]
    if unknown:
        raise MoequantError(f"unknown BIG-bench task(s) {', '.join(unknown)} (known: {', '.join(BIGBENCH_TASKS)})")
    members = [BIGBENCH_TASKS[n].member for n in names]
    targets = [cache_root() / "packages" / f"{BIGBENCH_DIST}-{BIGBENCH_VERSION}" / m for m in members]
    if not all(t.is_file() for t in targets):
        try:
            paths = fetch_members(BIGBENCH_DIST, BIGBENCH_VERSION, members)
            for n, t in zip(names, paths):
                check_task_sha256(n, t)
            return dict(zip(names, paths))
        except MoequantError as e:
            log.info("pip could not fetch %s==%s (%s); downloading the sdist from the index",
                     BIGBENCH_DIST, BIGBENCH_VERSION, e)
            # the archive is read once: extract every known task, not only the requested ones
            every = [(t.member, cache_root() / "packages" / f"{BIGBENCH_DIST}-{BIGBENCH_VERSION}" / t.member)
                     for t in BIGBENCH_TASKS.values()]
            with cache_lock(f"download-{BIGBENCH_DIST}-{BIGBENCH_VERSION}"):  # one 358 MB download at a time
                missing = [(m, t) for m, t in every if not t.is_file()]
                if missing:
                    _download_members([m for m, _ in missing], [t for _, t in missing])
    for n, t in zip(names, targets):
        check_task_sha256(n, t)
    return dict(zip(names, targets))


def check_task_sha256(name: str, path: Path) -> None:
    """The file must be bigbench-1.0.0's ``task.json`` of ``name``, byte for byte."""
    got, want = sha256_file(path), BIGBENCH_TASKS[name].sha256
    if got != want:
        raise MoequantError(f"{path}: SHA-256 {got[:16]}... is not that of {BIGBENCH_DIST}=={BIGBENCH_VERSION}'s "
                            f"{BIGBENCH_TASKS[name].member} ({want[:16]}...); delete the file to fetch it again")


def build_task_jsonl(name: str, out_dir: Path, src: Path | None = None) -> dict[str, Any]:
    """Convert task ``name`` (its ``task.json`` at ``src``; fetched and SHA-256-checked when None) into
    ``out_dir/<name>.jsonl`` (reused when its source hash matches); returns provenance: member,
    SHA-256 of task.json and of the JSONL, example count."""
    src = src or fetch_task_jsons([name])[name]
    src_sha = sha256_file(src)
    jsonl = out_dir / f"{name}.jsonl"
    meta_path = out_dir / f"{name}.meta.json"
    if jsonl.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("task_json_sha256") == src_sha and meta.get("jsonl_sha256") == sha256_file(jsonl):
            return meta
    task = json.loads(src.read_text(encoding="utf-8"))
    records = bigbench_to_records(task, what=str(src))
    meta = {"task": name, "source": f"{BIGBENCH_DIST}=={BIGBENCH_VERSION}:{BIGBENCH_TASKS[name].member}",
            "task_json_sha256": src_sha, "jsonl": str(jsonl), "jsonl_sha256": write_jsonl(records, jsonl),
            "n_examples": len(records), "n_examples_in_file": len(task["examples"])}
    atomic_write_json(meta_path, meta)
    return meta
