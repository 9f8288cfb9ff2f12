"""Where a run's evaluation JSONs live, and reading them back for ``moequant compare``.

A *run* is one of:

- a **run directory**: a packed checkpoint written by ``moequant quantize`` / ``moequant demo``
  (``config.json`` + safetensors + ``report.json``), or any directory holding evaluation JSONs (a
  peer tool's result, the unquantized baseline);
- a **bare JSON file**: a ``ppl.json`` (``result_schema.PplJson``) or a tasks JSON.

Layout of a run directory (the sweep's ``RUN/report.json`` + ``RUN/ppl.json``, extended by corpus):

- ``report.json`` (``moequant quantize``, sweeps; ``result_schema.QuantizeReportJson``): ``bits_per_weight``,
  per-tensor records (proxy losses);
- ``ppl-<data>.json`` (``moequant eval ppl RUN --data <data> --json RUN/ppl-<data>.json``, or
  ``moequant compare`` itself): perplexity on ``<data>``;
- ``ppl.json`` (sweeps such as ``moequant demo``, peer scripts): perplexity, used for ``<data>`` when
  its ``data`` field says so (or it has none);
- ``tasks.json``, ``tasks-*.json`` (``moequant eval tasks RUN --json RUN/tasks.json``):
  ``{"results": {NAME: {"acc", "acc_norm", "examples": [{"idx", "answer", "acc", "acc_norm"}, ...]}}}``
  (``{"tasks": {NAME: {..., "per_example": [{"correct", "correct_norm"}]}}}`` is read too);
- ``run.json`` (you, optional): ``{"name", "method", "bits_per_weight", "checkpoint_bytes", "model"}``.

``run.json``'s ``"model"`` (a zoo alias, HF directory, .gguf or hub id) lets ``moequant compare`` score a
run that is not a checkpoint directory (e.g. the unquantized baseline) on a corpus it has no JSON for.

Run metadata (name, method, bits/weight, checkpoint bytes) is taken, first found wins, from
``run.json``, then ``report.json``, then the fields of the evaluation JSON itself (peer ``ppl.json``
files carry ``bits_per_weight``, ``checkpoint_bytes``, ``peer`` and ``config``). For a bare file the
``run.json`` next to it counts, and the ``report.json`` of the checkpoint its ``"model"`` field names
(``moequant eval ppl/tasks runs/x --json elsewhere.json`` records ``"model": "runs/x"``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moequant.errors import MoequantError
from moequant.eval.result_schema import PplJson, QuantizeReportJson, TasksJson
from moequant.fsutil import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

REPORT = "report.json"
RUN_META = "run.json"
LEGACY_PPL = "ppl.json"
TASKS = "tasks.json"
EVAL_JSON_PREFIXES = ("ppl", "tasks", "compare")  # eval outputs, never counted as checkpoint bytes


def file_slug(name: str) -> str:
    """``name`` safe as one file name: runs of other characters than ``A-Za-z0-9_.-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip(".") or "_"


def data_slug(data: str) -> str:
    """A corpus alias as is (``ptb``); a text file by its stem (``/x/my text.txt`` -> ``my_text``)."""
    return file_slug(Path(data).stem if ("/" in data or Path(data).suffix) else data)


def ppl_filename(data: str) -> str:
    """``ppl-<data>.json``: the perplexity JSON of a run directory for corpus ``data`` (``data_slug``)."""
    return f"ppl-{data_slug(data)}.json"


def read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MoequantError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoequantError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise MoequantError(f"{path}: expected a JSON object at the top level")
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as JSON (sorted keys) through the package's one atomic writer (``moequant.fsutil``)."""
    atomic_write_json(path, obj)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)


@dataclass
class Run:
    """One run to compare: where it is, what it is, and what it cost in bits and bytes."""

    name: str
    path: Path
    is_dir: bool
    method: str
    bits_per_weight: float | None = None  # quantized tensors only (report.json's ``bits_per_weight``)
    bits_per_weight_model: float | None = None  # whole model, when recorded
    checkpoint_bytes: int | None = None
    is_checkpoint: bool = False  # a directory ``moequant.api.load`` / the loader can evaluate
    model_spec: str | None = None  # what to load to score this run: the checkpoint dir, or run.json's "model"
    report: QuantizeReportJson | None = None
    file_json: dict[str, Any] | None = None  # the bare file's content when the run is a file
    sources: dict[str, str] = field(default_factory=dict)  # field -> file it came from

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "method": self.method,
                "bits_per_weight": self.bits_per_weight, "bits_per_weight_model": self.bits_per_weight_model,
                "checkpoint_bytes": self.checkpoint_bytes, "is_checkpoint": self.is_checkpoint,
                "model_spec": self.model_spec,
                "sources": dict(self.sources)}


def read_report(path: Path) -> QuantizeReportJson:
    """A run's ``report.json``, checked against its schema."""
    return QuantizeReportJson.from_dict(read_json(path), str(path))


def report_naming_model(run: Path) -> QuantizeReportJson | None:
    """``run/report.json`` (schema-checked: a mistyped key is one error naming it) when it names the model the run
    was quantized from (a non-empty ``model``), else ``None``: the callers say what they needed it for."""
    path = Path(run) / "report.json"
    rep = read_report(path) if path.is_file() else None
    return rep if rep is not None and isinstance(rep.model, str) and rep.model else None


def _method_from_report(report: QuantizeReportJson) -> str | None:
    """'int4-g64-clip rtn' from the per-tensor records (every distinct method, then the solver)."""
    tensors = report.get("quantized_tensors") or []
    methods = sorted({t["method"] for t in tensors if t.get("method")})
    solvers = sorted({t["solver"] for t in tensors if t.get("solver")})
    if not methods:
        return None
    return " + ".join(methods) + (f" {'/'.join(solvers)}" if solvers else "")


def _checkpoint_bytes_on_disk(path: Path) -> int:
    """Bytes of the checkpoint's files: every file but the reports and evaluation JSONs next to them."""
    total = 0
    for p in path.iterdir():
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix == ".json" and (p.name in (REPORT, RUN_META) or p.name.startswith(EVAL_JSON_PREFIXES)):
            continue
        total += p.stat().st_size
    return total


def _first(*pairs: tuple[Any, str]) -> tuple[Any, str | None]:
    for value, source in pairs:
        if value is not None:
            return value, source
    return None, None


def load_run(spec: str | Path) -> Run:
    """Read a run directory or a bare eval JSON (see the module docstring for the layout)."""
    path = Path(spec)
    if not path.exists():
        raise MoequantError(f"run {spec}: no such file or directory")
    is_dir = path.is_dir()
    folder = path if is_dir else path.parent
    meta = read_json(folder / RUN_META) if (folder / RUN_META).is_file() else {}
    report = read_report(folder / REPORT) if is_dir and (folder / REPORT).is_file() else None
    file_json = None if is_dir else read_json(path)
    if file_json is not None:
        evals = [file_json]
    else:
        evals = [read_json(p) for p in [*sorted(folder.glob("ppl*.json")), *sorted(folder.glob("tasks*.json"))]]
    evals = [e for e in evals if e]

    def from_evals(key: str) -> tuple[Any, str]:
        for e in evals:
            if e.get(key) is not None:
                return e[key], "eval json"
        return None, "eval json"

    report_src = REPORT
    if report is None:  # eval JSONs written elsewhere: their "model" is the checkpoint directory
        model = from_evals("model")[0]
        if isinstance(model, str) and (Path(model) / REPORT).is_file():
            report, report_src = read_report(Path(model) / REPORT), str(Path(model) / REPORT)
    rep = report or QuantizeReportJson(bits_per_weight=None)
    bpw, bpw_src = _first((meta.get("bits_per_weight"), RUN_META), (rep.bits_per_weight, report_src),
                          from_evals("bits_per_weight"))
    bpw_model, _ = _first((meta.get("bits_per_weight_model"), RUN_META), (rep.get("bits_per_weight_model"), REPORT),
                          from_evals("bits_per_weight_model"))
    is_checkpoint = is_dir and (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    ck, ck_src = _first((meta.get("checkpoint_bytes"), RUN_META), (rep.get("checkpoint_bytes"), report_src),
                        from_evals("checkpoint_bytes"))
    if ck is None and is_checkpoint:
        ck, ck_src = _checkpoint_bytes_on_disk(path), "files on disk"
    peer = from_evals("peer")[0]
    peer_cfg = from_evals("config")[0]
    peer_label = None
    if peer not in (None, "none", ""):  # peer scripts write peer "none" for their own unquantized check
        peer_label = f"{peer} {peer_cfg}" if isinstance(peer_cfg, str) else str(peer)
    elif isinstance(peer_cfg, str):
        peer_label = peer_cfg
    method, _ = _first((meta.get("method"), RUN_META), (_method_from_report(rep), REPORT), (peer_label, "eval json"))
    if method is None:
        model = from_evals("model")[0]
        method = f"unquantized ({model})" if model and not is_checkpoint else "-"
    if is_dir:
        default_name = path.name
    else:
        default_name = path.resolve().parent.name or path.stem  # runs/peers/hqq-int4/ppl.json -> hqq-int4
    name = str(meta.get("name") or default_name)
    sources = {k: v for k, v in (("bits_per_weight", bpw_src), ("checkpoint_bytes", ck_src)) if v}
    model_spec = str(path) if is_checkpoint else (str(meta["model"]) if meta.get("model") else None)
    return Run(name=name, path=path, is_dir=is_dir, method=str(method),
               bits_per_weight=None if bpw is None else float(bpw),
               bits_per_weight_model=None if bpw_model is None else float(bpw_model),
               checkpoint_bytes=None if ck is None else int(ck), is_checkpoint=is_checkpoint, report=report,
               file_json=file_json, sources=sources, model_spec=model_spec)


def check_unique_names(runs: list[Run]) -> None:
    """Bare-file runs named after the same folder become ``folder/stem``; any other clash is an error."""
    names = [r.name for r in runs]
    for r in runs:
        if not r.is_dir and names.count(r.name) > 1 and r.name == r.path.resolve().parent.name:
            r.name = f"{r.name}/{r.path.stem}"
    seen: dict[str, Path] = {}
    for r in runs:
        if r.name in seen:
            raise MoequantError(f"runs {seen[r.name]} and {r.path} are both named {r.name!r}; give one a "
                                f"{RUN_META} with a distinct \"name\"")
        seen[r.name] = r.path


# ---------------------------------------------------------------- perplexity JSONs


def _data_matches(obj: dict[str, Any], data: str, split: str) -> bool:
    return obj.get("data", data) == data and obj.get("split", split) == split


def check_ppl_json(obj: dict[str, Any], where: str) -> PplJson:
    """``obj`` read from ``where`` as a perplexity JSON (``PplJson``): ``MoequantError`` names a missing or
    bad key."""
    return PplJson.from_dict(obj, where)


def find_ppl(run: Run, data: str, split: str = "test") -> tuple[Path, dict[str, Any]] | None:
    """The perplexity JSON of ``run`` on ``data``/``split``: ``RUN/ppl-<data>.json``, else ``RUN/ppl.json``
    when its ``data`` field is ``data`` (or absent); for a bare file, the file itself likewise.
    ``None`` when the run has none."""
    if run.is_dir:
        candidates = [run.path / ppl_filename(data), run.path / LEGACY_PPL]
    else:
        candidates = [run.path]
    for p in candidates:
        if not p.is_file():
            continue
        obj = run.file_json if (not run.is_dir and run.file_json is not None) else read_json(p)
        if "nll_per_window" not in obj:
            continue
        if not _data_matches(obj, data, split):
            if p.name == ppl_filename(data):
                raise MoequantError(f"{p}: holds {obj.get('data')}/{obj.get('split')}, not {data}/{split}")
            continue
        check_ppl_json(obj, str(p))
        if "data" not in obj:
            log.warning("%s has no 'data' field: taken as %s/%s (the windows are still checked)", p, data, split)
        return p, obj
    return None


# ---------------------------------------------------------------- zero-shot task JSONs


def task_results(obj: Any, where: str) -> dict[str, Any]:
    """Task name -> result (a dict) from an ``eval tasks`` JSON read from ``where``, through
    ``result_schema.TasksJson``: ``{"results": {NAME: ...}}`` (what ``moequant eval tasks --json`` writes) or a
    peer's ``{"tasks": {NAME: ...}}``; a malformed file is a ``MoequantError`` naming the file and the key."""
    return {name: res.to_dict() for name, res in TasksJson.from_dict(obj, where).task_results().items()}


def find_tasks(run: Run) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every task result of a run: name -> (file, ``{"acc", "acc_norm", "examples" | "per_example", ...}``),
    read from ``RUN/tasks.json`` and ``RUN/tasks-*.json`` (or the bare file, when it holds task results: a bare
    perplexity JSON has none, and is skipped). A task in two files is an error; so is a run directory's tasks file
    without results."""
    if run.is_dir:
        files = [p for p in [run.path / TASKS, *sorted(run.path.glob("tasks-*.json"))] if p.is_file()]
    else:
        files = [run.path]
    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    for p in files:
        obj = run.file_json if not run.is_dir and run.file_json is not None else read_json(p)
        if not run.is_dir and not TasksJson.holds_results(obj):
            continue
        for name, res in task_results(obj, str(p)).items():
            if name in out:
                raise MoequantError(f"task {name!r} appears in both {out[name][0]} and {p}")
            out[name] = (p, res)
    return out


ID_KEYS = ("idx", "doc_id", "id")


@dataclass(frozen=True)
class TaskScores:
    """0/1 scores of one metric per example, with example ids and gold answers when recorded."""

    scores: list[float]
    ids: list[Any] | None
    answers: list[Any] | None


def per_example_scores(res: dict[str, Any], metric: str, where: str) -> TaskScores:
    """Scores for ``metric`` ('acc' or 'acc_norm') from ``res["examples"]`` (``eval tasks``) or
    ``res["per_example"]``: each example holds ``acc`` / ``acc_norm`` or ``correct`` / ``correct_norm``;
    ids from ``idx``, ``doc_id`` or ``id``, gold answers from ``answer``, when every example has them."""
    examples = res.get("examples", res.get("per_example"))
    if not isinstance(examples, list) or not examples:
        raise MoequantError(f"{where}: no per-example list ('examples'): a paired comparison needs per-example "
                            "correctness")
    keys = ("acc", "correct") if metric == "acc" else ("acc_norm", "correct_norm")
    scores, ids, answers = [], [], []
    for i, ex in enumerate(examples):
        value = next((ex[k] for k in keys if isinstance(ex, dict) and k in ex), None)
        if value is None:
            raise MoequantError(f"{where}: example {i} has no {' or '.join(keys)}")
        scores.append(float(value))
        ids.append(next((ex[k] for k in ID_KEYS if k in ex), None))
        answers.append(ex.get("answer"))
    return TaskScores(scores, ids if all(x is not None for x in ids) else None,
                      answers if all(x is not None for x in answers) else None)
