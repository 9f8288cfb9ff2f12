"""The progress of an ``eval ppl --json OUT`` run, kept beside ``OUT`` so that ``eval ppl --resume`` continues a
killed run from its last finished batch and ends with the same numbers (a whole-split score of a 1.5B model takes
hours on a CPU).

File ``.<OUT-name>.ppl-progress.json`` beside ``OUT``: ``{"fingerprint": {...}, "nll": {window index: summed NLL},
"seconds": scoring time of every run so far, "runs": the processes that scored, with their code}``, rewritten atomically after every batch. The fingerprint holds everything that changes a window's NLL: the model
(its files' names, sizes and mtimes), the SHA-256 of the tokenized text, the window settings, the batch size (a
batch's GEMMs sum in another order than a single window's), the kernel choice and the versions. A resumed run
scores the missing batches only; the per-window NLLs, hence the PPL and its bootstrap CI, are those of an
uninterrupted run. The file is removed once ``OUT`` is written. Nothing here runs math.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from moequant.errors import MoequantError
from moequant.fsutil import atomic_write_json

log = logging.getLogger(__name__)


def progress_path(out_json: Path) -> Path:
    """Where the progress of a run writing ``out_json`` is kept."""
    return out_json.with_name(f".{out_json.name}.ppl-progress.json")


def tokens_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def fingerprint(model_spec: str, resolved: Any, ids: torch.Tensor, settings: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes a window's NLL (module doc). ``settings``: the window and batch options."""
    import importlib.metadata as md

    from moequant.kernels.select import use_fast
    from moequant.resume import source_files

    local = resolved is not None and resolved.kind in ("alias", "dir", "gguf", "moequant")
    files = source_files(Path(resolved.path), resolved.gguf_file) if local else None
    return {"model": model_spec, "files": files, "tokens_sha256": tokens_sha256(ids), "tokens": int(ids.numel()),
            "settings": settings, "fast_kernels": bool(use_fast()),
            "versions": {"moequant": md.version("moequant"), "torch": torch.__version__,
                         "transformers": md.version("transformers")}}


class PplProgress:
    """The finished windows of one run: ``load`` (with ``resume``) before scoring, ``save`` after each batch,
    ``remove`` once the result is written."""

    def __init__(self, out_json: Path, fp: dict[str, Any]) -> None:
        self.path = progress_path(out_json)
        self.fp = fp
        # scoring seconds of the runs before this one (None: a file written before times were kept)
        self.earlier_seconds: float | None = 0.0
        self.runs: list[dict[str, Any]] = []  # every process that scored for this result (runinfo.add_job_run)
        self._t0 = time.time()

    def refuse_stale(self) -> None:
        """Without ``--resume`` an existing progress file is an error (hours of scoring are not thrown away
        silently)."""
        if self.path.is_file():
            raise MoequantError(f"{self.path} holds the scored windows of an interrupted run: pass --resume to "
                                f"continue it, or delete the file to score from the start")

    def load(self, resume: bool) -> dict[int, float]:
        """The NLLs of the windows a previous run finished (``{}`` when there is none). Without ``resume`` an
        existing progress file is an error (hours of scoring are not thrown away silently); with it, a file made
        by a different job is one too, naming what differs."""
        from moequant.runinfo import add_job_run

        if not self.path.is_file():
            if resume:
                log.info("--resume: no progress in %s, scoring every window", self.path)
            self.runs = add_job_run(None, False, self.path)
            return {}
        try:
            old = json.loads(self.path.read_text())
            done = {int(k): float(v) for k, v in old["nll"].items()}
            old_fp = old["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise MoequantError(f"{self.path}: unreadable progress file ({e}); delete it to score from the start") \
                from None
        if not resume:
            self.refuse_stale()
        diff = sorted(k for k in set(old_fp) | set(self.fp) if old_fp.get(k) != self.fp.get(k))
        if diff:
            raise MoequantError(f"--resume: {self.path} was made by a different job ({', '.join(diff)} differ); "
                                f"delete it to score from the start")
        secs = old.get("seconds")
        self.earlier_seconds = float(secs) if isinstance(secs, (int, float)) and not isinstance(secs, bool) else None
        log.info("--resume: %s: %d windows already scored", self.path, len(done))
        self.runs = add_job_run(old.get("runs"), True, self.path)
        self._t0 = time.time()
        return done

    def seconds_all_runs(self) -> float | None:
        """Scoring time of the earlier runs plus this one's so far (None when an earlier one's is unknown)."""
        if self.earlier_seconds is None:
            return None
        return round(self.earlier_seconds + time.time() - self._t0, 2)

    def save(self, done: dict[int, float]) -> None:
        atomic_write_json(self.path, {"fingerprint": self.fp, "nll": {str(k): v for k, v in sorted(done.items())},
                                      "seconds": self.seconds_all_runs(), "runs": self.runs})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
