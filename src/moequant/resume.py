"""The progress of a ``quantize`` run, kept beside ``--out`` so that ``quantize --resume`` continues a
killed run from its last finished decoder layer and ends with the same checkpoint bytes.

Work directory ``.<out-name>.moequant-run/`` beside ``--out``:
- ``job.json``: ``{"fingerprint": {...}, "owner": {"pid", "host", "start"}}``. The fingerprint holds
  everything that changes the result (``fingerprint``: moequant/torch/transformers versions, the source
  model's files with sizes and mtimes, recipe, solver, calibration spec and the SHA-256 of its token
  windows, Hessian options, batch size, ``--offload``, ``--kept-dtype``); the owner is the process
  writing the directory (a live owner keeps every other run out).
- ``layer-00000/``, ``layer-00001/``, ...: one per finished decoder layer, made under a temp name and
  renamed into place, so a kill at any instant leaves whole layers only:
  ``tensors.safetensors`` (the layer's packed ``P_<data>`` and kept tensors, as the checkpoint stores
  them), ``layer.json`` (their quantization metas and order, the layer's report records, the number of
  layers, the activation spec) and, when calibrating, ``act/act_<j>.bin``: the hidden states the
  finished layer produced, which feed the next one (raw bytes, bit for bit). Only the latest layer keeps
  its activations.
- ``embed_head.json``: when the recipe quantizes the embeddings or the head, their report records,
  written after the last layer (a resumed run quantizes them again; the file lets a run killed after the
  checkpoint's rename write its report).

Disk: the packed layers (about the checkpoint's size) plus one layer's activations, ``samples x
seqlen x hidden`` in the model's dtype (128 x 512 x 4096 fp32 = 1 GiB). The directory is removed once
``report.json`` is written. Nothing here runs math: it writes, reads and compares files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moequant.errors import MoequantError
from moequant.fsutil import atomic_write_json, clean_stale, fsync_dir, host_tag, make_temp_dir, pid_alive, temp_name
from moequant.report import LayerRecord, QuantReport, StarvedRecord, TensorRecord
from moequant.runinfo import add_job_run

if TYPE_CHECKING:
    from moequant.calib.runner import LayerwiseRunner
    from moequant.runs import QuantizeJob

log = logging.getLogger(__name__)

WORK_SUFFIX = ".moequant-run"
JOB_FILE = "job.json"
LAYER_FILE = "layer.json"
TENSORS_FILE = "tensors.safetensors"
ACT_DIR = "act"
EMBED_HEAD_FILE = "embed_head.json"


def work_dir_for(out: Path) -> Path:
    """``.<out-name>.moequant-run`` beside ``out``."""
    out = Path(out)
    return out.parent / f".{out.name}{WORK_SUFFIX}"


# ----------------------------------------------------------------------------------------- fingerprint

def source_files(path: Path, gguf_file: str | None = None) -> dict[str, list[int]]:
    """``{name: [size, mtime_ns]}`` of the model's files: the regular, non-hidden files of its directory
    (or only its ``.gguf`` file)."""
    path = Path(path)
    names = [gguf_file] if gguf_file else sorted(p.name for p in path.iterdir()
                                                 if p.is_file() and not p.name.startswith("."))
    return {n: [(path / n).stat().st_size, (path / n).stat().st_mtime_ns] for n in names}


def fingerprint(job: "QuantizeJob", resolved: Any) -> dict[str, Any]:
    """Everything of ``job`` that changes the checkpoint (the calibration tokens are added later by
    ``RunProgress.check_tokens``)."""
    import importlib.metadata as md

    from moequant import __version__

    local = resolved.kind in ("alias", "dir", "gguf", "moequant")
    source = {"kind": resolved.kind, "path": str(Path(resolved.path).resolve()) if local else resolved.path,
              "files": source_files(Path(resolved.path), resolved.gguf_file) if local else None}
    calib = None
    if job.calib is not None:
        calib = job.calib.to_dict()
        data = Path(job.calib.data)
        if data.is_file():
            calib["file"] = {"path": str(data.resolve()), "size": data.stat().st_size,
                             "mtime_ns": data.stat().st_mtime_ns}
    return {"versions": {"moequant": __version__, "torch": torch.__version__, "transformers": md.version("transformers")},
            "source": source, "recipe": job.recipe.to_dict(), "solver": job.solver.to_dict(), "calibration": calib,
            "hessian": job.hessian.to_dict(), "calib_batch_size": job.calib_batch_size, "offload": job.offload,
            "kept_dtype": job.kept_dtype}


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, one short phrase per top-level key (sorted)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "source" and isinstance(a, dict) and isinstance(b, dict) and a.get("path") == b.get("path"):
            fa, fb = a.get("files") or {}, b.get("files") or {}
            changed = sorted(n for n in set(fa) | set(fb) if fa.get(n) != fb.get(n))
            out.append(f"model files changed: {', '.join(changed[:3])}" + (" ..." if len(changed) > 3 else ""))
            continue
        where, a, b = _first_difference(key, a, b) if key != "source" else (key, a, b)  # a moved model: whole
        out.append(f"{where}: was {_short(a)}, now {_short(b)}")
    return out


def _first_difference(path: str, a: Any, b: Any) -> tuple[str, Any, Any]:
    """(dotted path, old value, new value) of the first differing entry, descending while both are dicts."""
    while isinstance(a, dict) and isinstance(b, dict):
        keys = [k for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
        if not keys:
            break
        path, a, b = f"{path}.{keys[0]}", a.get(keys[0]), b.get(keys[0])
    return path, a, b


def _short(v: Any, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True, separators=(",", ":"))
    return s if len(s) <= n else s[:n - 3] + "..."


def tokens_digest(tokens: torch.Tensor) -> str:
    """SHA-256 of the calibration token windows ``[S, L]`` (shape and int64 bytes)."""
    t = tokens.detach().to(torch.int64).contiguous().cpu()
    h = hashlib.sha256(json.dumps(list(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- ownership

def _process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (``/proc``; None where unknown): a PID
    reused by another process has another start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": host_tag(), "start": _process_start(os.getpid())}


def owner_alive(owner: dict[str, Any]) -> bool:
    """Whether the process that wrote ``owner`` may still run (another host's process: assume so)."""
    if owner.get("host") != host_tag():
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid == os.getpid() or not pid_alive(pid):
        return False
    start = _process_start(pid)
    return start is None or owner.get("start") in (None, start)


def read_job(work: Path) -> dict[str, Any]:
    try:
        job = json.loads((work / JOB_FILE).read_text())
    except (OSError, ValueError) as e:
        raise MoequantError(f"{work}: unreadable {JOB_FILE} ({type(e).__name__}); remove the directory to start "
                            "over") from None
    if not isinstance(job, dict) or not isinstance(job.get("fingerprint"), dict):
        raise MoequantError(f"{work / JOB_FILE}: not a moequant run file; remove {work} to start over")
    return job


def check_work_dir(out: Path, resume: bool, work: Path | None = None, what: str = "run") -> None:
    """Before any work: refuse a work directory (``work``, default ``work_dir_for(out)``) another live run
    writes, and (without ``--resume``) one that an interrupted ``what`` left."""
    work = work_dir_for(out) if work is None else Path(work)
    if not work.exists():
        return
    job = read_job(work)
    owner = job.get("owner") or {}
    if owner_alive(owner):
        raise MoequantError(f"another {what} (pid {owner.get('pid')}) is writing {work}: wait for it, stop it, or "
                            "choose another --out")
    if not resume:
        raise MoequantError(f"{work} holds the progress of an interrupted {what} to {out}: pass --resume to "
                            "continue it, or remove that directory to start over")


def claim_work_dir(work: Path, out: Path, fp: dict[str, Any], resume: bool, what: str = "run") -> dict[str, Any] | None:
    """Take over ``work``, the progress directory of a ``what`` writing ``out`` (``check_work_dir`` rules): the
    stored job of an interrupted run with the same fingerprint ``fp`` (now owned by this process; stale temp names
    in it removed), or None after making a new, empty ``work`` holding ``fp``. Fingerprint keys ending in
    ``_tokens`` are digests recorded later and not compared."""
    check_work_dir(out, resume, work, what)
    if work.exists():
        job = read_job(work)
        diff = fingerprint_diff({k: v for k, v in job["fingerprint"].items() if not k.endswith("_tokens")}, fp)
        if diff:
            raise MoequantError(f"--resume: {work} was made by a different job ({'; '.join(diff)}); rerun "
                                "with the same model and options, or remove that directory to start over")
        job["owner"] = _owner()
        job["runs"] = add_job_run(job.get("runs"), True, work)
        atomic_write_json(work / JOB_FILE, job)
        clean_stale(work)
        return job
    if resume:
        log.info("--resume: no progress in %s, starting from the first layer", work)
    job = {"fingerprint": dict(fp), "owner": _owner(), "runs": add_job_run(None, False, work)}
    tmp = make_temp_dir(work.parent, work.name)
    atomic_write_json(tmp / JOB_FILE, job)
    try:
        os.rename(tmp, work)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MoequantError(f"another {what} is writing {work}: wait for it or choose another --out") from None
    fsync_dir(work.parent)
    return None


def record_tokens_digest(work: Path, job: dict[str, Any], key: str, tokens: torch.Tensor) -> None:
    """Record the digest of ``tokens`` as the fingerprint's ``key`` (ending in ``_tokens``), or check it against
    the recorded one (the tokenizer or the text changed since the interrupted run: refused)."""
    digest = tokens_digest(tokens)
    fp = job["fingerprint"]
    if fp.get(key) not in (None, digest):
        raise MoequantError(f"--resume: {work} was made with other token windows ({key}: the tokenizer or the "
                            "text changed); remove that directory to start over")
    if fp.get(key) is None:
        fp[key] = digest
        atomic_write_json(work / JOB_FILE, job)


# -------------------------------------------------------------------------------------------- progress

class LayerProgress:
    """A work directory that keeps a layer-by-layer job: ``layer-00000/``, ... (``tensors.safetensors``,
    ``layer.json``, ``act/``: the hidden states entering the next layer, kept for the latest layer only), each
    made under a temp name and renamed into place. ``RunProgress`` (quantize) and the carving build's progress
    add what their job stores besides."""

    def __init__(self, work: Path, job: dict[str, Any], done: list[int]) -> None:
        self.work = Path(work)
        self.job = job
        self.done = set(done)  # finished layers 0..k
        self._act_layer = max(done) if done else None  # the layer whose act/ feeds the next one
        self._act_pending = self._act_layer is not None

    def is_done(self, layer: int) -> bool:
        return layer in self.done

    def _layer_dir(self, layer: int) -> Path:
        return self.work / f"layer-{layer:05d}"

    def layer_info(self, layer: int) -> dict[str, Any]:
        path = self._layer_dir(layer) / LAYER_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise MoequantError(f"{path}: unreadable ({type(e).__name__}); remove {self.work} to start over") from None

    def store_layer(self, layer: int, n_layers: int, tensors: dict[str, torch.Tensor], info: dict[str, Any],
                    runner: "LayerwiseRunner | None") -> None:
        """Store finished ``layer``: ``tensors``, ``info`` (plus the layer, the layer count and the activation
        spec) and, if another layer follows, the runner's inputs of the next layer, in one rename; then drop the
        previous layer's activations."""
        from safetensors.torch import save_file

        tmp = make_temp_dir(self.work, f"layer-{layer:05d}")
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
            _fsync(tmp / TENSORS_FILE)
            act = runner.save_inputs(tmp / ACT_DIR) if runner is not None and layer < n_layers - 1 else None
            atomic_write_json(tmp / LAYER_FILE, {"layer": layer, "layers": n_layers, **info, "act": act},
                              sort_keys=False)
            os.rename(tmp, self._layer_dir(layer))
        except BaseException:  # interrupted (Ctrl-C, SIGTERM) or failed: no half-written layer stays
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.work)
        self.done.add(layer)
        if self._act_layer is not None and self._act_layer != layer:
            shutil.rmtree(self._layer_dir(self._act_layer) / ACT_DIR, ignore_errors=True)
        self._act_layer = layer if act is not None else None
        self._act_pending = False

    def restore_inputs(self, runner: "LayerwiseRunner | None") -> None:
        """Once, before the first layer a resumed job works on: the runner's inputs become the activations
        stored with the last finished layer."""
        if not self._act_pending or runner is None:
            return
        info = self.layer_info(self._act_layer)
        if not info.get("act"):
            raise MoequantError(f"{self._layer_dir(self._act_layer)}: no calibration activations stored; remove "
                                f"{self.work} to start over")
        runner.load_inputs(self._layer_dir(self._act_layer) / ACT_DIR, info["act"])
        self._act_pending = False

    def remove(self) -> None:
        remove_work_dir(self.work)


class RunProgress(LayerProgress):
    """The work directory of one run: claimed with ``claim``, one ``commit`` per finished layer,
    ``restore_*`` for the layers a resumed run skips, ``remove`` on success."""

    def __init__(self, work: Path, job: dict[str, Any], done: list[int]) -> None:
        super().__init__(work, job, done)
        self.committed = 0

    @classmethod
    def claim(cls, out: Path, fp: dict[str, Any], resume: bool) -> "RunProgress":
        """Take over the work directory of ``out`` (``check_work_dir`` rules), or make a new one."""
        work = work_dir_for(out)
        job = claim_work_dir(work, out, fp, resume)
        if job is None:
            return cls(work, read_job(work), [])
        done = finished_layers(work)
        log.info("--resume: %s: layers %s finished, continuing from layer %d", work,
                 f"0-{max(done)}" if done else "none", len(done))
        return cls(work, job, done)

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Record the calibration windows' digest, or check it against the recorded one."""
        record_tokens_digest(self.work, self.job, "calib_tokens", tokens)

    # --- writing ---------------------------------------------------------------------------------

    def commit(self, layer: int, n_layers: int, tensors: dict[str, torch.Tensor], metas: dict[str, Any],
               records: dict[str, Any], runner: "LayerwiseRunner | None") -> None:
        """Store finished ``layer``: its checkpoint tensors, metas, report records and the activations."""
        self.store_layer(layer, n_layers, tensors, {"keys": list(tensors), "metas": metas, "records": records},
                         runner)
        self.committed += 1

    def store_embed_head_records(self, report: QuantReport) -> None:
        """The report records of the embeddings and the head (``kind`` embedding / head)."""
        records = [asdict(r) for r in report.tensors if r.kind in ("embedding", "head")]
        atomic_write_json(self.work / EMBED_HEAD_FILE, {"tensors": records}, sort_keys=False)

    def release(self) -> None:
        """After a failure: keep the progress if a layer was stored, else remove the directory."""
        if self.done:
            log.warning("progress kept in %s (layers 0-%d finished): rerun with --resume to continue", self.work,
                        max(self.done))
        else:
            self.remove()

    # --- reading ---------------------------------------------------------------------------------

    def layer_tensors(self, layer: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors in their stored order, metas) of finished ``layer``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        info = self.layer_info(layer)
        path = self._layer_dir(layer) / TENSORS_FILE
        try:
            loaded = load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise MoequantError(f"{path}: unreadable ({e}); remove {self.work} to start over") from None
        if sorted(loaded) != sorted(info["keys"]):
            raise MoequantError(f"{path}: tensors differ from {LAYER_FILE}; remove {self.work} to start over")
        return {k: loaded[k] for k in info["keys"]}, info["metas"]

    def restore_records(self, layer: int, report: QuantReport) -> None:
        """The report records of finished ``layer``, its time marked as an earlier run's (unknown when a
        moequant that did not record layer times stored it)."""
        records = self.layer_info(layer)["records"]
        add_records(report, records)
        stored = records.get("layers") or [{"layer": layer, "seconds": None}]
        report.layers.extend(LayerRecord(r["layer"], r["seconds"], restored=True) for r in stored)


def remove_work_dir(work: Path) -> None:
    """Delete a work directory (renamed to a temp name first: a kill halfway leaves a leftover that the
    next run cleans, never a half-deleted progress)."""
    if not work.exists():
        return
    gone = work.parent / temp_name("tmp", work.name)
    os.rename(work, gone)
    shutil.rmtree(gone, ignore_errors=True)


def saved_checkpoint_report(work: Path, out: Path, fp: dict[str, Any]) -> dict[str, Any] | None:
    """When ``out`` is the checkpoint the run of ``work`` wrote (same job, every layer finished, every
    stored layer tensor and meta found equal in ``out``): ``{"source": kind, "report": QuantReport}``
    rebuilt from the layer records; else None."""
    from moequant.formats.checkpoint import ShardReader
    from moequant.fsutil import is_moequant_checkpoint

    job = read_job(work)
    if fingerprint_diff({k: v for k, v in job["fingerprint"].items() if k != "calib_tokens"}, fp):
        return None
    found = sorted(int(p.name[6:]) for p in work.glob("layer-[0-9][0-9][0-9][0-9][0-9]") if p.is_dir())
    if not found or not is_moequant_checkpoint(out):
        return None
    progress = RunProgress(work, job, found)
    first = progress.layer_info(0)
    if found != list(range(first["layers"])):
        return None
    try:
        qmetas = json.loads((out / "config.json").read_text())["quantization_config"]["tensors"]
        reader = ShardReader(out)
        report = QuantReport(**first["records"]["header"])
        for i in found:
            tensors, metas = progress.layer_tensors(i)
            if any(qmetas.get(n) != m for n, m in metas.items()):
                return None
            if any(k not in reader or not torch.equal(reader.read(k), v) for k, v in tensors.items()):
                return None
            progress.restore_records(i, report)
        layer_names = {n for i in found for n in progress.layer_info(i)["metas"]}
        extra = _embed_head_records(work, set(qmetas) - layer_names)
        if extra is None:
            return None
        report.tensors[:0] = [r for r in extra if r.kind == "embedding"]
        report.tensors.extend(r for r in extra if r.kind != "embedding")
    except (OSError, ValueError, KeyError, TypeError, MoequantError) as e:
        log.warning("%s: not the checkpoint of %s (%s)", out, work, e)
        return None
    return {"source": job["fingerprint"]["source"]["kind"], "report": report}


def _embed_head_records(work: Path, packed_outside_layers: set[str]) -> list[TensorRecord] | None:
    """The stored records of the packed tensors outside the decoder layers (embeddings, head), or None
    when they do not name exactly ``packed_outside_layers``."""
    path = work / EMBED_HEAD_FILE
    if not packed_outside_layers:
        return []
    if not path.is_file():
        return None
    records = [TensorRecord(**{**r, "shape": tuple(r["shape"])}) for r in json.loads(path.read_text())["tensors"]]
    return records if {r.name for r in records} == packed_outside_layers else None


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def committed_layers(work: Path) -> tuple[list[int], list[int]]:
    """Read only: (layers ``0..k`` with a committed directory, the ones after a gap)."""
    found = sorted(int(p.name[6:]) for p in work.glob("layer-[0-9][0-9][0-9][0-9][0-9]") if p.is_dir())
    done = [i for n, i in enumerate(found) if i == n]
    return done, found[len(done):]


def finished_layers(work: Path) -> list[int]:
    """Layers ``0..k`` with a committed directory; later ones after a gap are removed (they cannot be
    reused: each layer is calibrated on the layers before it)."""
    done, stray = committed_layers(work)
    for i in stray:
        log.warning("%s: layer %d follows a missing layer; dropped", work, i)
        shutil.rmtree(work / f"layer-{i:05d}", ignore_errors=True)
    return done


# --------------------------------------------------------------------------------------------- records

def records_mark(report: QuantReport) -> tuple[int, int, int, int]:
    return len(report.tensors), len(report.starved), len(report.shared_inputs), len(report.layers)


def records_since(report: QuantReport, mark: tuple[int, int, int]) -> dict[str, Any]:
    """The report records one layer added (JSON-able)."""
    t, s, g, n = mark
    return {"header": {"recipe": report.recipe, "solver": report.solver, "calibration": report.calibration},
            "tensors": [asdict(r) for r in report.tensors[t:]], "starved": [asdict(r) for r in report.starved[s:]],
            "shared_inputs": report.shared_inputs[g:], "layers": [asdict(r) for r in report.layers[n:]]}


def add_records(report: QuantReport, records: dict[str, Any]) -> None:
    report.tensors.extend(TensorRecord(**{**r, "shape": tuple(r["shape"])}) for r in records["tensors"])
    report.starved.extend(StarvedRecord(**r) for r in records["starved"])
    report.shared_inputs.extend(records["shared_inputs"])


# ------------------------------------------------------------------------------------- in-memory layers

def restore_packed(model: nn.Module, tensors: dict[str, torch.Tensor], metas: dict[str, Any], where: Path) -> None:
    """Swap in the packed modules of one finished layer (``QuantLinear`` / ``QuantExperts`` built from its
    stored tensors, exactly as ``layerwise.quantize_layer`` built them)."""
    from moequant.formats.registry import FORMATS
    from moequant.layerwise import set_module
    from moequant.nn.quant_experts import QuantExperts
    from moequant.nn.quant_linear import QuantLinear

    experts: dict[str, dict[str, Any]] = {}
    for name, meta in metas.items():
        try:
            cls = FORMATS.get(meta["format"])
            qt = cls.from_state_dict({f"{name}_{d}": tensors[f"{name}_{d}"] for d in cls.names_for(meta)}, name, meta)
        except (KeyError, ValueError) as e:
            raise MoequantError(f"{where}: {name}: cannot rebuild the packed tensor ({e})") from None
        module_name, _, param = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Linear):
            set_module(model, module_name, QuantLinear(qt, module.bias))
        else:
            experts.setdefault(module_name, {})[param] = qt
    for mname, parts in experts.items():
        old = model.get_submodule(mname)
        for p in ("gate_up_proj", "down_proj"):
            parts.setdefault(p, getattr(old, p).detach())
        set_module(model, mname, QuantExperts(parts["gate_up_proj"], parts["down_proj"], old.act_fn))


def restore_layer_in_memory(progress: RunProgress, layer: int, model: nn.Module, report: QuantReport) -> None:
    tensors, metas = progress.layer_tensors(layer)
    restore_packed(model, tensors, metas, progress.work / f"layer-{layer:05d}")
    progress.restore_records(layer, report)
