"""The progress of an ``eval tasks --json OUT`` run, kept beside ``OUT`` (``eval.progress_file``) so that
``eval tasks --resume`` continues a killed run and ends with the same numbers (a zero-shot task on a 1.5B model
takes hours on a CPU).

``"answers": {"<batch>:<request key>": [log-likelihood, is_greedy]}``, added after every scored batch of requests
(the request key: a digest of its context and continuation token ids, ``request_key``). A resumed run takes a batch from the
file only when every request of it is there, and scores the other batches as they were formed in the first run
(the same rows, the same padding), so every log-likelihood is the uninterrupted run's to the bit; the fingerprint
holds what forms the batches and what changes a row's numbers: the model's files, the tasks, ``--limit``,
``--batch-size``, ``--max-length``, the seed, the kernel choice and the versions. Nothing here runs math."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from moequant.errors import MoequantError
from moequant.eval.progress_file import ProgressFile


def request_key(context: list[int], continuation: list[int]) -> str:
    return hashlib.sha256(json.dumps([list(context), list(continuation)]).encode()).hexdigest()[:32]


def fingerprint(model_spec: str, resolved: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one (module doc). ``settings``: the job's options."""
    import importlib.metadata as md

    import torch

    from moequant.eval.lm_eval_adapter import lm_eval_version
    from moequant.kernels.select import use_fast
    from moequant.resume import source_files

    local = resolved is not None and resolved.kind in ("alias", "dir", "gguf", "moequant")
    files = source_files(Path(resolved.path), resolved.gguf_file) if local else None
    fp = {"model": model_spec, "files": files, "settings": settings, "fast_kernels": bool(use_fast()),
          "versions": {"moequant": md.version("moequant"), "torch": torch.__version__,
                       "transformers": md.version("transformers"), "lm_eval": lm_eval_version()}}
    return json.loads(json.dumps(fp))  # as the file holds it (tuples become lists)


class TasksProgress(ProgressFile):
    """The answered requests of one run: ``load`` (with ``resume``; the caller keeps them as ``answers``) before
    the evaluation, ``save`` after each scored batch."""

    KIND = "tasks"
    ITEMS = "answers"
    UNITS = "requests"
    DONE = "answered"

    def __init__(self, out_json: Path, fp: dict[str, Any]) -> None:
        super().__init__(out_json, fp)
        self.answers: dict[str, tuple[float, bool]] = {}  # what ``load`` returned (the caller keeps it here)

    def load(self, resume: bool) -> dict[str, tuple[float, bool]]:
        items = self.load_items(resume)
        try:
            return {str(k): (float(v[0]), bool(v[1])) for k, v in items.items()}
        except (TypeError, ValueError, IndexError, KeyError) as e:
            raise MoequantError(f"{self.path}: unreadable progress file ({e}); delete it to start from the "
                                "beginning") from None

    def save(self, answers: dict[str, tuple[float, bool]]) -> None:
        self.save_items({k: [v[0], v[1]] for k, v in answers.items()})
