"""Which intermediate neurons of a dense gated MLP go to which expert: pure functions.

A dense MLP ``y = D (act(G x) ⊙ (U x))`` with ``G, U [I, H]`` and ``D [H, I]`` is a sum over its ``I``
neurons, ``y = Σ_j D[:, j] a_j(x)``: any partition of the neurons into groups splits ``y`` exactly into
the groups' partial sums. Carving therefore needs only (1) which neurons every token needs — the
*shared* set — and (2) which neurons tend to be needed together — the routed experts.

- ``contributions``: ``c[t, j] = |a_j(x_t)| · ‖D[:, j]‖``, the size of neuron ``j``'s term in token
  ``t``'s output (the activation alone ignores how much the down projection amplifies it).
- ``activation_markers``: ``m[t, j] = 1`` when neuron ``j`` is among the ``k`` largest contributions
  of token ``t`` (``k`` = the neurons a token will be given in the MoE); the *activation rate* of a
  neuron is its mean marker. The most often needed neurons become the shared expert (as in CMoE).
- ``balanced_kmeans``: the remaining neurons, each described by its marker pattern over tokens, are
  clustered into ``E`` groups of exactly equal size (k-means whose assignment step fills every cluster
  to the same capacity, greedily by distance), so that neurons that fire on the same tokens share an
  expert and a router can pick them together.
"""

from __future__ import annotations

import torch


def neuron_activations(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act) -> torch.Tensor:
    """``a = act(x Gᵀ) ⊙ (x Uᵀ)`` for ``x [T, H]``, ``gate``/``up [I, H]`` -> ``[T, I]``."""
    return act(x @ gate.T) * (x @ up.T)


def contributions(a: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``|a[t, j]| · ‖down[:, j]‖`` for ``a [T, I]``, ``down [H, I]`` -> ``[T, I]``."""
    return a.abs() * down.norm(dim=0)[None, :]


def activation_markers(contrib: torch.Tensor, k: int) -> torch.Tensor:
    """``[T, I]`` bool: the ``k`` largest contributions of each token (row)."""
    k = max(1, min(k, contrib.shape[1]))
    idx = contrib.topk(k, dim=1).indices  # [T, k]
    return torch.zeros_like(contrib, dtype=torch.bool).scatter_(1, idx, True)


def split_shared(rate: torch.Tensor, n_shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared neuron indices, routed neuron indices), both sorted: the ``n_shared`` neurons with the
    highest activation ``rate [I]`` are shared (ties broken by index, so the split is deterministic)."""
    order = sorted(range(rate.numel()), key=lambda j: (-float(rate[j]), j))
    shared = torch.tensor(sorted(order[:n_shared]), dtype=torch.long)
    routed = torch.tensor(sorted(order[n_shared:]), dtype=torch.long)
    return shared, routed


def _sq_dist(f: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[n, k]`` between rows of ``f [n, d]`` and ``c [k, d]``."""
    return ((f * f).sum(1)[:, None] - 2 * f @ c.T + (c * c).sum(1)[None, :]).clamp_min(0)


def balanced_assign(dist: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each of ``n`` points to one of ``k`` clusters (``dist [n, k]``), every cluster receiving exactly
    ``capacity = n / k`` points: the (point, cluster) pairs are visited from the closest and a pair is
    taken while its point is free and its cluster not full. -> ``[n]`` cluster ids."""
    n, k = dist.shape
    if n != k * capacity:
        raise ValueError(f"{n} points do not fill {k} clusters of {capacity}")
    order = torch.argsort(dist.reshape(-1), stable=True).tolist()
    label = [-1] * n
    fill = [0] * k
    left = n
    for flat in order:
        i, c = divmod(flat, k)
        if label[i] < 0 and fill[c] < capacity:
            label[i] = c
            fill[c] += 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(label, dtype=torch.long)


def balanced_kmeans(features: torch.Tensor, k: int, *, seed: int = 0, iters: int = 30) -> torch.Tensor:
    """Cluster the rows of ``features [n, d]`` into ``k`` equal-size groups (``n % k == 0``).

    k-means++ seeding from a generator seeded with ``seed``; then alternate the balanced assignment
    (``balanced_assign``) and centroid updates until the labels stop changing or ``iters`` rounds.
    -> ``[n]`` labels in ``[0, k)``."""
    n = features.shape[0]
    if k < 1 or n % k:
        raise ValueError(f"{n} neurons cannot be split into {k} equal experts")
    f = features.to(torch.float32)
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    centers = [int(torch.randint(0, n, (1,), generator=g))]
    d2 = _sq_dist(f, f[centers[0]][None])[:, 0]  # [n]
    for _ in range(1, k):
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / n)
        nxt = int(torch.multinomial(p, 1, generator=g))
        centers.append(nxt)
        d2 = torch.minimum(d2, _sq_dist(f, f[nxt][None])[:, 0])
    c = f[centers].clone()  # [k, d]
    labels = balanced_assign(_sq_dist(f, c), n // k)
    for _ in range(iters):
        c = torch.stack([f[labels == j].mean(0) for j in range(k)])
        new = balanced_assign(_sq_dist(f, c), n // k)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def experts_from_labels(routed: torch.Tensor, labels: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Neuron indices of each expert (sorted): ``routed[labels == e]`` for ``e < k``."""
    return [routed[labels == e].sort().values for e in range(k)]
