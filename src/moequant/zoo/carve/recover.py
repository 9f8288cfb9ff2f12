"""A short end-to-end distillation of a carved MoE towards the dense model it came from.

The loss is the token-mean KL divergence ``KL(p_dense ‖ p_moe)`` of the next-token distributions on
calibration windows (the dense model is the teacher; no labels). Only small parameter groups train:
``routers`` (every ``mlp.gate.weight`` and Qwen2-MoE's ``shared_expert_gate``), ``norms`` (every RMSNorm
weight, including the q/k norms OLMoE and Qwen3-MoE add) and optionally ``experts`` (the fused expert
tensors and the shared expert). AdamW after a short linear warm-up, then a constant learning rate or a
cosine decay to zero (``schedule``). The batches follow ``order``: ``epochs`` (the default) deals the windows
out without replacement, one seeded permutation per pass, so 250 steps of 4 over 1,024 windows see 1,000
distinct ones; ``replacement`` (the builds before 2026-12-05) draws each batch independently, which sees only
about 63% of them and some twice. Both are seeded by ``seed``: the same inputs give the same weights.

The windows come from ``samples`` fresh training-text windows of ``seqlen`` tokens (``samples > 0``; drawn
by the caller with a seed of its own, so they differ from the carving's calibration windows) or, with
``samples = 0`` (the first builds' setting), from the first ``seqlen`` tokens of each calibration window —
64 distinct windows seen ~16 times each by 250 steps of 4, which a model with 80M trainable parameters
can learn by heart.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from moequant.errors import MoequantError

if TYPE_CHECKING:
    from moequant.zoo.carve.progress import BuildProgress

log = logging.getLogger(__name__)

GROUPS = ("routers", "norms", "experts")
SCHEDULES = ("constant", "cosine")
ORDERS = ("epochs", "replacement")


@dataclass(frozen=True)
class RecoverSettings:
    steps: int = 0
    batch: int = 4
    seqlen: int = 256
    lr: float = 1e-3
    experts_lr: float = 2e-5
    params: tuple[str, ...] = ("routers", "norms")
    seed: int = 0
    samples: int = 0  # distinct distillation windows (0: the calibration windows' starts)
    schedule: str = "constant"
    order: str = "epochs"  # ORDERS: how the batches are drawn from the windows

    def __post_init__(self) -> None:
        bad = [p for p in self.params if p not in GROUPS]
        if bad:
            raise ValueError(f"--recover-params: unknown group(s) {', '.join(bad)} (choose from {', '.join(GROUPS)})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--recover-schedule {self.schedule!r}: choose from {', '.join(SCHEDULES)}")
        if self.order not in ORDERS:
            raise ValueError(f"recovery order {self.order!r}: choose from {', '.join(ORDERS)}")
        if self.samples < 0:
            raise ValueError(f"--recover-samples must be >= 0, got {self.samples}")


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``steps``: a linear warm-up over the
    first 5% of the steps, then 1 (``constant``) or a half cosine from 1 down to 0 at the last step."""
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant" or steps <= warm + 1:
        return 1.0
    t = (step - warm) / (steps - warm - 1)  # 0 at the end of the warm-up, 1 at the last step
    return 0.5 * (1.0 + math.cos(math.pi * t))


def epoch_batch(step: int, batch: int, count: int, seed: int) -> torch.Tensor:
    """The window indices ``[batch]`` of ``step`` when ``count`` windows are dealt out without replacement: draw
    ``j`` (``step · batch ≤ j < (step + 1) · batch``) is entry ``j mod count`` of pass ``j // count``'s permutation,
    seeded by ``(seed, pass)``. A pure function of its arguments, so a resumed run needs no generator state."""
    first = step * batch
    perms: dict[int, torch.Tensor] = {}
    out = torch.empty(batch, dtype=torch.long)
    for i in range(batch):
        e, j = divmod(first + i, count)
        if e not in perms:
            perms[e] = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
        out[i] = perms[e][j]
    return out


def parameter_groups(model: nn.Module, groups: tuple[str, ...]) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters of each group, by name pattern."""
    out: dict[str, list[nn.Parameter]] = {g: [] for g in groups}
    for name, p in model.named_parameters():
        if "routers" in groups and (name.endswith("mlp.gate.weight") or "shared_expert_gate" in name):
            out["routers"].append(p)
        elif "norms" in groups and "norm" in name.rsplit(".", 2)[-2]:
            out["norms"].append(p)
        elif "experts" in groups and (".mlp.experts." in name or ".mlp.shared_expert." in name):
            out["experts"].append(p)
    return out


@dataclass
class RecoverResult:
    steps: int
    seconds: float
    kl_first: float
    kl_last: float  # mean of the last 10% of steps
    trained_parameters: int
    history: list[float] = field(default_factory=list)


def distill(student: nn.Module, teacher: nn.Module, tokens: torch.Tensor, settings: RecoverSettings,
            progress: bool = True, keeper: "BuildProgress | None" = None) -> RecoverResult:
    """Train ``student``'s chosen groups for ``settings.steps`` on windows cut from ``tokens [S, L]``. ``keeper``:
    the build's progress; an interrupted distillation continues from its stored state (trained tensors, AdamW's
    state, the batch generator, the losses: the same weights as an uninterrupted run), and the state is stored
    every ``keeper.save_seconds`` and after the last step."""
    from tqdm.auto import tqdm

    if tokens.shape[1] < settings.seqlen:
        raise MoequantError(f"recovery windows of {settings.seqlen} tokens do not fit calibration windows of "
                            f"{tokens.shape[1]}")
    windows = tokens[:, : settings.seqlen]  # [S, l]: each calibration window's start (keeps its BOS)
    groups = parameter_groups(student, settings.params)
    for p in student.parameters():
        p.requires_grad_(False)
    opt_groups = []
    for name, ps in groups.items():
        for p in ps:
            p.requires_grad_(True)
        if ps:
            opt_groups.append({"params": ps, "lr": settings.experts_lr if name == "experts" else settings.lr})
    n_train = sum(p.numel() for ps in groups.values() for p in ps)
    if not opt_groups:
        raise MoequantError(f"--recover-params {','.join(settings.params)}: nothing to train in this model")
    opt = torch.optim.AdamW(opt_groups, weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    g = torch.Generator().manual_seed(settings.seed)
    teacher.eval()
    student.train()
    hist: list[float] = []
    trained = {n: p for n, p in student.named_parameters() if p.requires_grad}
    start, before = 0, 0.0
    stored = keeper.load_recover() if keeper is not None else None
    if stored is not None:
        start, before, hist = _restore(stored, trained, opt, g, settings.steps)
        log.info("--resume: the distillation continues from step %d of %d", start, settings.steps)
    t0 = last_save = time.perf_counter()
    try:
        for step in tqdm(range(start, settings.steps), desc="recover", unit="step", disable=not progress,
                         initial=start, total=settings.steps):
            if settings.order == "epochs":
                idx = epoch_batch(step, settings.batch, windows.shape[0], settings.seed)
            else:
                idx = torch.randint(0, windows.shape[0], (settings.batch,), generator=g)
            ids = windows[idx]  # [b, l]
            with torch.no_grad():
                t_logp = F.log_softmax(teacher(ids, use_cache=False).logits.float(), -1)  # [b, l, V]
            s_logp = F.log_softmax(student(ids, use_cache=False).logits.float(), -1)
            loss = F.kl_div(s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean")
            f = lr_factor(step, settings.steps, settings.schedule)
            for pg, lr in zip(opt.param_groups, base_lrs):
                pg["lr"] = lr * f
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hist.append(float(loss.detach()))
            del t_logp, s_logp, loss
            now = time.perf_counter()
            if keeper is not None and (now - last_save >= keeper.save_seconds or step + 1 == settings.steps):
                keeper.save_recover({"step": step + 1, "seconds": before + now - t0, "history": list(hist),
                                     "generator": g.get_state(), "optimizer": opt.state_dict(),
                                     "trained": {n: p.detach().clone() for n, p in trained.items()}})
                last_save = now
    finally:
        student.eval()
        for p in student.parameters():
            p.requires_grad_(False)
            p.grad = None
    tail = hist[-max(1, len(hist) // 10):] if hist else [float("nan")]
    return RecoverResult(steps=settings.steps, seconds=round(before + time.perf_counter() - t0, 1),
                         kl_first=hist[0] if hist else float("nan"), kl_last=sum(tail) / len(tail),
                         trained_parameters=n_train, history=[round(h, 5) for h in hist])


def _restore(stored: dict[str, Any], trained: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
             g: torch.Generator, steps: int) -> tuple[int, float, list[float]]:
    """Put a stored distillation state back (``distill``'s ``keeper``): (next step, seconds so far, losses)."""
    try:
        if sorted(stored["trained"]) != sorted(trained) or stored["step"] > steps or \
                any(stored["trained"][n].shape != p.shape for n, p in trained.items()):
            raise ValueError("other trained tensors or steps")
        with torch.no_grad():
            for n, p in trained.items():
                p.copy_(stored["trained"][n])
        opt.load_state_dict(stored["optimizer"])
        g.set_state(stored["generator"])
        return int(stored["step"]), float(stored["seconds"]), [float(v) for v in stored["history"]]
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise MoequantError(f"the stored distillation state does not fit this build ({e}); remove the build's "
                            "progress directory to start over") from None
