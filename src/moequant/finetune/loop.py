"""The fine-tuning run: a quantized run directory in, a normal packed checkpoint out (``moequant finetune``).

Each step draws ``batch`` training windows (a generator seeded by ``(seed, step)``, so a resumed run draws
what the uninterrupted one would), runs the teacher (the unquantized model the run was made from, its
``report.json``'s ``model``) and the student (the run, its packed weights decoded differentiably by the
trainables of ``settings.method``, ``finetune.trainable``), takes the token-mean KL (or, with ``objective``
"layer", each trained decoder layer's error on the teacher's own input to it: ``finetune.layer_loss``), then
an Adam step on every continuous parameter (and the norms). Per method: ``pv`` adds, every ``v_every`` steps,
a V-step on every packed tensor (``finetune.pv``; trellis tensors re-encode whole tiles); ``bcjr`` sets each
trellis tensor's temperature before the step from the cosine schedule (``finetune.schedule``); ``kd`` and
``ste`` take the gradient step only. ``layers`` limits the training to the packed tensors and norms of some
decoder layers; everything else stays as it was. The KL on the first ``eval_windows`` windows is measured
before and after, on the packed model.

Work directory ``.<out-name>.moequant-finetune/`` beside ``--out``: ``log.jsonl`` (one line per step: step,
loss, fraction of codes changed (pv), temperature (bcjr)), and every ``save_every`` steps (and after any step
that ends ``save_minutes`` or more after the last save, so that a kill loses at most that much work)
``state-<step>.safetensors`` (every trainable's state, norms, every Adam moment, PV's straight-through offsets)
with ``state.json`` (fingerprint, step, Adam step counts, step sizes, history) written after it. ``--resume``
continues from the saved step and ends with the same checkpoint bytes as an uninterrupted run, whichever step was
saved (the save policy is not part of the fingerprint). The directory is removed once the checkpoint is in place.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from moequant.calib.data import CalibData
from moequant.errors import MoequantError
from moequant.eval.runs_io import report_naming_model
from moequant.finetune.layer_loss import layer_loss, teacher_targets, trained_layers
from moequant.finetune.pv import AdamState, adam_step, kl_loss, rate_for, st_target
from moequant.finetune.schedule import cosine_tau
from moequant.finetune.trellis_trainable import TrellisTrainOptions
from moequant.finetune.trainable import (FINETUNE_METHODS, layer_prefixes, norm_parameters, open_tensors,
                                         train_forward, write_back)

log = logging.getLogger(__name__)

WORK_SUFFIX = ".moequant-finetune"


# Options of one method only, their defaults, and the method they belong to.
_METHOD_OPTIONS: dict[str, tuple[str, object]] = {
    "code_lr": ("pv", 3e-3), "max_change": ("pv", 0.01), "v_every": ("pv", 1), "tau": ("bcjr", (0.3, 0.05)),
    "soft_bits": ("bcjr", 8), "ste_every": ("ste", 8)}

# What a step minimises (``--loss``): the name and what the report says of it.
OBJECTIVES = {
    "kl": "token-mean KL(teacher || student) of the next-token distributions",
    "layer": "mean over the trained decoder layers i of ||f_i(x_i) - y_i||^2 / ||y_i||^2, x_i and y_i the "
             "teacher's input and output of layer i (no gradient between layers)"}


@dataclass(frozen=True)
class FinetuneSettings:
    steps: int
    method: str = "pv"
    lr: float = 1e-3  # step size relative to each parameter's RMS
    code_lr: float | None = None  # pv: RMS of the straight-through step relative to each decoded weight's RMS (3e-3)
    max_change: float | None = None  # pv: fraction of a tensor's codes a V-step may change (0.01)
    v_every: int | None = None  # pv: a V-step after every v_every-th step (1)
    tau: tuple[float, float] | None = None  # bcjr: (start, end) of the cosine temperature anneal ((0.3, 0.05))
    soft_bits: int | None = None  # bcjr: state bits of the soft pass (8; >= L: the full trellis)
    ste_every: int | None = None  # ste: the latent's Viterbi codes recomputed every N-th step (8)
    layers: tuple[int, ...] | None = None  # decoder layers whose packed tensors and norms train; None: all
    objective: str = "kl"  # --loss: "kl" (end to end) or "layer" (each layer to its unquantized self)
    batch: int = 4
    train_norms: bool = True
    seed: int = 0
    save_every: int = 50
    eval_windows: int = 8

    def __post_init__(self) -> None:
        if self.method not in FINETUNE_METHODS:
            raise ValueError(f"--method {self.method!r} is not one of {', '.join(FINETUNE_METHODS)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--loss {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        for name, (owner, default) in _METHOD_OPTIONS.items():
            flag = f"--{name.replace('_', '-')}"
            if getattr(self, name) is None:
                object.__setattr__(self, name, default if self.method == owner else None)
            elif self.method != owner:
                raise ValueError(f"{flag} applies to --method {owner} only, not {self.method}")
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        for name in ("lr", "code_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.max_change is not None and not 0 <= self.max_change <= 1:
            raise ValueError(f"--max-change must be in [0, 1], got {self.max_change}")
        for name in ("v_every", "batch", "save_every", "eval_windows", "soft_bits", "ste_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.tau is not None and not (len(self.tau) == 2 and all(t > 0 for t in self.tau)):
            raise ValueError(f"--tau must be two temperatures > 0, got {self.tau}")
        if self.layers is not None:
            if not self.layers or any(i < 0 for i in self.layers):
                raise ValueError(f"--layers must name decoder layers (indices >= 0), got {list(self.layers)}")
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))

    def tau_at(self, step: int) -> float | None:
        """The temperature of 0-based ``step`` (None without a schedule)."""
        return None if self.tau is None else cosine_tau(step, self.steps, *self.tau)


@dataclass(frozen=True)
class FinetuneJob:
    run: Path
    out: Path
    settings: FinetuneSettings
    calib: CalibData | None = None  # None: the run's own calibration text and windows
    overwrite: bool = False
    resume: bool = False
    progress: bool = True
    save_minutes: float | None = 10.0  # also save after a step that ends this long after the last save; None: off

    def __post_init__(self) -> None:
        if self.save_minutes is not None and not self.save_minutes >= 0:
            raise ValueError(f"--save-minutes must be >= 0, got {self.save_minutes}")


def work_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}{WORK_SUFFIX}"


def batch_index(seed: int, step: int, windows: int, batch: int) -> torch.Tensor:
    """The windows of step ``step``: ``[batch]`` drawn by a generator seeded with ``(seed, step)``."""
    g = torch.Generator().manual_seed((seed << 32) + step)
    return torch.randint(0, windows, (batch,), generator=g)


# ------------------------------------------------------------------------------------------------ inputs


def _run_report(run: Path) -> dict[str, Any]:
    from moequant.fsutil import read_json_object

    if not (run / "config.json").is_file():
        raise MoequantError(f"{run}: not a moequant checkpoint (no config.json)")
    qcfg = (read_json_object(run / "config.json") or {}).get("quantization_config") or {}
    if not qcfg.get("tensors"):
        raise MoequantError(f"{run}: no quantized tensors to fine-tune (not a moequant quantize output)")
    rep = report_naming_model(run)
    if rep is None:
        raise MoequantError(f"{run}: no report.json naming the model it was quantized from (the teacher)")
    return rep.to_dict()


def _calib_spec(job: FinetuneJob, rep: dict[str, Any]) -> CalibData:
    if job.calib is not None:
        return job.calib
    c = rep.get("calibration") or {}
    if not c.get("data"):
        raise MoequantError(f"{job.run} was quantized without calibration text: pass --data")
    return CalibData(data=c["data"], split=c.get("split", "train"), samples=int(c["sequences"]),
                     seqlen=int(c["seqlen"]), seed=int(c.get("seed", 0)))


def _teacher(rep: dict[str, Any], run: Path):
    from moequant.bench import base_model_of
    from moequant.models.loader import load_model

    spec = base_model_of(run)
    log.info("teacher: %s", spec)
    model, tok, _ = load_model(spec)
    if tok is None:
        raise MoequantError(f"the teacher {spec} has no tokenizer: cannot tokenize the calibration text")
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


# ------------------------------------------------------------------------------------------------ state


class FinetuneState:
    """Everything a step changes: the trainable tensors, the norms, the Adam moments, PV's offsets ``δ``."""

    def __init__(self, model: torch.nn.Module, settings: FinetuneSettings) -> None:
        prefixes = None if settings.layers is None else layer_prefixes(model, settings.layers)
        trellis = TrellisTrainOptions(soft_bits=settings.soft_bits or TrellisTrainOptions.soft_bits,
                                      ste_every=settings.ste_every or TrellisTrainOptions.ste_every)
        self.tensors = open_tensors(model, settings.method, prefixes, trellis)
        self.params: dict[str, torch.Tensor] = {}
        for name, t in self.tensors.items():
            self.params.update({f"{name}:{k}": p for k, p in t.parameters().items()})
        # a norm trains as a float32 master copy; the model's parameter holds it rounded to the stored dtype (so a
        # bfloat16 norm is not stuck where one step is below its resolution) and receives the gradient
        self.norms: dict[str, torch.nn.Parameter] = {}
        if settings.train_norms:
            for name, p in norm_parameters(model, prefixes).items():
                p.requires_grad_(True)
                self.norms[name] = p
                self.params[name] = p.detach().to(torch.float32).clone()
        self.adam = {n: AdamState.zeros_like(p) for n, p in self.params.items()}
        self.rates = {n: rate_for(p, settings.lr) for n, p in self.params.items()}
        self.delta: dict[str, torch.Tensor] = {}
        self.v_adam: dict[str, AdamState] = {}
        self.v_rates: dict[str, float] = {}
        if settings.code_lr is None:
            return
        with torch.no_grad():
            for name, t in self.tensors.items():
                w = t.weight()
                self.delta[name] = torch.zeros_like(w)
                self.v_adam[name] = AdamState.zeros_like(w)
                self.v_rates[name] = rate_for(w, settings.code_lr)

    def set_temperature(self, tau: float | None) -> None:
        """Every trainable with a temperature (a soft trellis) at ``tau`` (None: nothing to set)."""
        if tau is None:
            return
        for t in self.tensors.values():
            setter = getattr(t, "set_temperature", None)
            if setter is not None:
                setter(tau)

    def tensors_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in self.tensors.items():
            out.update({f"t/{name}/{k}": v for k, v in t.state().items()})
        for name in self.delta:
            out[f"delta/{name}"] = self.delta[name]
            out[f"vm/{name}"], out[f"vv/{name}"] = self.v_adam[name].m, self.v_adam[name].v
        for name, p in self.params.items():
            if name in self.norms:
                out[f"norm/{name}"] = p.detach()
            out[f"m/{name}"], out[f"v/{name}"] = self.adam[name].m, self.adam[name].v
        return {k: v.detach().clone().contiguous() for k, v in out.items()}

    def grad(self, name: str) -> torch.Tensor | None:
        """The gradient of parameter ``name`` (a norm's is its model parameter's)."""
        p = self.norms.get(name, self.params[name])
        return p.grad

    def zero_grad(self) -> None:
        for p in [*self.params.values(), *self.norms.values()]:
            p.grad = None

    def sync_norms(self) -> None:
        """Each trained norm's model parameter set to its master copy (rounded to the parameter's dtype)."""
        with torch.no_grad():
            for name, p in self.norms.items():
                p.copy_(self.params[name])

    def meta(self) -> dict[str, Any]:
        return {"adam_t": {n: s.t for n, s in self.adam.items()}, "v_adam_t": {n: s.t for n, s in self.v_adam.items()},
                "rates": self.rates, "v_rates": self.v_rates}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for name, t in self.tensors.items():
            t.load_state({k.rsplit("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"t/{name}/")})
        for name in self.delta:
            self.delta[name] = tensors[f"delta/{name}"].clone()
            self.v_adam[name] = AdamState(tensors[f"vm/{name}"].clone(), tensors[f"vv/{name}"].clone(),
                                          meta["v_adam_t"][name])
        with torch.no_grad():
            for name, p in self.params.items():
                if name in self.norms:
                    p.copy_(tensors[f"norm/{name}"])
                self.adam[name] = AdamState(tensors[f"m/{name}"].clone(), tensors[f"v/{name}"].clone(),
                                            meta["adam_t"][name])
        self.rates, self.v_rates = dict(meta["rates"]), dict(meta["v_rates"])
        self.sync_norms()


def _save_state(work: Path, step: int, state: FinetuneState, fp: dict[str, Any], history: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from moequant.fsutil import atomic_write_json, temp_name

    tmp = work / temp_name("tmp", f"state-{step}", ".safetensors")
    save_file(state.tensors_dict(), str(tmp))
    final = work / f"state-{step}.safetensors"
    tmp.replace(final)
    atomic_write_json(work / "state.json", {"fingerprint": fp, "step": step, "file": final.name, **state.meta(),
                                            "history": history})
    for old in work.glob("state-*.safetensors"):
        if old != final:
            old.unlink()


def _load_state(work: Path, state: FinetuneState, fp: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    from safetensors.torch import load_file

    from moequant.fsutil import read_json_object

    meta = read_json_object(work / "state.json")
    if meta is None:
        return 0, {}
    saved = dict(meta.get("fingerprint") or {})
    if isinstance(saved.get("settings"), dict):  # an older moequant's state has save_every in it
        saved["settings"] = {k: v for k, v in saved["settings"].items() if k not in _NOT_FINGERPRINTED}
    if saved != fp:
        diff = sorted(k for k in set(fp) | set(saved) if saved.get(k) != fp.get(k))
        raise MoequantError(f"--resume: {work} was written by a different run (differs in {', '.join(diff)}); "
                            "remove it to start over")
    state.load(load_file(str(work / meta["file"])), meta)
    return int(meta["step"]), meta["history"]


# ------------------------------------------------------------------------------------------------ the run


def mean_kl(student, teacher, windows: torch.Tensor, batch: int) -> float:
    """Token-mean KL(teacher ‖ student) over ``windows [S, L]`` (equal-sized batches weigh by tokens)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            ids = windows[i:i + batch]
            t_logp = torch.log_softmax(teacher(ids, use_cache=False).logits.float(), -1)
            total += float(kl_loss(student(ids, use_cache=False).logits, t_logp)) * ids.shape[0]
            count += ids.shape[0]
    return total / count


def kl_objective(student, teacher, ids: torch.Tensor) -> torch.Tensor:
    """``--loss kl``: token-mean KL(teacher ‖ student) on ``ids [b, L]``."""
    with torch.no_grad():
        t_logp = torch.log_softmax(teacher(ids, use_cache=False).logits.float(), -1)  # [b, L, V]
    return kl_loss(student(ids, use_cache=False).logits, t_logp)


def objective_for(settings: FinetuneSettings, model: torch.nn.Module) -> Callable:
    """``(student, teacher, ids) -> loss`` of ``settings.objective`` (``--loss``)."""
    if settings.objective == "kl":
        return kl_objective
    indices = trained_layers(model, settings.layers)
    return lambda student, teacher, ids: layer_loss(student, ids, teacher_targets(teacher, ids, indices))


def _step(student, teacher, ids: torch.Tensor, state: FinetuneState, weights: dict[str, torch.Tensor],
          max_change: float | None, objective: Callable = kl_objective) -> tuple[float, float | None]:
    """One gradient step on ``objective`` (and a V-step when ``max_change`` is given) on batch ``ids [b, L]`` ->
    (loss, fraction of codes changed or None)."""
    for name, t in state.tensors.items():
        weights[name] = t.weight()
        if max_change is not None:
            weights[name].retain_grad()  # the V-step's straight-through direction
    loss = objective(student, teacher, ids)
    state.zero_grad()
    loss.backward()
    with torch.no_grad():
        for name, p in state.params.items():
            grad = state.grad(name)
            if grad is not None:  # a parameter the loss does not reach keeps its Adam state
                p.copy_(adam_step(p, grad, state.adam[name], state.rates[name]))
    state.zero_grad()
    state.sync_norms()
    changed = None
    if max_change is not None:
        moved = total = 0
        with torch.no_grad():
            for name, t in state.tensors.items():
                target = st_target(t.weight(), state.delta[name], weights[name].grad, state.v_adam[name],
                                   state.v_rates[name])
                frac = t.reencode(target, max_change)
                n_codes = t.code_count()
                moved, total = moved + frac * n_codes, total + n_codes
                state.delta[name] = target - t.weight()
        changed = moved / max(1, total)
    weights.clear()
    return float(loss.detach()), changed


# Settings a resumed run may change: the steps (the schedule, when there is one, pins them separately) and
# how often the state is saved, which never changes the result.
_NOT_FINGERPRINTED = ("steps", "save_every")


def _fingerprint(run: Path, settings: FinetuneSettings, calib: CalibData, tokens: torch.Tensor) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one, as JSON reads it back (tuples become lists).
    The number of steps may differ, except under a temperature schedule, which it stretches."""
    from moequant.resume import tokens_digest

    schedule = None if settings.tau is None else {"tau": list(settings.tau), "anneal": "cosine",
                                                   "steps": settings.steps}
    fp = {"run": str(run.resolve()), "run_config": (run / "config.json").read_text(),
          "settings": {k: v for k, v in asdict(settings).items() if k not in _NOT_FINGERPRINTED},
          "calib": calib.to_dict(),
          "tokens": tokens_digest(tokens), "schedule": schedule}
    return json.loads(json.dumps(fp))


def run_finetune(job: FinetuneJob, argv: list[str] | None = None,
                 on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Fine-tune ``job.run`` into ``job.out``; returns the result ``report.json`` holds. ``on_step(step, loss)``
    is called after each step."""
    from tqdm.auto import tqdm

    from moequant import api
    from moequant.calib.data import calibration_tokens
    from moequant.fsutil import AtomicDir, atomic_write_json, check_output
    from moequant.resume import remove_work_dir
    from moequant.runinfo import add_job_run, job_runs, run_info

    settings, run, out = job.settings, Path(job.run), Path(job.out)
    work = work_dir_for(out)
    if work.exists() and not job.resume:
        raise MoequantError(f"{work} holds the progress of an interrupted finetune to {out}: pass --resume to "
                            "continue it, or remove that directory to start over")
    rep = _run_report(run)
    check_output(out, job.overwrite, "--out", sources=[run])
    calib = _calib_spec(job, rep)
    student = api.load(run)
    for p in student.parameters():
        p.requires_grad_(False)
    state = FinetuneState(student, settings)  # refuses a format the method does not train before the teacher loads
    teacher, tok = _teacher(rep, run)
    tokens = calibration_tokens(tok, calib)  # [S, L]
    fp = _fingerprint(run, settings, calib, tokens)
    evalw = tokens[:settings.eval_windows]
    start, history = 0, {}
    if job.resume and work.exists():
        start, history = _load_state(work, state, fp)
        log.info("--resume: continuing from step %d", start)
    work.mkdir(exist_ok=True)
    t0 = last_save = time.time()
    if not history:
        history = {"loss_before": mean_kl(student, teacher, evalw, settings.batch), "loss": [], "changed": [],
                   "seconds": 0.0}
    history["runs"] = add_job_run(history.get("runs"), start > 0, work)
    logf = work / "log.jsonl"
    lines = logf.read_text().splitlines()[:start] if logf.exists() else []
    logf.write_text("".join(line + "\n" for line in lines))
    weights: dict[str, torch.Tensor] = {}
    objective = objective_for(settings, student)
    with train_forward(student, state.tensors, weights), open(logf, "a") as logfh:
        bar = tqdm(range(start, settings.steps), desc=settings.method, unit="step", disable=not job.progress,
                   initial=start, total=settings.steps)
        for step in bar:
            ids = tokens[batch_index(settings.seed, step, tokens.shape[0], settings.batch)]
            tau = settings.tau_at(step)
            state.set_temperature(tau)
            v_now = settings.v_every is not None and (step + 1) % settings.v_every == 0
            loss, changed = _step(student, teacher, ids, state, weights, settings.max_change if v_now else None,
                                  objective)
            history["loss"].append(loss)
            if changed is not None:
                history["changed"].append(changed)
            line = {"step": step + 1, "loss": loss}
            line.update({"changed": changed} if settings.method == "pv" else {})
            line.update({"tau": tau} if tau is not None else {})
            logfh.write(json.dumps(line) + "\n")
            logfh.flush()
            bar.set_postfix({settings.objective: f"{loss:.4f}", **({"tau": f"{tau:.3f}"} if tau is not None else {})})
            done = step + 1
            due = done % settings.save_every == 0 or (
                job.save_minutes is not None and time.time() - last_save >= 60 * job.save_minutes)
            if due and done < settings.steps:
                _save_state(work, done, state, fp, {**history, "seconds": history["seconds"] + time.time() - t0})
                last_save = time.time()
            if on_step is not None:
                on_step(done, loss)
    for p in [*state.params.values(), *state.norms.values()]:
        p.requires_grad_(False)
    write_back(student, state.tensors)
    loss_after = mean_kl(student, teacher, evalw, settings.batch)
    seconds = history["seconds"] + time.time() - t0
    ft = {"method": settings.method, "about": FINETUNE_METHODS[settings.method],
          **json.loads(json.dumps(asdict(settings))),
          "trained_tensors": sorted(state.tensors), "calib": calib.to_dict(),
          "tokens_seen": settings.steps * settings.batch * int(tokens.shape[1]),
          "loss": "token-mean KL(teacher || student) on the first eval_windows training windows",
          "train_loss_is": OBJECTIVES[settings.objective],
          "loss_before": history["loss_before"], "loss_after": loss_after, "train_loss": history["loss"],
          "trained_parameters": sum(p.numel() for p in state.params.values()), "seconds": round(seconds, 2)}
    if settings.method == "pv":
        ft["changed_fraction"] = history["changed"]
    if settings.tau is not None:
        ft["tau_schedule"] = {"start": settings.tau[0], "end": settings.tau[1], "anneal": "cosine",
                              "tau": [settings.tau_at(i) for i in range(settings.steps)]}
    result = {
        "model": rep["model"], "source": rep.get("source"), "config": rep.get("config"),
        "bits_per_weight": rep.get("bits_per_weight"), "calibration": rep.get("calibration"),
        "finetuned_from": str(run), "out": str(out), "finetune": ft, **job_runs(history), **run_info(argv),
    }
    log.info("%s: KL %.5f -> %.5f over %d steps (%.1f s)", settings.method, history["loss_before"], loss_after,
             settings.steps, seconds)
    with AtomicDir(out, overwrite=job.overwrite) as tmp:
        api.save(student, tmp, tokenizer=tok, overwrite=True)  # replaces the empty temp dir
        atomic_write_json(tmp / "report.json", result)
    remove_work_dir(work)
    return result
