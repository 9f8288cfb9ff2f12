"""Fit one carved MoE block to the dense MLP it replaces, on captured MLP inputs ``x [T, H]`` and dense
outputs ``y [T, H]``; the loss is the relative error ``Σ‖block(x) − y‖² / Σ‖y‖²``.

1. ``init_router``: a least-squares linear router. For every token the *oracle* score of expert ``e``
   is the size of its partial sum, ``log ‖P_e(x)‖`` (centred over experts): the experts that carry most
   of the token's output. The router ``R [E, H]`` is the ridge regression of those scores on ``x``,
   rescaled so its logits have unit spread over experts.
2. ``refine_router``: Adam on the router (and Qwen2-MoE's shared-expert gate) through the block's own
   forward — the architecture's softmax, top-k and renormalisation, as transformers computes them —
   with the experts frozen. The gradient reaches the router through the selected experts' weights.
   ``balance > 0`` adds the Switch Transformer's load-balancing loss ``balance · E · Σ_e f_e P_e`` (``f_e``:
   expert ``e``'s share of the batch's top-k slots, ``P_e``: its mean router probability; 1 when uniform),
   which pushes probability away from overloaded experts.
3. ``refit_down``: with the routing fixed, the block's output is linear in its down projections:
   ``y ≈ Σ_j D[:, j] φ_j(x)`` with ``φ_j = w_e(x)·a_j(x)`` for a neuron of routed expert ``e`` (``0`` when
   ``e`` is not selected), ``σ(g·x)·a_j(x)`` for a Qwen2-MoE shared neuron and ``a_j(x)`` for a shared
   neuron replicated in every expert (the renormalised weights sum to 1). One ridge regression over
   all ``I`` columns (regularised towards the current ``D``) lets the selected experts absorb what the
   unselected ones would have added.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from moequant.zoo.carve.neurons import neuron_activations
from moequant.zoo.carve.targets import CarvedMLP, TargetArch

log = logging.getLogger(__name__)

ROUTER_INITS = ("oracle-ls", "zero")


def block_out(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` for ``x [T, H]`` -> ``[T, H]`` (blocks take ``[B, L, H]``; some return a tuple)."""
    out = block(x[None])
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(x.shape)


def relative_error(block: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096, limit: int = 8192) -> float:
    """``Σ‖block(x) − y‖² / Σ‖y‖²`` over the first ``limit`` tokens (a fixed subset: the stages compare alike)."""
    x, y = x[:limit], y[:limit]
    num = den = 0.0
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            out = block_out(block, x[s:s + chunk])
            num += float(((out - y[s:s + chunk]) ** 2).sum())
            den += float((y[s:s + chunk] ** 2).sum())
    return num / max(den, 1e-30)


def routing_matrix(block: nn.Module, x: torch.Tensor, experts: int) -> torch.Tensor:
    """Routing weights as a dense ``[T, E]`` matrix (zero for unselected experts), from the block's gate."""
    _, w, idx = block.gate(x)
    return torch.zeros(x.shape[0], experts, dtype=x.dtype).scatter_(1, idx, w.to(x.dtype))


def oracle_scores(carved: CarvedMLP, act, xb: torch.Tensor) -> torch.Tensor:
    """``log ‖P_e(x)‖`` of every routed expert's partial sum for tokens ``xb [t, H]`` -> ``[t, E]``."""
    a = neuron_activations(xb, carved.gate, carved.up, act)  # [t, I]
    norms = torch.stack([(a[:, idx] @ carved.down[:, idx].T).norm(dim=1) for idx in carved.experts], 1)
    return torch.log(norms + 1e-6)


def init_router(block: nn.Module, carved: CarvedMLP, act, x: torch.Tensor, ridge: float = 1e-3,
                chunk: int = 4096) -> None:
    """Set ``block.gate.weight`` to the least-squares router of the oracle scores (see module doc)."""
    h = x.shape[1]
    xtx = torch.zeros(h, h, dtype=torch.float64)
    xtz = torch.zeros(h, len(carved.experts), dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            xb = x[s:s + chunk]
            z = oracle_scores(carved, act, xb)
            z = z - z.mean(1, keepdim=True)  # [t, E]
            xtx += (xb.T @ xb).double()
            xtz += (xb.T @ z).double()
        lam = ridge * float(torch.diagonal(xtx).mean()) + 1e-12
        r = torch.linalg.solve(xtx + lam * torch.eye(h, dtype=torch.float64), xtz).T  # [E, H]
        logits = x[: min(x.shape[0], 8192)].double() @ r.T
        spread = float(logits.std(1).mean())
        block.gate.weight.copy_((r / max(spread, 1e-12)).to(block.gate.weight.dtype))


def _trainable_router(block: nn.Module) -> list[nn.Parameter]:
    params = [block.gate.weight]
    if hasattr(block, "shared_expert_gate"):
        params.append(block.shared_expert_gate.weight)
    return params


def balance_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The Switch Transformer load-balancing loss ``E · Σ_e f_e P_e`` of router logits ``[t, E]``: ``f_e`` is expert
    ``e``'s share of the ``t · top_k`` selected slots (no gradient), ``P_e`` its mean softmax probability. It is 1
    when both are uniform and ``E / top_k`` at most (every token's probability on the same ``top_k`` experts)."""
    probs = torch.softmax(logits.float(), -1)  # [t, E]
    idx = probs.topk(top_k, -1).indices
    frac = torch.zeros(probs.shape[1]).scatter_add_(0, idx.flatten(), torch.ones(idx.numel())) / idx.numel()
    return probs.shape[1] * (frac * probs.mean(0)).sum()


def refine_router(block: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float = 3e-3,
                  batch: int = 2048, seed: int = 0, balance: float = 0.0) -> None:
    """``steps`` Adam steps on the router through the block's forward, minibatches of ``batch`` tokens
    drawn with a generator seeded by ``seed``; every other parameter frozen. ``balance``: the weight of
    ``balance_loss`` added to the relative error."""
    if steps <= 0:
        return
    params = _trainable_router(block)
    frozen = [p for p in block.parameters() if all(p is not q for q in params)]
    states = [p.requires_grad for p in block.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    den = (y ** 2).sum(1).mean()
    try:
        for _ in range(steps):
            i = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=g)
            loss = ((block_out(block, x[i]) - y[i]) ** 2).sum(1).mean() / den
            if balance:
                loss = loss + balance * balance_loss(block.gate(x[i])[0], block.gate.top_k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p, s in zip(block.parameters(), states):
            p.requires_grad_(s)
            p.grad = None


def refit_down(block: nn.Module, carved: CarvedMLP, target: TargetArch, act, x: torch.Tensor, y: torch.Tensor,
               *, ridge: float = 1e-4, chunk: int = 4096) -> None:
    """Least-squares down projections for the block's current routing (see module doc)."""
    sh = carved.shared
    n_s, n_e, e_count = sh.numel(), carved.experts[0].numel(), len(carved.experts)
    order = torch.cat([sh, *carved.experts])  # feature j <-> dense neuron order[j]
    i_all = order.numel()
    expert_of = torch.cat([torch.full((n_s,), -1), torch.arange(e_count).repeat_interleave(n_e)])  # [I]
    gtg = torch.zeros(i_all, i_all, dtype=torch.float64)
    gty = torch.zeros(i_all, y.shape[1], dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            xb, yb = x[s:s + chunk], y[s:s + chunk]
            a = neuron_activations(xb, carved.gate[order], carved.up[order], act)  # [t, I] in feature order
            w = routing_matrix(block, xb, e_count)  # [t, E]
            scale = torch.ones_like(a)
            scale[:, n_s:] = w[:, expert_of[n_s:]]
            if target.shared_expert and n_s:
                scale[:, :n_s] = torch.sigmoid(block.shared_expert_gate(xb))  # [t, 1]
            phi = a * scale  # [t, I]: float32 products per chunk, accumulated in float64
            gtg += (phi.T @ phi).double()
            gty += (phi.T @ yb).double()
        d0 = _current_down(block, target, n_s, n_e).double()  # [H, I]
        lam = ridge * float(torch.diagonal(gtg).mean()) + 1e-12
        d = torch.linalg.solve(gtg + lam * torch.eye(i_all, dtype=torch.float64), gty + lam * d0.T).T  # [H, I]
        _set_down(block, target, n_s, n_e, d.to(block.experts.down_proj.dtype))


def _current_down(block: nn.Module, target: TargetArch, n_s: int, n_e: int) -> torch.Tensor:
    dp = block.experts.down_proj  # [E, H, I_e (+ n_s replicated first)]
    routed = torch.cat([dp[e, :, dp.shape[2] - n_e:] for e in range(dp.shape[0])], 1)  # [H, E*n_e]
    if not n_s:
        return routed
    shared = block.shared_expert.down_proj.weight if target.shared_expert else dp[0, :, :n_s]
    return torch.cat([shared, routed], 1)


def _set_down(block: nn.Module, target: TargetArch, n_s: int, n_e: int, d: torch.Tensor) -> None:
    dp = block.experts.down_proj
    for e in range(dp.shape[0]):
        dp[e, :, dp.shape[2] - n_e:] = d[:, n_s + e * n_e: n_s + (e + 1) * n_e]
        if n_s and not target.shared_expert:
            dp[e, :, :n_s] = d[:, :n_s]
    if n_s and target.shared_expert:
        block.shared_expert.down_proj.weight.copy_(d[:, :n_s])


@dataclass
class FitSettings:
    """How hard each layer is fitted: router Adam steps (0: keep the least-squares router), whether the
    down projections are refitted, and how many (router, down) rounds."""

    router_init: str = "oracle-ls"  # ROUTER_INITS; "zero": uniform weights (exact at top-k = E)
    router_steps: int = 150
    balance: float = 0.0  # weight of the load-balancing loss in the router refinement
    refit_down: bool = True
    rounds: int = 1
    seed: int = 0


def fit_stages(errors: dict[str, float]) -> list[str]:
    """``fit_block``'s error keys in the order its stages ran: ``zero_router``, ``router_init``, then per round
    ``router_fit_r`` before ``down_refit_r``. Result JSONs are written with sorted keys, so the dict's own order
    is not the fit's (its last key there is ``zero_router``)."""
    def order(name: str) -> tuple[int, int, int]:
        if name in ("zero_router", "router_init"):
            return (0 if name == "zero_router" else 1, 0, 0)
        stage, _, r = name.rpartition("_")
        if stage not in ("router_fit", "down_refit") or not r.isdigit():
            raise ValueError(f"not a fit stage: {name!r}")
        return (2, int(r), 0 if stage == "router_fit" else 1)

    return sorted(errors, key=order)


def final_error(errors: dict[str, float]) -> tuple[str, float]:
    """(the last stage that ran, its relative MLP error) of ``fit_block``'s errors, in any key order."""
    last = fit_stages(errors)[-1]
    return last, errors[last]


def fit_block(block: nn.Module, carved: CarvedMLP, target: TargetArch, act, x: torch.Tensor, y: torch.Tensor,
              settings: FitSettings) -> dict[str, float]:
    """Router init, then ``rounds`` of (router refinement, down refit). -> relative errors per stage."""
    errors = {"zero_router": relative_error(block, x, y)}  # ties: the first k experts, weights 1/k
    if settings.router_init == "oracle-ls":
        init_router(block, carved, act, x)
        errors["router_init"] = relative_error(block, x, y)
    elif settings.router_init != "zero":
        raise ValueError(f"router_init must be one of {', '.join(ROUTER_INITS)}, got {settings.router_init!r}")
    for r in range(settings.rounds):
        if settings.router_steps:
            refine_router(block, x, y, steps=settings.router_steps, seed=settings.seed + r, balance=settings.balance)
            errors[f"router_fit_{r}"] = relative_error(block, x, y)
        if settings.refit_down:
            with torch.no_grad():
                refit_down(block, carved, target, act, x, y)
            errors[f"down_refit_{r}"] = relative_error(block, x, y)
    return errors
