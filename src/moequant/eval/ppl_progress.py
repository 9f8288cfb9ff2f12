"""The progress of an ``eval ppl --json OUT`` run, kept beside ``OUT`` so that ``eval ppl --resume`` continues a
killed run from its last finished batch and ends with the same numbers (a whole-split score of a 1.5B model takes
hours on a CPU).

File ``.<OUT-name>.ppl-progress.json`` beside ``OUT`` (``eval.progress_file``): ``"nll": {window index: summed
NLL}``, rewritten atomically after every batch. The fingerprint holds everything that changes a window's NLL: the model
(its files' names, sizes and mtimes), the SHA-256 of the tokenized text, the window settings, the batch size (a
batch's GEMMs sum in another order than a single window's), the kernel choice and the versions. A resumed run
scores the missing batches only; the per-window NLLs, hence the PPL and its bootstrap CI, are those of an
uninterrupted run. The file is removed once ``OUT`` is written. Nothing here runs math.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from moequant.errors import MoequantError
from moequant.eval.progress_file import ProgressFile


def progress_path(out_json: Path) -> Path:
    """Where the progress of a run writing ``out_json`` is kept."""
    return PplProgress.path_for(out_json)


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


class PplProgress(ProgressFile):
    """The finished windows of one run (``{window index: summed NLL}``): ``load`` (with ``resume``) before scoring,
    ``save`` after each batch, ``remove`` once the result is written."""

    KIND = "ppl"
    ITEMS = "nll"
    UNITS = "windows"
    DONE = "scored"

    def load(self, resume: bool) -> dict[int, float]:
        items = self.load_items(resume)
        try:
            return {int(k): float(v) for k, v in items.items()}
        except (TypeError, ValueError) as e:
            raise MoequantError(f"{self.path}: unreadable progress file ({e}); delete it to start from the "
                                "beginning") from None

    def save(self, done: dict[int, float]) -> None:
        self.save_items({str(k): v for k, v in sorted(done.items())})
