"""Carve a dense causal LM into a stock transformers MoE, layer by layer, and write it with its provenance.

``carve_model`` walks the decoder like the quantizer does (``calib.runner.LayerwiseRunner``): the
calibration windows enter layer ``i`` as the already-carved layers ``< i`` produce them; the layer's
attention runs (copied from the dense model), its MLP inputs ``x`` and the dense MLP's outputs ``y`` are
captured, the neurons are split (``neurons``), written into the target's ``SparseMoeBlock``
(``targets``) and fitted (``fit``), and the carved layer produces the inputs of layer ``i + 1``. Errors
therefore do not compound silently: each layer is fitted on what the carved model before it really
produces. ``build_moe`` adds the optional recovery distillation (``recover``), the PTB test scores of
dense and carved model with routing statistics, and writes the directory atomically.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from moequant.calib.data import CalibData
from moequant.errors import MoequantError
from moequant.zoo.carve.fit import FitSettings, final_error, fit_block
from moequant.zoo.carve.neurons import (activation_markers, balanced_kmeans, contributions, experts_from_labels,
                                        neuron_activations, split_shared)
from moequant.zoo.carve.recover import RecoverSettings
from moequant.zoo.carve.targets import (SOURCE_TYPES, TARGETS, CarvedMLP, check_pair, copy_shared_weights,
                                        moe_config, source_attention, write_block)

if TYPE_CHECKING:
    from moequant.zoo.carve.progress import BuildProgress, ScoreProgress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CarveSpec:
    """Everything that determines a carved model (with the source model and the code version)."""

    arch: str = "qwen2_moe"
    experts: int = 8
    top_k: int = 2
    shared_fraction: float = 0.25
    calib: CalibData = field(default_factory=lambda: CalibData(samples=64, seqlen=512))
    marker_tokens: int = 8192  # tokens whose markers describe a neuron for the clustering
    fit: FitSettings = field(default_factory=FitSettings)
    recover: RecoverSettings = field(default_factory=RecoverSettings)
    batch_size: int = 8  # calibration windows per forward
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in TARGETS:
            raise MoequantError(f"--arch {self.arch!r}: choose from {', '.join(TARGETS)}")
        if self.experts < 1:
            raise MoequantError(f"--experts must be >= 1, got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise MoequantError(f"--top-k must be in [1, --experts={self.experts}], got {self.top_k}")
        if not 0.0 <= self.shared_fraction < 1.0:
            raise MoequantError(f"--shared-fraction must be in [0, 1), got {self.shared_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_sizes(intermediate: int, experts: int, shared_fraction: float) -> tuple[int, int]:
    """(shared neurons, neurons per routed expert): the shared count nearest ``shared_fraction · I`` that
    leaves a multiple of ``experts`` routed neurons."""
    per = (intermediate - round(shared_fraction * intermediate)) // experts
    if per < 1:
        raise MoequantError(f"{intermediate} MLP neurons leave fewer than one per expert for {experts} experts "
                            f"at --shared-fraction {shared_fraction}")
    return intermediate - per * experts, per


class _CaptureMLP(nn.Module):
    """Stands in for a layer's MLP during one pass: records its inputs and the dense MLP's outputs."""

    def __init__(self, dense_mlp: nn.Module) -> None:
        super().__init__()
        self.dense = dense_mlp
        self.xs: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.dense(h)
        self.xs.append(h.reshape(-1, h.shape[-1]).detach().clone())
        self.ys.append(y.reshape(-1, y.shape[-1]).detach().clone())
        return y


def _qk_norm_from_rms(layer: nn.Module, runner: Any, index: int, mode: str) -> dict[str, float]:
    """Set the target's q/k norm weights to the calibration RMS of q and k (see ``targets``)."""
    attn = layer.self_attn
    head_dim = attn.head_dim
    sums = {"q_proj": [0.0, 0], "k_proj": [0.0, 0]}

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            o = out.detach().float()
            o = o.reshape(*o.shape[:-1], -1, head_dim) if mode == "head" else o  # per head or over all
            rms = o.pow(2).mean(-1).sqrt()
            sums[name][0] += float(rms.sum())
            sums[name][1] += rms.numel()
        return fn

    handles = [getattr(attn, n).register_forward_hook(hook(n)) for n in sums]
    try:
        runner.run(index, keep_outputs=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    with torch.no_grad():
        for proj, norm in (("q_proj", "q_norm"), ("k_proj", "k_norm")):
            s, n = sums[proj]
            out[norm] = s / max(n, 1)
            getattr(attn, norm).weight.fill_(out[norm])
    return out


def carve_neurons(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act,
                   n_shared: int, experts: int, per_token: int, marker_tokens: int, seed: int
                   ) -> tuple[CarvedMLP, torch.Tensor]:
    """Split one dense MLP's neurons (see ``neurons``). -> (carving, activation rate ``[I]``)."""
    counts = torch.zeros(gate.shape[0])
    marks = []
    with torch.no_grad():
        for s in range(0, x.shape[0], 4096):
            m = activation_markers(contributions(neuron_activations(x[s:s + 4096], gate, up, act), down), per_token)
            counts += m.sum(0)
            marks.append(m)
    rate = counts / x.shape[0]
    shared, routed = split_shared(rate, n_shared)
    markers = torch.cat(marks)  # [T, I] bool
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(markers.shape[0], generator=g)[:marker_tokens].sort().values
    feats = markers[rows][:, routed].T.float()  # [n_routed, t]
    labels = balanced_kmeans(feats, experts, seed=seed)
    return CarvedMLP(gate, up, down, shared, experts_from_labels(routed, labels, experts)), rate


def _expert_hessian_spread(block: nn.Module, x: torch.Tensor, experts: int) -> dict[str, Any]:
    """Routed-token share per expert and ``‖H_e − H_mean‖_F / ‖H_mean‖_F`` of each expert's input
    second moment ``H_e = mean x xᵀ`` over its routed calibration tokens."""
    h = x.shape[1]
    acc = torch.zeros(experts, h, h, dtype=torch.float64)
    n = torch.zeros(experts)
    with torch.no_grad():
        for s in range(0, x.shape[0], 4096):
            xb = x[s:s + 4096]
            _, _, idx = block.gate(xb)
            for e in range(experts):
                sel = (idx == e).any(1)
                xe = xb[sel]
                acc[e] += (xe.T @ xe).double()
                n[e] += int(sel.sum())
    mean_h = acc.sum(0) / max(float(n.sum()), 1.0)
    spread = []
    for e in range(experts):
        he = acc[e] / max(float(n[e]), 1.0)
        spread.append(float(torch.linalg.norm(he - mean_h) / torch.linalg.norm(mean_h)) if n[e] else float("nan"))
    return {"tokens": [int(c) for c in n], "hessian_spread": spread}


def carve_model(dense: nn.Module, tokens: torch.Tensor, spec: CarveSpec, progress: bool = True,
                keeper: "BuildProgress | None" = None) -> tuple[nn.Module, list[dict[str, Any]], bool]:
    """(carved MoE model in eval mode, per-layer records, attention exact?) for ``dense`` calibrated on
    ``tokens [S, L]``. ``keeper``: the build's progress; layers an interrupted build carved are loaded from it,
    each newly carved layer is stored there."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from moequant.calib.runner import LayerwiseRunner
    from moequant.models.adapters import adapter_for

    src_type = dense.config.model_type
    if src_type not in SOURCE_TYPES:
        raise MoequantError(f"cannot carve a {src_type!r} model: the source must be a dense "
                            f"{'/'.join(SOURCE_TYPES)} model")
    target = TARGETS[spec.arch]
    src = source_attention(dense)
    exact = check_pair(src_type, src, target)
    if not exact:
        log.warning("%s normalises q and k and the %s source does not: the q/k norms are set to the calibration "
                    "RMS, an approximation (the carved MLPs are exact; --recover-steps trains the norms)",
                    target.model_type, src_type)
    if spec.top_k == 1 and spec.fit.router_steps:
        log.warning("--top-k 1: the renormalised routing weight is always 1, so the router fit gets no gradient "
                    "and keeps the least-squares router (routing may collapse onto few experts)")
    inter = dense.model.layers[0].mlp.gate_proj.weight.shape[0]
    n_shared, per = split_sizes(inter, spec.experts, spec.shared_fraction)
    if not target.shared_expert and n_shared:
        log.info("%s has no shared-expert module: the %d shared neurons are replicated in every expert",
                 target.model_type, n_shared)
    cfg = moe_config(dense.config, target, experts=spec.experts, top_k=spec.top_k,
                     expert_size=per if target.shared_expert else per + n_shared, shared_size=n_shared, src=src)
    torch.manual_seed(spec.seed)  # from_config initialises weights we overwrite; keep it reproducible anyway
    moe = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    moe.eval()
    copy_shared_weights(moe, dense)
    per_token = n_shared + spec.top_k * per  # neurons a token is given in the MoE
    runner = LayerwiseRunner(moe, adapter_for(moe), tokens, batch_size=spec.batch_size)
    records = []
    n_layers = len(moe.model.layers)
    for i in tqdm(range(n_layers), desc="carve", unit="layer", disable=not progress):
        if keeper is not None and keeper.is_done(i):
            records.append(keeper.restore_layer(i, moe.model.layers[i]))
            continue
        if keeper is not None:
            keeper.restore_inputs(runner)
        t0 = time.perf_counter()
        layer, dense_layer = moe.model.layers[i], dense.model.layers[i]
        block = layer.mlp
        rec: dict[str, Any] = {"layer": i}
        cap = _CaptureMLP(dense_layer.mlp)
        layer.mlp = cap
        try:
            if not exact:
                rec["qk_norm_init"] = _qk_norm_from_rms(layer, runner, i, target.qk_norm)
            runner.run(i, keep_outputs=False)
        finally:
            layer.mlp = block
        x, y = torch.cat(cap.xs), torch.cat(cap.ys)  # [T, H] each
        del cap
        dm = dense_layer.mlp
        carved, rate = carve_neurons(x, dm.gate_proj.weight.detach(), dm.up_proj.weight.detach(),
                                      dm.down_proj.weight.detach(), dm.act_fn, n_shared, spec.experts, per_token,
                                      spec.marker_tokens, spec.seed + i)
        write_block(block, carved, target, spec.top_k)
        rec["errors"] = fit_block(block, carved, target, dm.act_fn, x, y, spec.fit)
        rec.update(_expert_hessian_spread(block, x, spec.experts))
        rec["shared_rate_mean"] = float(rate[carved.shared].mean()) if n_shared else None
        rec["routed_rate_mean"] = float(rate[torch.cat(carved.experts)].mean())
        runner.run(i, keep_outputs=True)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        records.append(rec)
        if keeper is not None:
            keeper.commit_layer(i, n_layers, layer, rec, runner)
        stage, err = final_error(rec["errors"])
        log.info("layer %d: relative MLP error %s = %.4f (%.1f s)", i, stage, err, rec["seconds"])
    moe.config.output_router_logits = False
    return moe, records, exact


def active_fraction(inter: int, spec: CarveSpec) -> float:
    """Fraction of the dense MLP's neurons a token uses in the carved model."""
    n_shared, per = split_sizes(inter, spec.experts, spec.shared_fraction)
    return (n_shared + spec.top_k * per) / inter


class RoutingCounter:
    """Counts, per layer, the tokens routed to each expert and the mean entropy of the router's softmax,
    from forward hooks on every ``mlp.gate`` (use as a context manager around an evaluation)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.counts: list[torch.Tensor] = []
        self.entropy: list[float] = []
        self.tokens: list[int] = []
        self._handles: list[Any] = []

    def __enter__(self) -> "RoutingCounter":
        for i, layer in enumerate(self.model.model.layers):
            e = layer.mlp.gate.weight.shape[0]
            self.counts.append(torch.zeros(e, dtype=torch.long))
            self.entropy.append(0.0)
            self.tokens.append(0)
            self._handles.append(layer.mlp.gate.register_forward_hook(self._hook(i)))
        return self

    def _hook(self, i: int) -> Callable[..., None]:
        def fn(_m: nn.Module, _inp: Any, out: Any) -> None:
            logits, _, idx = out
            self.counts[i] += torch.bincount(idx.reshape(-1), minlength=self.counts[i].numel())
            p = torch.softmax(logits.float(), -1)
            self.entropy[i] += float(-(p * torch.log(p.clamp_min(1e-30))).sum())
            self.tokens[i] += logits.shape[0]
        return fn

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()

    def state(self) -> dict[str, Any]:
        """The counters (JSON-able; ``load`` continues from them exactly)."""
        return {"counts": [c.tolist() for c in self.counts], "entropy": list(self.entropy), "tokens": list(self.tokens)}

    def load(self, state: dict[str, Any]) -> None:
        """Continue from ``state()`` of an interrupted evaluation of the same model (inside ``with``)."""
        if len(state["counts"]) != len(self.counts) or any(len(a) != c.numel() for a, c in zip(state["counts"],
                                                                                               self.counts)):
            raise MoequantError("stored routing counters do not fit this model's layers and experts")
        self.counts = [torch.tensor(a, dtype=torch.long) for a in state["counts"]]
        self.entropy = [float(v) for v in state["entropy"]]
        self.tokens = [int(v) for v in state["tokens"]]

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for c, ent, n in zip(self.counts, self.entropy, self.tokens):
            share = c.double() / max(int(c.sum()), 1)
            nz = share[share > 0]
            out.append({"tokens": n, "share": [round(float(s), 5) for s in share],
                        "balance_entropy": float(-(nz * nz.log()).sum() / math.log(share.numel())) if share.numel() > 1 else 1.0,
                        "router_entropy_mean": ent / max(n, 1)})
        return out


COLLAPSE_SHARE = 0.95  # the top-k experts of a layer taking this much of its routed tokens: routing has collapsed


def top_k_share(share: list[float], top_k: int) -> float:
    """The routed-token share of a layer's ``top_k`` most chosen experts."""
    return sum(sorted(share, reverse=True)[:top_k])


def collapsed_layers(routing: list[dict[str, Any]], top_k: int, share: float = COLLAPSE_SHARE) -> list[int]:
    """Layers (indices into ``routing``, ``RoutingCounter.summary()``'s list) whose ``top_k`` most chosen experts
    take at least ``share`` of the routed tokens: there the carved MLP acts as one fixed, smaller MLP and the
    other experts are all but dead (their calibration Hessians empty or nearly so)."""
    return [i for i, r in enumerate(routing)
            if top_k < len(r["share"]) and top_k_share(r["share"], top_k) >= share]


def is_carve_build(path: Path) -> bool:
    from moequant.fsutil import read_json_object

    rec = read_json_object(Path(path) / "training.json")
    return rec is not None and str(rec.get("call", "")).startswith("moequant.zoo.carve.build_moe(")


def build_moe(source: str, out: Path, spec: CarveSpec, *, overwrite: bool = False, eval_tokens: int | None = None,
              evaluate: bool = True, eval_data: str = "ptb", alias: str | None = None, progress: bool = True,
              dense_eval_from: Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Carve ``source`` (zoo alias, HF directory, ``.gguf`` or hub id) into ``out`` and return the
    provenance written there as ``training.json``. ``eval_data`` (a corpus alias's test split, or a text
    file) is scored by the dense and the carved model; ``eval_tokens``: only its first N tokens.
    ``dense_eval_from``: an earlier build of the same source on the same text (its directory or ``training.json``)
    whose dense per-window losses are reused instead of scoring the dense model again (checked: source, text,
    parameter count, windows and tokens). The work done so far is kept beside ``out`` (``zoo.carve.progress``:
    carved layers, scored windows, the distillation's state); ``resume`` continues an interrupted build of the same
    job (``training.json`` then says ``resumed``; a layer's seconds are those of the run that carved it, a score's
    and the distillation's the sum over the runs, ``seconds.carve`` and ``seconds.total`` this process's only,
    ``seconds.all_runs`` the work of every run: ``work_seconds``)."""
    from moequant.fsutil import AtomicDir, is_empty_dir
    from moequant.models.loader import resolve_model_spec
    from moequant.zoo.carve.progress import BuildProgress, build_fingerprint

    t_start = time.perf_counter()
    out = Path(out)
    reused = None if dense_eval_from is None or not evaluate else read_dense_eval(Path(dense_eval_from), source,
                                                                                  eval_data, eval_tokens)
    is_ours = lambda p: is_empty_dir(p) or is_carve_build(p)  # noqa: E731
    kind = "a previous carved build (its training.json) or an empty directory"
    fp = build_fingerprint(resolve_model_spec(source), spec.to_dict(), {
        "evaluate": evaluate, "data": _data_identity(eval_data) if evaluate else None, "max_tokens": eval_tokens,
        "dense_eval_from": reused.where if reused is not None else None})
    if resume and (done := BuildProgress.kept_after_finish(out, fp)) is not None:
        return done
    with AtomicDir(out, overwrite=overwrite, what="--out", is_ours=is_ours, kind=kind) as tmp:
        keeper = BuildProgress.claim(out, fp, resume)
        try:
            prov = _build(source, out, tmp, spec, keeper, reused, eval_tokens=eval_tokens, evaluate=evaluate,
                          eval_data=eval_data, alias=alias, progress=progress, t_start=t_start)
        except BaseException:
            keeper.release()
            raise
    keeper.remove()
    return prov


def _data_identity(data: str) -> Any:
    """``data`` as the fingerprint holds it: a corpus alias by name, a text file by path, size and mtime."""
    f = Path(data)
    return {"path": str(f.resolve()), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} if f.is_file() \
        else data


def _build(source: str, out: Path, tmp: Path, spec: CarveSpec, keeper: "BuildProgress", reused: DenseEval | None, *,
           eval_tokens: int | None, evaluate: bool, eval_data: str, alias: str | None, progress: bool,
           t_start: float) -> dict[str, Any]:
    """``build_moe``'s work, written into ``tmp``."""
    from moequant.calib.data import calibration_tokens
    from moequant.fsutil import atomic_write_json
    from moequant.models.loader import load_model
    from moequant.runinfo import job_runs, run_info
    from moequant.zoo.carve.recover import distill
    from moequant.zoo.manifest import write_manifest

    dense, tok, _ = load_model(source)
    if reused is not None:  # before hours of carving
        reused.check_dense(sum(p.numel() for p in dense.parameters()))
    if tok is None:
        raise MoequantError(f"{source}: no tokenizer; carving needs one for the calibration text")
    for p in dense.parameters():
        p.requires_grad_(False)
    tokens = calibration_tokens(tok, spec.calib)  # [S, L]
    keeper.check_tokens("calib_tokens", tokens)
    t0 = time.perf_counter()
    moe, layers, exact = carve_model(dense, tokens, spec, progress, keeper)
    carve_s = time.perf_counter() - t0
    rec: dict[str, Any] = {}
    before = None
    if spec.recover.steps:
        if evaluate:  # the carved model before the distillation, on the same windows
            before = evaluate_pair(dense, moe, tok, eval_tokens, progress, data=eval_data, reused=reused,
                                   keeper=keeper, name="before")
        r = distill(moe, dense, recovery_tokens(tok, spec, tokens), spec.recover, progress, keeper)
        rec = asdict(r)
    inter = dense.model.layers[0].mlp.gate_proj.weight.shape[0]
    prov: dict[str, Any] = {
        "call": f"moequant.zoo.carve.build_moe({source!r}, {str(out)!r})",
        "alias": alias, "source": source, "source_model_type": dense.config.model_type,
        "spec": spec.to_dict(), "attention_exact": exact,
        "active_fraction": active_fraction(inter, spec),
        "parameters": {"dense": sum(p.numel() for p in dense.parameters()),
                       "moe": sum(p.numel() for p in moe.parameters())},
        "layers": layers, "recover": rec, "seconds": {"carve": round(carve_s, 1)}, "resumed": keeper.resumed,
        **job_runs(keeper.job),
        **run_info([*sys.argv]),
    }
    if evaluate:
        ev = evaluate_pair(dense, moe, tok, eval_tokens, progress, data=eval_data,
                           base=before.pop("_base") if before else None, reused=reused, keeper=keeper)
        ev.pop("_base")
        if before:
            ev["before_recover"] = {k: before[k] for k in ("ppl_moe", "ratio", "ratio_ci95", "seconds_moe",
                                                          "routing", "nll_per_window_moe")}
        prov["eval"] = ev
    prov["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    prov["seconds"]["all_runs"] = work_seconds(prov)
    moe.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    atomic_write_json(tmp / "training.json", prov)
    write_manifest(tmp, {"carved_from": source, "arch": spec.arch})
    return prov


def work_seconds(prov: dict[str, Any]) -> dict[str, float]:
    """The build's work over every process that took part (a build resumed across sessions): the carving (each
    layer's seconds, from the run that carved it), the scores (dense unless reused, before and after the
    distillation; each summed over its runs) and the distillation, and their ``sum`` (loading and saving not
    counted: ``seconds.total`` has this process's wall time)."""
    ev = prov.get("eval") or {}
    scores = [ev.get("seconds_dense"), ev.get("seconds_moe"), (ev.get("before_recover") or {}).get("seconds_moe")]
    work = {"carve": round(sum(r["seconds"] for r in prov["layers"]), 1),
            "scores": round(sum(s for s in scores if s is not None), 1),
            "distill": round(float((prov.get("recover") or {}).get("seconds", 0.0)), 1)}
    return {**work, "sum": round(sum(work.values()), 1)}


def recovery_tokens(tok: Any, spec: CarveSpec, calib_tokens: torch.Tensor) -> torch.Tensor:
    """The distillation windows: ``spec.recover.samples`` fresh windows of ``spec.recover.seqlen`` tokens of
    the calibration corpus's training split, drawn with seed ``calib.seed + 1`` (not the carving's windows),
    or the calibration windows themselves when ``samples`` is 0."""
    from moequant.calib.data import calibration_tokens

    r = spec.recover
    if not r.samples:
        return calib_tokens
    c = spec.calib
    return calibration_tokens(tok, CalibData(data=c.data, split=c.split, samples=r.samples, seqlen=r.seqlen,
                                             seed=c.seed + 1))  # [samples, seqlen]


def _score(model: nn.Module, ids: torch.Tensor, max_tokens: int | None, bos: int | None, progress: bool,
           routing: bool = False, keep: "ScoreProgress | None" = None
           ) -> tuple[Any, float, list[dict[str, Any]] | None]:
    """(perplexity result, seconds, routing summary or None). ``keep``: the windows (and routing counters) an
    interrupted build scored are not scored again; every batch is stored there."""
    from moequant.eval.perplexity import PplConfig, evaluate_perplexity

    t0, before = time.perf_counter(), keep.seconds if keep is not None else 0.0
    with RoutingCounter(model) if routing else contextlib.nullcontext() as rc:
        if keep is not None and keep.routing is not None and rc is not None:
            rc.load(keep.routing)

        def on_batch(scored: dict[int, float]) -> None:
            keep.save(scored, rc.state() if rc is not None else None, before + time.perf_counter() - t0)

        res = evaluate_perplexity(model, ids, PplConfig(max_tokens=max_tokens), bos, progress,
                                  done=keep.nll if keep is not None else None,
                                  on_batch=on_batch if keep is not None else None)
    return res, round(before + time.perf_counter() - t0, 1), rc.summary() if rc is not None else None


@dataclass(frozen=True)
class DenseEval:
    """The dense model's per-window losses from an earlier build's ``training.json`` (``--dense-eval-from``)."""

    where: str
    parameters: int
    tokens: int
    nll_per_window: list[float]

    def check_dense(self, parameters: int) -> None:
        if parameters != self.parameters:
            raise MoequantError(f"--dense-eval-from {self.where}: its dense model has {self.parameters} parameters, "
                                f"this one {parameters}: not the same source model")

    def result(self, moe_res: Any) -> Any:
        """The dense result on ``moe_res``'s windows (same windows checked: count and tokens)."""
        import dataclasses

        from moequant.eval.bootstrap import bootstrap_ci

        if len(self.nll_per_window) != moe_res.n_windows or self.tokens != moe_res.tokens:
            raise MoequantError(f"--dense-eval-from {self.where}: {len(self.nll_per_window)} windows of "
                                f"{self.tokens} tokens, but this evaluation has {moe_res.n_windows} of {moe_res.tokens}"
                                " (another --eval-tokens?)")
        mean = sum(self.nll_per_window) / self.tokens
        return dataclasses.replace(moe_res, ppl=math.exp(mean), nll_mean=mean,
                                   ci95=bootstrap_ci(self.nll_per_window, moe_res.tokens_per_window),
                                   nll_per_window=list(self.nll_per_window), experts_computed=None,
                                   experts_total=None, experts_per_layer=None)


def read_dense_eval(path: Path, source: str, data: str, max_tokens: int | None) -> DenseEval:
    """The dense evaluation of the carved build at ``path`` (a directory with ``training.json``, or the file), refused
    with a one-line error unless it scored ``source`` on ``data`` with the same ``--eval-tokens`` (where recorded:
    builds before that field say nothing, and the windows are checked after scoring)."""
    from moequant.fsutil import read_json_object

    f = path / "training.json" if path.is_dir() else path
    where = str(f)
    prov = read_json_object(f)
    if prov is None:
        raise MoequantError(f"--dense-eval-from {path}: no readable training.json of a carved build there")
    ev = prov.get("eval")
    nll = ev.get("nll_per_window_dense") if isinstance(ev, dict) else None
    if not isinstance(nll, list) or not nll or not all(isinstance(v, (int, float)) for v in nll):
        raise MoequantError(f"--dense-eval-from {where}: no dense evaluation in it (key eval.nll_per_window_dense)")
    if prov.get("source") != source:
        raise MoequantError(f"--dense-eval-from {where}: carved from {prov.get('source')!r}, not {source!r}")
    if ev.get("data") != data:
        raise MoequantError(f"--dense-eval-from {where}: scored {ev.get('data')!r}, not {data!r}")
    if "max_tokens" in ev and ev["max_tokens"] != max_tokens:
        raise MoequantError(f"--dense-eval-from {where}: scored with --eval-tokens {ev['max_tokens']}, this build "
                            f"with {max_tokens}: another --eval-tokens, not the same windows")
    try:
        return DenseEval(where=where, parameters=int(prov["parameters"]["dense"]), tokens=int(ev["tokens"]),
                         nll_per_window=[float(v) for v in nll])
    except (KeyError, TypeError, ValueError):
        raise MoequantError(f"--dense-eval-from {where}: not a carved build's training.json (parameters.dense, "
                            "eval.tokens)") from None


def evaluate_pair(dense: nn.Module, moe: nn.Module, tok: Any, max_tokens: int | None, progress: bool,
                  data: str = "ptb", base: tuple[Any, float] | None = None, reused: DenseEval | None = None,
                  keeper: "BuildProgress | None" = None, name: str = "moe") -> dict[str, Any]:
    """Perplexity of both models on the same windows of ``data`` (test split), the paired ratio CI, and
    the carved model's routing statistics. ``base``: the dense model's (result, seconds) already scored;
    ``reused``: its losses from an earlier build (then ``seconds_dense`` is None and ``dense_eval_from`` names it).
    ``keeper``: the build's progress, where the scores are kept batch by batch (the carved model's as ``name``)."""
    from moequant.eval.bootstrap import paired_ppl
    from moequant.zoo.corpora import load_text, tokenize_corpus

    ids = tokenize_corpus(tok, load_text(data, "test"))
    if keeper is not None:
        keeper.check_tokens("eval_tokens", ids)
    if base is None and reused is None:
        b, b_s, _ = _score(dense, ids, max_tokens, tok.bos_token_id, progress,
                           keep=keeper.score("dense") if keeper is not None else None)
        base = (b, b_s)
    res, r_s, routing = _score(moe, ids, max_tokens, tok.bos_token_id, progress, routing=True,
                               keep=keeper.score(name) if keeper is not None else None)
    if base is None:
        base = (reused.result(res), None)
    b, b_s = base
    d = paired_ppl(res.nll_per_window, res.tokens_per_window, b.nll_per_window, b.tokens_per_window)
    return {"data": data, "split": "test", "max_tokens": max_tokens, "tokens": res.tokens, "n_windows": res.n_windows,
            "ppl_dense": b.ppl, "ppl_moe": res.ppl, "ratio": res.ppl / b.ppl, "ratio_ci95": list(d.ratio_ci),
            "seconds_dense": b_s, "seconds_moe": r_s, "routing": routing,
            "nll_per_window_dense": b.nll_per_window, "nll_per_window_moe": res.nll_per_window,
            **({} if reused is None else {"dense_eval_from": reused.where}), "_base": base}
