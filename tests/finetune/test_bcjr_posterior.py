"""The soft trellis (finetune.bcjr) against brute force over every walk, the codec's Viterbi, and gradcheck."""

from __future__ import annotations

import pytest
import torch

from moequant.codecs.config import TrellisConfig
from moequant.codecs.trellis import code_values, viterbi, viterbi_tail_biting
from moequant.finetune.bcjr import (SoftGeometry, chunk_tiles, full_geometry, hard_path, posterior, soft_codeword,
                                    soft_geometry, soft_overlap, sub_states)


def all_walks(L: int, kv: int, steps: int, tail_biting: bool) -> torch.Tensor:
    """Every valid walk as states int64 ``[P, S]``: every bitstream, read ``L`` bits from each ``t·kv``."""
    nbits = steps * kv if tail_biting else L + (steps - 1) * kv
    z = torch.arange(1 << nbits, dtype=torch.int64)  # [P]
    if tail_biting:  # the cyclic stream twice over: every window of L bits is a plain shift
        z, nbits = (z << nbits) | z, 2 * nbits
    t = torch.arange(steps, dtype=torch.int64)
    return (z.unsqueeze(-1) >> (nbits - L - t * kv)) & ((1 << L) - 1)  # [P, S]


def brute_marginals(x: torch.Tensor, table: torch.Tensor, tau: float, walks: torch.Tensor) -> torch.Tensor:
    """``P_t(s)`` ``[S, 2^L]`` of ``x [S, V]`` over ``walks [P, S]`` by enumeration (float64)."""
    vals = table[walks]  # [P, S, V]
    logw = -(vals - x).square().sum((-1, -2)) / tau  # [P]
    w = torch.softmax(logw, 0)
    out = torch.zeros(x.shape[0], table.shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        out[t].index_add_(0, walks[:, t], w)
    return out


def to_full(post: torch.Tensor, idx: torch.Tensor, L: int) -> torch.Tensor:
    """Sub-trellis posterior ``[S, 2^F]`` with its states ``[S, 2^F]`` -> ``[S, 2^L]``."""
    out = torch.zeros(post.shape[0], 1 << L, dtype=post.dtype)
    return out.scatter_add_(1, idx, post)


def case(L: int, v: int, steps: int, b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(1 << L, v, generator=g, dtype=torch.float64)  # [2^L, V]
    return torch.randn(b, steps, v, generator=g, dtype=torch.float64), table  # [B, S, V]


@pytest.mark.parametrize("L,kv,v,steps", [(6, 2, 1, 6), (6, 2, 2, 5), (6, 4, 2, 4), (5, 3, 1, 5)])
@pytest.mark.parametrize("tail_biting", [False, True])
def test_full_posterior_equals_brute_force(L, kv, v, steps, tail_biting):
    x, table = case(L, v, steps)
    geom = full_geometry(L, kv)
    walks = all_walks(L, kv, steps, tail_biting)
    for i in range(x.shape[0]):
        ov = None
        keep = walks
        if tail_biting:
            o = (i * 5 + 1) % (1 << (L - kv))  # condition on an overlap, as the codec's second pass does
            ov = torch.tensor([o])
            keep = walks[(walks[:, 0] >> kv) == o]
            assert keep.shape[0] == 1 << (steps * kv - (L - kv))
        post, idx = posterior(x[i:i + 1], table, 2.5, geom, overlap=ov)
        ref = brute_marginals(x[i], table, 2.5, keep)
        torch.testing.assert_close(to_full(post[0], idx[0], L), ref, atol=1e-12, rtol=0)
        assert ((ref > 1e-3) & (ref < 0.99)).sum() > steps  # a spread posterior: not a vacuous match


@pytest.mark.parametrize("L,kv,free", [(6, 2, (0,)), (6, 2, (1,)), (6, 4, (1, 2)), (7, 3, (0, 2))])
@pytest.mark.parametrize("tail_biting", [False, True])
def test_sub_trellis_posterior_equals_brute_force(L, kv, free, tail_biting):
    """Over the walks that agree with a reference walk outside the free bit positions (and share its overlap)."""
    steps, v = 5, 2
    x, table = case(L, v, steps, seed=1)
    geom = SoftGeometry(L, kv, free)
    walks = all_walks(L, kv, steps, tail_biting)
    _, mask = geom.deposit()
    for i in range(x.shape[0]):
        ref = walks[(i * 7919) % walks.shape[0]].unsqueeze(0)  # [1, S]
        same = ((walks & ~mask) == (ref & ~mask)).all(-1)
        if tail_biting:
            same &= (walks[:, 0] >> kv) == (ref[0, 0] >> kv)
        keep = walks[same]
        assert keep.shape[0] > 4  # the sub-trellis has room to move
        ov = soft_overlap(ref, geom) if tail_biting else None
        post, idx = posterior(x[i:i + 1], table, 0.5, geom, ref=ref, overlap=ov)
        torch.testing.assert_close(to_full(post[0], idx[0], L), brute_marginals(x[i], table, 0.5, keep),
                                   atol=1e-12, rtol=0)


def test_geometry():
    g = soft_geometry(16, 4, 8)
    assert (g.f, g.F, g.free) == (2, 8, (0, 1))
    assert soft_geometry(16, 4, 8, rotation=1).free == (2, 3)
    assert soft_geometry(16, 4, 16).full and soft_geometry(16, 4, 16).F == 16
    assert soft_geometry(16, 6, 8).F <= 8 and soft_geometry(16, 6, 8, rotation=3).free == (0, 1)
    assert [soft_geometry(16, 6, 8, rotation=r).F for r in range(3)] == [6, 6, 4]  # L mod kv = 4: partial innovation
    dep, mask = full_geometry(6, 2).deposit()
    assert torch.equal(dep, torch.arange(64)) and mask == 63
    g = SoftGeometry(7, 3, (0, 2))  # F = 2·2 + 1 (position 0 < 7 mod 3)
    dep, mask = g.deposit()
    assert g.F == 5 and mask == 0b1101101 and int(dep[0b10110]) == 0b1001100
    with pytest.raises(ValueError):
        SoftGeometry(6, 2, (1, 0))
    assert chunk_tiles(128, g, 2, 1 << 30) > chunk_tiles(128, g, 2, 1 << 20) >= 1


@pytest.mark.parametrize("v,kv", [(1, 2), (2, 2), (2, 4)])
def test_zero_temperature_is_viterbi(v, kv):
    """τ → 0: the soft codeword is the codec's Viterbi codeword exactly (free start and tail-biting), and
    hard_path finds the same walk."""
    L, steps = 6, 12
    x, table = case(L, v, steps, b=16, seed=2)
    table32 = table.to(torch.float32).to(torch.float64)  # values the float32 codec represents exactly
    geom = full_geometry(L, kv)
    free = viterbi(x.float(), table32.float(), L, kv)  # [B, S]
    tb = viterbi_tail_biting(x.float(), table32.float(), L, kv)
    for states, ov in ((free, None), (tb, tb[:, 0] >> kv)):
        y = soft_codeword(x, table32, 1e-7, geom, overlap=ov)
        assert torch.equal(y, table32[states])
        assert torch.equal(hard_path(x, table32, geom, overlap=ov), states)
    assert not torch.equal(free, tb)  # the two conditions differ on some tile: both checks bite
    far = soft_codeword(x, table32, 1.0, geom)
    assert (far - table32[free]).abs().max() > 0.1


def test_zero_temperature_sub_trellis_and_reference():
    """At the reference's own codeword the sub-trellis soft codeword is that codeword; hard_path keeps it."""
    L, kv, steps = 8, 2, 16
    x, table = case(L, 2, steps, b=8, seed=3)
    walks = viterbi_tail_biting(x.float(), table.float(), L, kv)  # some valid tail-biting walks
    target = table[walks]  # [B, S, V]: exactly codewords
    geom = soft_geometry(L, kv, 4)
    assert geom.F == 4
    ov = soft_overlap(walks, geom)
    assert torch.equal(soft_codeword(target, table, 1e-7, geom, walks, ov), target)
    assert torch.equal(hard_path(target, table, geom, walks, ov), walks)
    # on other data the sub-trellis Viterbi is never worse than the reference, and it is a valid walk of the code
    hp = hard_path(x, table, geom, walks.roll(1, 0), ov.roll(1, 0))
    err = lambda s: (table[s] - x).square().sum((1, 2))  # noqa: E731
    assert (err(hp) <= err(walks.roll(1, 0)) + 1e-12).all() and (err(hp) < err(walks.roll(1, 0))).any()
    assert torch.equal(hp[:, 1:] >> kv, hp[:, :-1] & ((1 << (L - kv)) - 1))  # consecutive states chain
    assert torch.equal(hp[:, -1] & ((1 << (L - kv)) - 1), hp[:, 0] >> kv)  # and wrap


@pytest.mark.parametrize("sub,tail_biting", [(False, False), (False, True), (True, True)])
def test_gradcheck_x_and_table(sub, tail_biting):
    L, kv, steps = 4, 2, 4
    x, table = case(L, 2, steps, b=2, seed=4)
    geom = SoftGeometry(L, kv, (1,)) if sub else full_geometry(L, kv)
    ref = viterbi(x.float(), table.float(), L, kv, start_high=torch.tensor([1, 2]), end_low=torch.tensor([1, 2]))
    ov = soft_overlap(ref, geom) if tail_biting else None
    ref = ref if sub else None
    fn = lambda a, t: soft_codeword(a, t, 0.6, geom, ref, ov, max_bytes=1)  # noqa: E731  one tile per chunk
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), table.requires_grad_()), atol=1e-8, rtol=1e-6)


def test_gradcheck_hyb_lut():
    """Through the HYB code: the value table is the LUT gathered by the codec's hash (rebuilt here in float64)."""
    cfg = TrellisConfig(bits=1, L=5, V=2, Q=3)
    probe = torch.arange(1, 9, dtype=torch.float32).unsqueeze(-1).expand(8, 2).contiguous()  # entry i holds i+1
    vals = code_values(cfg, probe)  # [32, 2]: ±(idx+1), idx+1
    idx = vals[:, 1].long() - 1
    sign = torch.sign(vals[:, 0]).to(torch.float64)
    g = torch.Generator().manual_seed(5)
    lut = torch.randn(8, 2, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 6, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(a, lt):
        table = lt[idx] * torch.stack([sign, torch.ones_like(sign)], -1)  # [32, 2]
        return soft_codeword(a, table, 0.8, full_geometry(5, 2), overlap=torch.tensor([3, 6]))
    assert torch.autograd.gradcheck(fn, (x, lut), atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(code_values(cfg, lut.detach().float()).double(),
                               lut.detach()[idx] * torch.stack([sign, torch.ones_like(sign)], -1), atol=1e-7, rtol=0)


def test_chunking_does_not_change_results():
    L, kv = 6, 2
    x, table = case(L, 2, 8, b=5, seed=6)
    geom = SoftGeometry(L, kv, (0,))
    ref = viterbi_tail_biting(x.float(), table.float(), L, kv)
    ov = soft_overlap(ref, geom)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ts = [table.clone().requires_grad_() for _ in range(2)]
    ys = [soft_codeword(a, t, 0.3, geom, ref, ov, max_bytes=mb) for a, t, mb in zip(xs, ts, (1, 1 << 30))]
    torch.testing.assert_close(ys[0], ys[1], atol=1e-13, rtol=0)
    w = torch.randn(x.shape, dtype=torch.float64)
    for y in ys:
        (y * w).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(ts[0].grad, ts[1].grad, atol=1e-12, rtol=0)
    assert sub_states(ref, geom).shape == (5, 8, 8)


def test_grouped_tables_equal_separate_passes():
    """Several tables (one per expert) in one pass: the same soft codewords, gradients and best walks as one
    pass per table."""
    L, kv = 6, 2
    g = torch.Generator().manual_seed(8)
    tables = torch.randn(3, 1 << L, 2, generator=g, dtype=torch.float64)  # [G, 2^L, V]
    x = torch.randn(7, 6, 2, generator=g, dtype=torch.float64)
    group = torch.tensor([2, 0, 1, 1, 2, 0, 2])
    geom = SoftGeometry(L, kv, (1,))
    ref = torch.stack([viterbi_tail_biting(x[i:i + 1].float(), tables[group[i]].float(), L, kv)[0] for i in range(7)])
    ov = soft_overlap(ref, geom)
    xa, ta = x.clone().requires_grad_(), tables.clone().requires_grad_()
    ya = soft_codeword(xa, ta, 0.4, geom, ref, ov, group, max_bytes=1)
    xb, tb = x.clone().requires_grad_(), tables.clone().requires_grad_()
    yb = torch.cat([soft_codeword(xb[i:i + 1], tb[group[i]], 0.4, geom, ref[i:i + 1], ov[i:i + 1]) for i in range(7)])
    torch.testing.assert_close(ya, yb, atol=1e-13, rtol=0)
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(ta.grad, tb.grad, atol=1e-12, rtol=0)
    assert (ta.grad.abs().sum((1, 2)) > 0).all()
    hp = hard_path(x, tables, geom, ref, ov, group)
    assert torch.equal(hp, torch.cat([hard_path(x[i:i + 1], tables[group[i]], geom, ref[i:i + 1], ov[i:i + 1])
                                      for i in range(7)]))
    with pytest.raises(ValueError):
        soft_codeword(x, tables, 0.4, geom, ref, ov)  # three tables need a group
