"""PV-tuning (Malinovskii et al. 2024) for additive codes: the math of one P-step and one V-step, pure torch.

After the layer-wise pass a quantized weight has *continuous* parameters (codebooks, row scales; the model's
norms beside them) and *discrete* ones (the codes). PV-tuning alternates:

- **P-step**: the codes fixed, Adam on the continuous parameters against a loss that compares the quantized
  model with the unquantized one (here the token-mean ``KL(p_teacher ‖ p_student)`` of next-token
  distributions, ``kl_loss``; a layer-wise MSE works the same way). ``adam_step`` is one such update of one
  tensor. The step is ``lr`` times the tensor's RMS at the start (``rate_for``), so one learning rate suits
  codebooks (RMS ~1 in the row-normalised space), row scales (~the weights' RMS) and norm weights (~1).
- **V-step**: the straight-through direction. The gradient of the loss in the decoded weight ``Ŵ`` moves a
  continuous target ``T = Ŵ + δ`` by one step (``δ`` carries what the codes could not follow, AQLM's
  straight-through buffer written relative to ``Ŵ`` so it follows the P-steps). The step is AQLM's published
  code optimiser: Adam without momentum (β = (0, 0.95), ``V_BETAS``) scaled layer-wise as LAMB does, so that its
  RMS over the tensor is exactly ``rate`` (``code_lr`` times the weight's RMS): the target of every tensor moves
  the same relative distance per step, whatever the size of its gradients. Then the codes are re-chosen
  towards ``T`` under the current codebooks and scales (``v_step``): each group's codes by coordinate descent,
  one codebook at a time, to the nearest codeword of what the others leave. At most ``max_fraction`` of all
  codes may change per V-step: the groups whose squared error to ``T`` falls the most go first. Groups are
  independent under this objective (the row scale is fixed), and a group only changes when its error falls,
  so a V-step never increases ``‖Ŵ − T‖²``.

Shapes: a tensor of ``E`` matrices ``[E, N, K]`` (``E = 1`` for a plain linear) with ``G = K/g`` groups of
``g`` weights per row, codes ``[E, N, G, M]``, codebooks ``[M, C, g]`` (one set) or ``[E, M, C, g]``, scales
``[E, N]`` (``codecs.additive``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moequant.codecs.additive import assign, decode_groups

BETAS = (0.9, 0.999)
V_BETAS = (0.0, 0.95)  # the straight-through target's Adam: AQLM's PV recipe (code_beta1 0, code_beta2 0.95)
EPS = 1e-8


# ---------------------------------------------------------------- P-step


@dataclass
class AdamState:
    """First and second moments of one tensor and the number of steps taken."""

    m: torch.Tensor
    v: torch.Tensor
    t: int = 0

    @classmethod
    def zeros_like(cls, p: torch.Tensor) -> "AdamState":
        return cls(torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32))


def rms(p: torch.Tensor) -> float:
    """The root mean square of ``p``'s entries (0 for an empty tensor)."""
    return float(p.detach().to(torch.float32).pow(2).mean().sqrt()) if p.numel() else 0.0


def rate_for(p: torch.Tensor, lr: float) -> float:
    """The step size of a tensor: ``lr`` times its RMS (a tensor of zeros gets ``lr`` itself)."""
    r = rms(p)
    return lr * (r if r > 0 else 1.0)


def adam_direction(grad: torch.Tensor, state: AdamState, betas: tuple[float, float] = BETAS) -> torch.Tensor:
    """Advance ``state`` by ``grad`` (in place) and return the bias-corrected Adam direction ``m̂ / (√v̂ + ε)``."""
    b1, b2 = betas
    g = grad.to(torch.float32)
    state.t += 1
    state.m.mul_(b1).add_(g, alpha=1 - b1)
    state.v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (state.v / (1 - b2 ** state.t)).sqrt_().add_(EPS)
    return state.m / (1 - b1 ** state.t) / denom


def adam_step(p: torch.Tensor, grad: torch.Tensor, state: AdamState, rate: float) -> torch.Tensor:
    """One P-step on one tensor: ``p − rate · m̂ / (√v̂ + ε)`` (a new tensor; ``state`` advances in place)."""
    return p.detach().to(torch.float32) - rate * adam_direction(grad, state)


def kl_loss(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Token-mean ``KL(p_teacher ‖ p_student)``: logits ``[B, L, V]``, teacher log-probabilities ``[B, L, V]``."""
    s = F.log_softmax(student_logits.float(), -1).flatten(0, 1)  # [B·L, V]
    return F.kl_div(s, teacher_logp.flatten(0, 1), log_target=True, reduction="batchmean")


# ---------------------------------------------------------------- V-step


def st_target(w_hat: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, state: AdamState, rate: float
              ) -> torch.Tensor:
    """The straight-through target ``T = Ŵ + δ − rate · u / RMS(u)`` ``[*shape]``, ``u`` the momentum-free Adam
    direction of ``∂L/∂Ŵ`` (``V_BETAS``; ``state`` advances): a step whose RMS is ``rate`` (none where u = 0)."""
    u = adam_direction(grad, state, V_BETAS)
    size = rms(u)
    step = u * (rate / size) if size > 0 else u
    return w_hat.detach().to(torch.float32) + delta - step


def _parts(codes: torch.Tensor, books: torch.Tensor, m: int) -> torch.Tensor:
    """Codebook ``m``'s codewords of every group: codes ``[E, N, G, M]``, books float32 ``[M, C, g]`` or
    ``[E, M, C, g]`` -> ``[E, N, G, g]``."""
    return decode_groups(codes[..., m:m + 1], books[..., m:m + 1, :, :])


def _total(parts: list[torch.Tensor]) -> torch.Tensor:
    """``Σ_m parts[m]`` added in the order m = 0 .. M-1, as ``decode_groups`` adds them (the same bits)."""
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out


def _nearest(target: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Nearest codeword in squared distance: target ``[P, g]``, codebook ``[C, g]`` -> ``[P]`` (``assign`` under
    the identity metric, chunked there)."""
    g = target.shape[-1]
    return assign(target[None, None], torch.eye(g)[None, None], codebook)[0, 0]


def _search(rest: torch.Tensor, books_m: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Nearest codeword of codebook m to each row of ``rest [D, g]``: books_m ``[C, g]`` (one set) or ``[E, C, g]``
    with ``expert [D]`` the expert of each row -> codes ``[D]``."""
    if books_m.dim() == 2:
        return _nearest(rest, books_m)
    out = torch.empty(rest.shape[0], dtype=torch.int64)
    for i in range(books_m.shape[0]):
        rows = torch.nonzero(expert == i).reshape(-1)
        if rows.numel():
            out[rows] = _nearest(rest[rows], books_m[i])
    return out


def coordinate_descent(y: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, sweeps: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes re-chosen one codebook at a time as the nearest codeword to what the others leave of ``y``.

    y ``[E, N, G, g]`` (row-normalised targets), codes ``[E, N, G, M]``, codebooks ``[M, C, g]`` or
    ``[E, M, C, g]`` -> (codes ``[E, N, G, M]``, the start's decoded groups and the result's ``[E, N, G, g]``,
    each equal to ``decode_groups`` of its codes).

    Each codebook's codewords are gathered once, then only where its codes change. A sweep after the first
    searches only the groups whose codes changed in the sweep before: a group that did not change meets the same
    remainders, to the bit, as it did then, so it would choose the same codes again (in PV-tuning almost every
    group, so the second sweep costs next to nothing)."""
    e, n, G, m_count = codes.shape
    g = y.shape[-1]
    books = codebooks.to(torch.float32)
    out = codes.reshape(e, n * G, m_count).clone()  # [E, P, M]
    ys = y.reshape(e, n * G, g)  # [E, P, g]
    parts = [_parts(out, books, m) for m in range(m_count)]  # M x [E, P, g]
    start = _total(parts)
    active: torch.Tensor | None = None  # [D, 2] (expert, group) searched in this sweep; None: every group
    for _ in range(sweeps):
        before = out.clone()
        for m in range(m_count):
            books_m = books[m] if books.dim() == 3 else books[:, m]  # [C, g] or [E, C, g]
            if active is None:
                rest = ys - (_total(parts) - parts[m])  # [E, P, g]: what codebook m should cover
                if books.dim() == 3:
                    out[..., m] = _nearest(rest.reshape(-1, g), books_m).reshape(e, n * G)
                else:
                    for i in range(e):
                        out[i, :, m] = _nearest(rest[i], books_m[i])
                parts[m] = _parts(out, books, m)
                continue
            ei, pi = active[:, 0], active[:, 1]  # [D] each
            rest = ys[ei, pi] - (_total([p[ei, pi] for p in parts]) - parts[m][ei, pi])  # [D, g]
            got = _search(rest, books_m, ei)  # [D]
            out[ei, pi, m] = got
            parts[m][ei, pi] = books_m[got] if books.dim() == 3 else books_m[ei, got]
        active = torch.nonzero((out != before).any(-1))  # [D, 2]
        if active.shape[0] == 0:
            break
    return out.reshape(codes.shape), start.reshape(y.shape), _total(parts).reshape(y.shape)


def v_step(target: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor,
           max_fraction: float, sweeps: int = 2) -> tuple[torch.Tensor, float]:
    """One V-step: codes moved towards ``target`` with at most ``max_fraction`` of them changed.

    target ``[E, N, K]``, codes ``[E, N, G, M]``, codebooks ``[M, C, g]`` / ``[E, M, C, g]`` (the values
    decoded, i.e. float16-exact), scale ``[E, N]`` -> (codes ``[E, N, G, M]``, fraction of codes changed).
    Candidates come from ``coordinate_descent``; a group adopts its candidate only if its error
    ``s² ‖ŷ − target/s‖²`` strictly falls, in order of the largest fall, while the count of changed codes
    stays within ``floor(max_fraction · codes.numel())``."""
    e, n, G, m_count = codes.shape
    g = target.shape[-1] // G
    s = scale.to(torch.float32)  # [E, N]
    safe = torch.where(s == 0, torch.ones_like(s), s)
    y = (target.to(torch.float32) / safe[..., None]).reshape(e, n, G, g)  # [E, N, G, g]
    cand, decoded, decoded_cand = coordinate_descent(y, codes, codebooks, sweeps)  # [E, N, G, M], 2 x [E, N, G, g]
    moved = (cand != codes).sum(-1).reshape(-1)  # [E·N·G] codes that would change per group
    # the error s² ‖ŷ − y‖² of both codes, only where a group's codes differ (elsewhere the fall is exactly 0)
    which = torch.nonzero(moved).reshape(-1)  # [D]
    s2 = s.pow(2).reshape(-1)[which // G]  # [D]: each group's row scale, squared
    y_d, old_d, new_d = (t.reshape(-1, g)[which] for t in (y, decoded, decoded_cand))  # 3 x [D, g]
    gain = ((old_d - y_d).pow(2).sum(-1) * s2 - (new_d - y_d).pow(2).sum(-1) * s2)  # [D]
    budget = int(max_fraction * codes.numel())
    order = torch.argsort(gain, descending=True, stable=True)
    useful = gain[order] > 0
    within = torch.cumsum(moved[which][order] * useful, 0) <= budget
    take = torch.zeros(moved.shape[0], dtype=torch.bool)
    take[which[order]] = useful & within  # the largest falls first, as many as the budget allows
    flat_new, flat_old = cand.reshape(-1, m_count), codes.reshape(-1, m_count)
    out = torch.where(take[:, None], flat_new, flat_old).reshape(codes.shape)
    changed = int((out != codes).sum())
    return out, changed / max(1, codes.numel())
