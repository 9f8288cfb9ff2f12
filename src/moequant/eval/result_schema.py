"""Typed schemas of the result JSONs moequant writes and reads back: one frozen dataclass per JSON.

- ``PplJson``: ``moequant eval ppl --json`` (also the ``ppl-<data>.json`` that ``moequant compare`` saves and
  the sweep's ``ppl.json``; the peer scripts write the same shape with their own extra keys);
- ``QuantizeReportJson``: a run directory's ``report.json`` (``moequant quantize``, the sweep; the
  fine-tuned run's ``report.json`` reads through it too);
- ``CompareJson``: ``moequant compare``'s ``compare.json``, with its rows (``PplRow``, ``AccRow``);
- ``TasksJson``: ``moequant eval tasks --json`` (and a peer's minimal ``{"tasks": {NAME: ...}}``), with one
  ``TaskResult`` per task.

A field is a key, in the order the writer writes it. A field without a default is *required*: every
producer of that JSON writes it and readers rely on it. A field defaulting to ``ABSENT`` may be missing
(a peer's or an older file, a dense model's expert counts) and ``to_dict`` leaves it out, so absent and
``null`` stay apart. Keys a schema does not name are kept in ``extra``. ``from_dict(obj, where)`` checks
that every required key is there and every named key holds its type, and raises ``MoequantError`` naming
``where`` (the file) and the key (``ppl.ptb.rows[1].verdict``); values are kept as read (an int stays an
int where a float is allowed), so ``from_dict(d).to_dict() == d`` and the JSON written back is the same.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar, Union

from moequant.errors import MoequantError


class Absent:
    """The type of ``ABSENT``, the value of an optional field whose key the JSON does not hold (``None`` is a
    JSON value: ``null``). Use the one ``ABSENT``; copies and pickles of it are ``ABSENT`` again."""

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "ABSENT"  # pickled and copied as the one instance


ABSENT: Any = Absent()

R = TypeVar("R", bound="JsonRecord")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp) if t is not Absent)
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, JsonRecord):
        return "an object"
    origin = typing.get_origin(tp)
    return {list: "a list", dict: "an object"}.get(origin, getattr(tp, "__name__", str(tp)))


_SCALARS = {bool: (bool,), int: (int,), float: (int, float), str: (str,), type(None): (type(None),)}


def _is_scalar(value: Any, tp: Any) -> bool:
    """``value`` is a JSON scalar of type ``tp`` (an int is a float, a bool is neither)."""
    return isinstance(value, _SCALARS.get(tp, ())) and (tp is bool or not isinstance(value, bool))


def _is_kind(value: Any, tp: Any) -> bool:
    """``value`` is a JSON value of ``tp``'s kind (its items not looked at)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is list:
        return isinstance(value, list)
    if origin is dict or (isinstance(tp, type) and issubclass(tp, JsonRecord)):
        return isinstance(value, dict)
    return _is_scalar(value, tp)


def _parse(value: Any, tp: Any, where: str, key: str, what: str) -> Any:
    """``value`` checked against the annotation ``tp``: objects of a ``JsonRecord`` type become that record,
    lists and objects are copied, everything else is returned as is."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        kind = next((t for t in typing.get_args(tp) if t is not Absent and _is_kind(value, t)), None)
        if kind is not None:
            return _parse(value, kind, where, key, what)
    elif _is_kind(value, tp):
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if isinstance(tp, type) and issubclass(tp, JsonRecord):
            return tp._from_dict(value, where, key + ".", what)
        if origin is list:
            return [_parse(v, args[0], where, f"{key}[{i}]", what) for i, v in enumerate(value)]
        if origin is dict:
            return {k: _parse(v, args[1], where, f"{key}.{k}", what) for k, v in value.items()}
        return value
    raise MoequantError(f"{where}: not {what}: {key!r} should be {_type_name(tp)}, got {type(value).__name__} "
                        f"{value!r:.60}")


def _dump(value: Any) -> Any:
    if isinstance(value, JsonRecord):
        return value.to_dict()
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, kw_only=True)
class JsonRecord:
    """Base of the schemas: fields are keys (``ABSENT`` = not in the JSON), ``extra`` the keys not named."""

    WHAT: ClassVar[str] = "a result JSON"  # for messages: "<file>: not a perplexity JSON (missing key 'ppl')"
    HINT: ClassVar[str] = ""  # how to write a good one, appended to a missing key's message

    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls: type[R], obj: Any, where: str) -> R:
        """Parse ``obj`` (a JSON object as read) from the file ``where``; ``MoequantError`` names the key at fault."""
        if not isinstance(obj, dict):
            raise MoequantError(f"{where}: not {cls.WHAT}: expected a JSON object, got {type(obj).__name__}")
        return cls._from_dict(obj, where, "", cls.WHAT)

    @classmethod
    def _from_dict(cls: type[R], obj: dict[str, Any], where: str, prefix: str, what: str) -> R:
        hints = typing.get_type_hints(cls)
        named = [f for f in fields(cls) if f.name != "extra"]
        missing = [f"{prefix}{f.name}" for f in named if f.name not in obj and f.default is not ABSENT]
        if missing:
            hint = f"; {cls.HINT}" if cls.HINT and not prefix else ""
            raise MoequantError(f"{where}: not {what} (missing key {', '.join(map(repr, missing))}{hint})")
        values = {f.name: _parse(obj[f.name], hints[f.name], where, prefix + f.name, what)
                  for f in named if f.name in obj}
        record = cls(**values, extra={k: v for k, v in obj.items() if k not in values})
        record._check(where)
        return record

    def _check(self, where: str) -> None:
        """Checks across keys, after their types (a subclass's)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: present fields in order, then ``extra``."""
        out = {f.name: _dump(getattr(self, f.name)) for f in fields(self)
               if f.name != "extra" and getattr(self, f.name) is not ABSENT}
        out.update(self.extra)
        return out

    def get(self, key: str, default: Any = None) -> Any:
        """``key``'s value as ``dict.get`` would give it from ``to_dict()``: ``default`` when absent."""
        if key in self.extra:
            return self.extra[key]
        value = getattr(self, key, ABSENT) if key != "extra" else ABSENT
        return default if value is ABSENT else value


# ---------------------------------------------------------------- moequant eval ppl --json


@dataclass(frozen=True, kw_only=True)
class PplJson(JsonRecord):
    """A perplexity JSON: ``moequant.eval.perplexity.PplResult``'s fields between the job (model, corpus)
    and the run info. ``nll_per_window[i]`` (nats) over ``tokens_per_window[i]`` scored tokens of window i."""

    WHAT: ClassVar[str] = "a perplexity JSON"
    HINT: ClassVar[str] = "write it with `moequant eval ppl ... --json`"

    model: str | Absent = ABSENT
    data: str | Absent = ABSENT
    split: str | Absent = ABSENT
    ppl: float
    nll_mean: float | Absent = ABSENT
    ci95: list[float] | Absent = ABSENT
    tokens: int | Absent = ABSENT
    seqlen: int | Absent = ABSENT
    stride: int | None | Absent = ABSENT
    add_bos: bool | Absent = ABSENT
    n_windows: int | Absent = ABSENT
    nll_per_window: list[float]
    tokens_per_window: list[int]
    max_tokens: int | None | Absent = ABSENT
    experts_computed: int | Absent = ABSENT  # a model with QuantExperts only
    experts_total: int | Absent = ABSENT
    experts_per_layer: dict[str, dict[str, int]] | Absent = ABSENT
    seconds: float | Absent = ABSENT
    command: str | Absent = ABSENT
    versions: dict[str, str] | Absent = ABSENT
    machine: dict[str, Any] | Absent = ABSENT
    git: str | None | Absent = ABSENT
    code_sha256: str | Absent = ABSENT  # runinfo.code_sha256: the moequant source that ran (results since 2026-12-05)
    resumed_windows: int | Absent = ABSENT  # windows an interrupted run had scored (``eval ppl --resume``)
    # with resumed_windows: the scoring time of every run (null when an earlier run's progress did not record it)
    seconds_all_runs: float | None | Absent = ABSENT
    job_runs: list[dict[str, Any]] | Absent = ABSENT  # a resumed run: every process that worked on it, with its code

    def _check(self, where: str) -> None:
        if len(self.nll_per_window) != len(self.tokens_per_window):
            raise MoequantError(f"{where}: nll_per_window and tokens_per_window differ in length")


# ---------------------------------------------------------------- report.json


@dataclass(frozen=True, kw_only=True)
class QuantizeReportJson(JsonRecord):
    """A run's ``report.json``: the job, the checkpoint's sizes (``runs.model_sizes``), the
    ``QuantReport`` (per-tensor records as ``TensorRecord`` / ``KeptTensor`` / ``StarvedRecord`` dicts),
    memory and seconds, and the run info. The sweep writes the ``QuantReport`` with its ``recipe`` and the
    run info only; a fine-tuned run its own keys (``finetune``, in ``extra``)."""

    WHAT: ClassVar[str] = "a quantization report"
    HINT: ClassVar[str] = "it is written by `moequant quantize`"

    model: str | Absent = ABSENT
    source: str | None | Absent = ABSENT
    out: str | Absent = ABSENT
    offload: bool | Absent = ABSENT
    config: dict[str, Any] | None | Absent = ABSENT  # the recipe
    recipe: dict[str, Any] | Absent = ABSENT  # the sweep's name for it
    bits_per_weight: float | None  # quantized tensors only
    checkpoint_bytes: int | Absent = ABSENT
    resident_bytes: int | Absent = ABSENT
    ideal_bytes: int | Absent = ABSENT
    packed_bytes: int | Absent = ABSENT
    kept_bytes: int | Absent = ABSENT
    resident_over_ideal: float | Absent = ABSENT
    bits_per_weight_model: float | Absent = ABSENT
    model_bit_count: dict[str, float] | Absent = ABSENT
    solver: dict[str, Any] | None | Absent = ABSENT
    calibration: dict[str, Any] | None | Absent = ABSENT
    quantized_tensors: list[dict[str, Any]] | Absent = ABSENT
    exact_tensors: list[dict[str, Any]] | Absent = ABSENT
    kept_tensors: list[dict[str, Any]] | Absent = ABSENT
    kept_totals: dict[str, int] | Absent = ABSENT
    starved_experts: list[dict[str, Any]] | Absent = ABSENT
    shared_inputs: list[list[str]] | Absent = ABSENT
    layers: list[dict[str, Any]] | Absent = ABSENT  # LayerRecord dicts: each decoder layer's seconds
    layer_seconds: dict[str, Any] | Absent = ABSENT  # QuantReport.layer_seconds(): over every run (--resume)
    table: str | Absent = ABSENT
    peak_rss_bytes: int | Absent = ABSENT
    rss_before_load_bytes: int | Absent = ABSENT
    peak_rss_before_quantize_bytes: int | Absent = ABSENT
    rss_start_quantize_bytes: int | None | Absent = ABSENT  # --offload only
    peak_rss_quantize_bytes: int | None | Absent = ABSENT  # --offload only
    seconds: dict[str, float] | Absent = ABSENT
    completed_by_resume: bool | Absent = ABSENT  # written by --resume after the checkpoint was in place
    job_runs: list[dict[str, Any]] | Absent = ABSENT  # a resumed run: every process that worked on it, with its code
    command: str | Absent = ABSENT
    versions: dict[str, str] | Absent = ABSENT
    machine: dict[str, Any] | Absent = ABSENT
    git: str | None | Absent = ABSENT
    code_sha256: str | Absent = ABSENT  # runinfo.code_sha256: the moequant source that ran (results since 2026-12-05)


# ---------------------------------------------------------------- compare.json


@dataclass(frozen=True, kw_only=True)
class RunEntry(JsonRecord):
    """One compared run (``runs_io.Run.to_dict``)."""

    name: str
    path: str
    method: str
    bits_per_weight: float | None
    bits_per_weight_model: float | None
    checkpoint_bytes: int | None
    is_checkpoint: bool
    model_spec: str | None
    sources: dict[str, str]


@dataclass(frozen=True, kw_only=True)
class PplRow(JsonRecord):
    """A run's perplexity and, against the baseline (A = the run, B = the baseline): ``ratio`` = PPL_A /
    PPL_B, ``delta`` = PPL_A - PPL_B with their paired CIs (``None`` on the baseline's own row)."""

    run: str
    file: str
    ppl: float
    ci: list[float]
    n_windows: int
    tokens: int
    ratio: float
    ratio_ci: list[float] | None
    delta: float
    delta_ci: list[float] | None
    verdict: str


@dataclass(frozen=True, kw_only=True)
class PplBlock(JsonRecord):
    protocol: dict[str, Any]  # data, split and the window-defining fields (``compare.PROTOCOL_FIELDS``)
    rows: list[PplRow]


@dataclass(frozen=True, kw_only=True)
class AccRow(JsonRecord):
    """A run's accuracy and ``delta`` = acc_A - acc_B against the baseline (``None`` CI on its own row)."""

    acc: float
    ci: list[float]
    n: int
    delta: float
    delta_ci: list[float] | None
    verdict: str


@dataclass(frozen=True, kw_only=True)
class TaskBlock(JsonRecord):
    metrics: dict[str, dict[str, AccRow]]  # metric -> run name -> row
    runs: list[str]
    missing: list[str]  # runs without a result for the task
    files: dict[str, str]
    n_examples: int


@dataclass(frozen=True, kw_only=True)
class CompareJson(JsonRecord):
    """``compare.json``: the runs, the statistics and gate settings, a block per corpus and per task, the
    run info, the plots and the markdown report."""

    WHAT: ClassVar[str] = "a comparison JSON"
    HINT: ClassVar[str] = "it is written by `moequant compare`"

    baseline: str
    runs: list[RunEntry]
    stats: dict[str, float]  # n_boot, seed, level (``compare.StatsConfig``)
    gate_config: dict[str, float] | Absent = ABSENT  # ppl_margin, acc_margin (``compare.GateConfig``)
    gate: dict[str, str]  # verdict -> what it means
    ppl: dict[str, PplBlock]
    tasks: dict[str, TaskBlock]
    evaluated: list[str]  # perplexity JSONs the comparison wrote
    command: str
    versions: dict[str, str]
    machine: dict[str, Any]
    git: str | None
    code_sha256: str | Absent = ABSENT
    plots: list[str]
    report_md: str


# ---------------------------------------------------------------- moequant eval tasks --json


@dataclass(frozen=True, kw_only=True)
class TaskResult(JsonRecord):
    """One task: ``eval.tasks_metrics.summarize_task``'s accuracies with their bootstrap CIs and chance level, where
    the data came from, lm-eval's own metrics, and the per-example log (``examples``: ``idx``, ``answer``,
    ``loglik``, ``acc``, ``acc_norm``, ...). A peer's file may hold only ``acc`` / ``acc_norm`` and ``per_example``
    (``correct`` / ``correct_norm``); a task that is not multiple choice has lm-eval's numeric metrics per example."""

    n: int | Absent = ABSENT
    acc: float | Absent = ABSENT
    acc_ci95: list[float] | Absent = ABSENT
    acc_norm: float | Absent = ABSENT
    acc_norm_ci95: list[float] | Absent = ABSENT
    chance: float | Absent = ABSENT
    lm_eval_task: str | Absent = ABSENT
    output_type: str | None | Absent = ABSENT  # tasks that are not multiple choice
    lm_eval: dict[str, Any] | Absent = ABSENT
    data: dict[str, Any] | Absent = ABSENT
    examples: list[dict[str, Any]] | Absent = ABSENT
    per_example: list[dict[str, Any]] | Absent = ABSENT


@dataclass(frozen=True, kw_only=True)
class TasksJson(JsonRecord):
    """A zero-shot tasks JSON: the job (model, tasks, limit, seed, prompt, ...), ``results`` by task name, the time
    and the run info. A peer's minimal file has ``tasks`` as the results object instead of the list of names."""

    WHAT: ClassVar[str] = "a tasks JSON"
    HINT: ClassVar[str] = "write it with `moequant eval tasks ... --json`"

    model: str | Absent = ABSENT
    source: str | Absent = ABSENT  # where the model came from (``models.loader.ResolvedModel.kind``)
    tasks: list[str] | dict[str, TaskResult] | Absent = ABSENT
    bos_added: bool | Absent = ABSENT
    limit: int | None | Absent = ABSENT
    seed: int | Absent = ABSENT
    batch_size: int | Absent = ABSENT
    max_length: int | None | Absent = ABSENT
    n_boot: int | Absent = ABSENT
    num_fewshot: int | Absent = ABSENT
    prompt: dict[str, str] | Absent = ABSENT
    lm_eval_version: str | None | Absent = ABSENT
    results: dict[str, TaskResult] | Absent = ABSENT
    seconds: float | Absent = ABSENT
    command: str | Absent = ABSENT
    versions: dict[str, str] | Absent = ABSENT
    machine: dict[str, Any] | Absent = ABSENT
    git: str | None | Absent = ABSENT
    code_sha256: str | Absent = ABSENT
    resumed_requests: int | Absent = ABSENT  # answered by an interrupted run (``eval tasks --resume``)
    seconds_all_runs: float | None | Absent = ABSENT  # with resumed_requests: the time of every run
    job_runs: list[dict[str, Any]] | Absent = ABSENT  # a resumed run: every process that worked on it, with its code

    @staticmethod
    def holds_results(obj: dict[str, Any]) -> bool:
        """Whether a parsed JSON object carries task results (``results``, or a peer's ``tasks`` object)."""
        return "results" in obj or isinstance(obj.get("tasks"), dict)

    def _check(self, where: str) -> None:
        if self.results is ABSENT and not isinstance(self.tasks, dict):
            raise MoequantError(f"{where}: not {self.WHAT} (missing key 'results'; {self.HINT})")

    def task_results(self) -> dict[str, TaskResult]:
        """Task name -> result: ``results``, or a peer's ``tasks`` object."""
        return self.results if self.results is not ABSENT else self.tasks  # type: ignore[return-value]
