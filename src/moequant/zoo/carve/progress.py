"""The progress of a carving build (``zoo build moe``, ``zoo build ALIAS``), kept beside ``--out`` so that a
killed build continues with ``--resume`` where it stopped and ends with the same weights and the same figures
(a carving of Qwen2.5-Coder-0.5B takes hours on a CPU: carve, two or three whole-split scores, a distillation).

Work directory ``.<out-name>.moequant-build/`` beside ``--out``, claimed as ``resume.claim_work_dir`` does (a
live owner keeps every other build out; without ``--resume`` an interrupted build's directory is an error):
- ``job.json``: the fingerprint (``build_fingerprint``: versions, the source model's files, the carving spec,
  the evaluation settings; the digests of the calibration and evaluation token windows) and the owner.
- ``layer-00000/``, ...: one per carved decoder layer, made under a temp name and renamed into place:
  ``tensors.safetensors`` (the carved layer's whole state: attention, norms, router, experts), ``layer.json``
  (its record for ``training.json`` and the activation spec) and ``act/``: the hidden states the layer produced,
  which enter the next one (raw bytes; only the latest layer keeps them).
- ``score-<name>.json``: one perplexity evaluation (``dense``, ``before`` the distillation, ``moe``): the summed
  NLL of every scored window, the routing counters and the scoring seconds so far, rewritten after every batch.
- ``recover.pt``: the distillation's state (the trained tensors, AdamW's state, the batch generator's state, the
  loss history, the step), written every ``save_seconds`` of training and after the last step
  (``torch.save``; read back with ``weights_only=True``).

Disk: the carved model once (about the MoE's fp32 size), one layer's activations, the distillation state. The
directory is removed once the build's directory is in place. Nothing here runs math.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moequant.errors import MoequantError
from moequant.fsutil import atomic_write_json, fsync_dir, read_json_object, temp_name
from moequant.resume import (LAYER_FILE, TENSORS_FILE, LayerProgress, claim_work_dir, committed_layers,
                             finished_layers, owner_alive, read_job, record_tokens_digest, source_files)

if TYPE_CHECKING:
    from moequant.calib.runner import LayerwiseRunner

log = logging.getLogger(__name__)

WORK_SUFFIX = ".moequant-build"
RECOVER_FILE = "recover.pt"
SAVE_SECONDS = 300.0  # the distillation state is written at most this often (and after the last step)


def build_work_dir(out: Path) -> Path:
    """``.<out-name>.moequant-build`` beside ``out``."""
    out = Path(out)
    return out.parent / f".{out.name}{WORK_SUFFIX}"


def build_fingerprint(resolved: Any, spec: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    """Everything of a build that changes its result: versions, the source model (kind, path, files with sizes and
    mtimes), the carving spec (``CarveSpec.to_dict()``) and the evaluation settings."""
    import importlib.metadata as md

    from moequant import __version__

    local = resolved.kind in ("alias", "dir", "gguf", "moequant")
    source = {"kind": resolved.kind, "path": str(Path(resolved.path).resolve()) if local else resolved.path,
              "files": source_files(Path(resolved.path), resolved.gguf_file) if local else None}
    fp = {"versions": {"moequant": __version__, "torch": torch.__version__, "transformers": md.version("transformers")},
          "source": source, "spec": spec, "evaluation": evaluation}
    return json.loads(json.dumps(fp))  # as job.json holds it (tuples become lists), so the two compare equal


def describe_progress(work: Path) -> str | None:
    """One line on the progress a build keeps in ``work`` (``zoo list``): its carved layers, the windows of each
    score, the distillation state, and whether its owner still runs. Read only (nothing is claimed, checked or
    removed); None when there is no such directory."""
    if not work.is_dir():
        return None
    try:
        owner = read_job(work).get("owner") or {}
    except MoequantError:
        return f"unreadable progress in {work}: remove it to start over"
    k = len(committed_layers(work)[0])  # layers 0..k-1 are usable
    total = (read_json_object(work / f"layer-{k - 1:05d}" / LAYER_FILE) or {}).get("layers") if k else None
    parts = [f"{k} of {total} layers carved" if isinstance(total, int) else f"{k} layers carved"]
    for path in sorted(work.glob("score-*.json")):
        nll = (read_json_object(path) or {}).get("nll")
        parts.append(f"{path.stem[6:]} scored on {len(nll)} windows" if isinstance(nll, dict) else
                     f"{path.name} unreadable")
    if (work / RECOVER_FILE).is_file():
        parts.append("distillation state kept")
    if owner_alive(owner):
        return f"building now (pid {owner.get('pid')}): " + ", ".join(parts)
    return "interrupted: " + ", ".join(parts) + " (continue with --resume)"


class ScoreProgress:
    """The windows one evaluation has scored so far (``score-<name>.json``): ``nll`` ({window: summed NLL}),
    ``routing`` (``RoutingCounter.state()`` or None) and ``seconds``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.nll: dict[int, float] = {}
        self.routing: dict[str, Any] | None = None
        self.seconds = 0.0
        if path.is_file():
            try:
                d = json.loads(path.read_text())
                self.nll = {int(k): float(v) for k, v in d["nll"].items()}
                self.routing, self.seconds = d.get("routing"), float(d["seconds"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise MoequantError(f"{path}: unreadable ({type(e).__name__}); remove {path.parent} to start "
                                    "over") from None
            log.info("--resume: %s: %d windows already scored", path.name, len(self.nll))

    def save(self, scored: dict[int, float], routing: dict[str, Any] | None, seconds: float) -> None:
        atomic_write_json(self.path, {"nll": {str(k): v for k, v in sorted(scored.items())}, "routing": routing,
                                      "seconds": seconds}, sort_keys=False)


class BuildProgress(LayerProgress):
    """The work directory of one build: ``claim``, then per carved layer ``commit_layer`` (or ``restore_layer``
    for the layers an interrupted build finished), ``score`` per evaluation, ``save_recover`` / ``load_recover``
    for the distillation; ``remove`` once the output is in place, ``release`` after a failure."""

    def __init__(self, work: Path, job: dict[str, Any], done: list[int], resumed: bool = False) -> None:
        super().__init__(work, job, done)
        self.resumed = resumed  # an interrupted build's directory was taken over
        self.save_seconds = SAVE_SECONDS

    @classmethod
    def claim(cls, out: Path, fp: dict[str, Any], resume: bool) -> "BuildProgress":
        work = build_work_dir(out)
        job = claim_work_dir(work, out, fp, resume, what="build")
        if job is None:
            return cls(work, read_job(work), [])
        done = finished_layers(work)
        log.info("--resume: %s: %d carved layers, %d scores and %s distillation state kept", work, len(done),
                 len(list(work.glob("score-*.json"))), "a" if (work / RECOVER_FILE).is_file() else "no")
        return cls(work, job, done, resumed=True)

    @staticmethod
    def kept_after_finish(out: Path, fp: dict[str, Any]) -> dict[str, Any] | None:
        """A build stopped after its output was in place but before its work directory was removed: that
        directory goes and the output's ``training.json`` is returned; None when this is not that case (no work
        directory, no finished output, another job's progress). A live owner is refused as by ``claim``."""
        from moequant.resume import check_work_dir, fingerprint_diff, remove_work_dir

        work = build_work_dir(out)
        prov = read_json_object(Path(out) / "training.json")
        if not work.is_dir() or prov is None:
            return None
        check_work_dir(out, True, work, "build")
        # written by this job, after all its progress (not an older build that an interrupted --overwrite replaces)
        if (Path(out) / "training.json").stat().st_mtime_ns < max(p.stat().st_mtime_ns for p in [work, *work.iterdir()]):
            return None
        kept = {k: v for k, v in read_job(work)["fingerprint"].items() if not k.endswith("_tokens")}
        if fingerprint_diff(kept, fp):
            return None
        log.info("--resume: %s was written before the build stopped; removing its progress %s", out, work)
        remove_work_dir(work)
        return prov

    def check_tokens(self, key: str, tokens: torch.Tensor) -> None:
        """Record the digest of the token windows ``key`` (``calib_tokens``, ``eval_tokens``), or check it."""
        record_tokens_digest(self.work, self.job, key, tokens)

    # --- carving ---------------------------------------------------------------------------------

    def commit_layer(self, layer: int, n_layers: int, module: nn.Module, record: dict[str, Any],
                     runner: "LayerwiseRunner") -> None:
        """Store carved ``layer``: its whole state, its record and the runner's inputs of the next layer."""
        self.store_layer(layer, n_layers, module.state_dict(), {"record": record}, runner)

    def restore_layer(self, layer: int, module: nn.Module) -> dict[str, Any]:
        """Load carved ``layer``'s stored state into ``module``; returns its record."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._layer_dir(layer) / TENSORS_FILE
        try:
            module.load_state_dict(load_file(str(path)), strict=True)
        except (OSError, SafetensorError, RuntimeError) as e:
            raise MoequantError(f"{path}: does not fit layer {layer} ({str(e).splitlines()[0]}); remove {self.work} "
                                "to start over") from None
        return self.layer_info(layer)["record"]

    # --- scores and the distillation -------------------------------------------------------------

    def score(self, name: str) -> ScoreProgress:
        return ScoreProgress(self.work / f"score-{name}.json")

    def save_recover(self, state: dict[str, Any]) -> None:
        tmp = self.work / temp_name("tmp", RECOVER_FILE)
        try:
            torch.save(state, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.work / RECOVER_FILE)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.work)

    def load_recover(self) -> dict[str, Any] | None:
        path = self.work / RECOVER_FILE
        if not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=True)
        except Exception as e:  # a torch.load failure has many types; any of them means the file is unusable
            raise MoequantError(f"{path}: unreadable ({type(e).__name__}); remove {self.work} to start over") from None

    # --- end -------------------------------------------------------------------------------------

    def release(self) -> None:
        """After a failure: keep what was stored (a layer, a score, the distillation state), else remove it."""
        kept = self.done or any(self.work.glob("score-*.json")) or (self.work / RECOVER_FILE).is_file()
        if kept:
            log.warning("progress kept in %s: rerun the same command with --resume to continue", self.work)
        else:
            self.remove()

