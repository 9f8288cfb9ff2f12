"""The progress of an evaluation that writes one JSON result (``eval ppl --json OUT``, ``eval tasks --json OUT``),
kept beside ``OUT`` so that ``--resume`` continues a killed run and ends with the same numbers.

File ``.<OUT-name>.<kind>-progress.json`` beside ``OUT``: ``{"fingerprint": {...}, <ITEMS>: {key: value},
"seconds": working time of every run so far, "runs": the processes that worked on it, with their code}``,
rewritten atomically after every batch and removed once ``OUT`` is written. The fingerprint holds everything that
changes a kept value (the subclass's caller builds it); a file made by another job is refused naming what differs,
and without ``--resume`` an existing file is an error (hours of work are not thrown away silently). Nothing here
runs math."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, ClassVar

from moequant.errors import MoequantError
from moequant.fsutil import atomic_write_json

log = logging.getLogger(__name__)


class ProgressFile:
    """One result's kept items: ``load`` (with ``resume``) before the work, ``save`` after each batch, ``remove``
    once the result is written. Subclasses name the file (``KIND``), the items (``ITEMS``, ``UNITS``, ``DONE``)."""

    KIND: ClassVar[str] = "progress"
    ITEMS: ClassVar[str] = "items"  # the key of the kept values in the file
    UNITS: ClassVar[str] = "items"  # for messages: "12 windows already scored"
    DONE: ClassVar[str] = "done"

    def __init__(self, out_json: Path, fp: dict[str, Any]) -> None:
        self.path = self.path_for(Path(out_json))
        self.fp = fp
        # working seconds of the runs before this one (None: a file written before times were kept)
        self.earlier_seconds: float | None = 0.0
        self.runs: list[dict[str, Any]] = []  # every process that worked for this result (runinfo.add_job_run)
        self._t0 = time.time()

    @classmethod
    def path_for(cls, out_json: Path) -> Path:
        """Where the progress of a run writing ``out_json`` is kept."""
        return out_json.with_name(f".{out_json.name}.{cls.KIND}-progress.json")

    def refuse_stale(self) -> None:
        """Without ``--resume`` an existing progress file is an error."""
        if self.path.is_file():
            raise MoequantError(f"{self.path} holds the {self.DONE} {self.UNITS} of an interrupted run: pass --resume "
                                f"to continue it, or delete the file to start from the beginning")

    def load_items(self, resume: bool) -> dict[str, Any]:
        """The items a previous run finished as the file holds them (``{}`` when there is none); refusals as the
        module says."""
        from moequant.runinfo import add_job_run

        if not self.path.is_file():
            if resume:
                log.info("--resume: no progress in %s, starting from the beginning", self.path)
            self.runs = add_job_run(None, False, self.path)
            return {}
        try:
            old = json.loads(self.path.read_text())
            items, old_fp = old[self.ITEMS], old["fingerprint"]
            if not isinstance(items, dict) or not isinstance(old_fp, dict):
                raise TypeError(f"{self.ITEMS} and fingerprint must be objects")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise MoequantError(f"{self.path}: unreadable progress file ({e}); delete it to start from the "
                                "beginning") from None
        if not resume:
            self.refuse_stale()
        diff = sorted(k for k in set(old_fp) | set(self.fp) if old_fp.get(k) != self.fp.get(k))
        if diff:
            raise MoequantError(f"--resume: {self.path} was made by a different job ({', '.join(diff)} differ); "
                                f"delete it to start from the beginning")
        secs = old.get("seconds")
        self.earlier_seconds = float(secs) if isinstance(secs, (int, float)) and not isinstance(secs, bool) else None
        log.info("--resume: %s: %d %s already %s", self.path, len(items), self.UNITS, self.DONE)
        self.runs = add_job_run(old.get("runs"), True, self.path)
        self._t0 = time.time()
        return items

    def seconds_all_runs(self) -> float | None:
        """Working time of the earlier runs plus this one's so far (None when an earlier one's is unknown)."""
        if self.earlier_seconds is None:
            return None
        return round(self.earlier_seconds + time.time() - self._t0, 2)

    def save_items(self, items: dict[str, Any]) -> None:
        atomic_write_json(self.path, {"fingerprint": self.fp, self.ITEMS: items, "seconds": self.seconds_all_runs(),
                                      "runs": self.runs})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
