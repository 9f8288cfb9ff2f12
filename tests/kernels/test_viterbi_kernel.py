"""The C++ Viterbi (``kernels.viterbi``) against the torch loop of ``codecs.trellis``: the same states bit for
bit — plain and tail-biting walks, weighted errors, every kv width the codes use (m < 8 takes the scalar
path, m >= 8 the fused vector one), chunked tiles — and the same packed trellis tensor end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import require_extension

from moequant.codecs import trellis as T
from moequant.codecs.config import TrellisConfig
from moequant.kernels import viterbi as KV
from moequant.kernels.select import reference_kernels


@pytest.fixture(scope="module")
def ext():
    return require_extension(KV.extension, "viterbi")


def _mm_is_sequential_fma() -> bool:
    """Whether torch's CPU GEMM here computes a 4-term dot product as the kernel does (first product rounded,
    then one FMA per term; emulated in float64, where a product of two floats is exact). Checked on the
    machines this was written on; where a BLAS sums otherwise, the costs differ in the last bit and a near-tie
    may go the other way, so the tests then ask for the same walks almost everywhere instead of everywhere."""
    gen = torch.Generator().manual_seed(0)
    f, t = torch.randn(64, 4, generator=gen), torch.randn(4, 512, generator=gen)
    fd, td = f.double(), t.double()
    acc = (fd[:, :1] * td[0]).float()
    for k in range(1, 4):
        acc = (fd[:, k:k + 1] * td[k] + acc.double()).float()
    return torch.equal(f @ t, acc)


EXACT = _mm_is_sequential_fma()


def _assert_same_states(ref: torch.Tensor, got: torch.Tensor) -> None:
    if EXACT:
        assert torch.equal(ref, got)
    else:
        assert (ref == got).double().mean().item() > 0.95


def _both(fn):
    """``fn()`` with the torch loop, then with the kernel installed (as ``formats.trellis`` leaves it)."""
    T.set_viterbi_fast_path(None)
    try:
        ref = fn()
    finally:
        T.set_viterbi_fast_path(KV.fast_chunk)
    return ref, fn()


@pytest.mark.parametrize("L,kv,V", [(8, 3, 1), (10, 2, 1), (12, 4, 2), (12, 1, 1), (9, 8, 1), (14, 6, 2)])
@pytest.mark.parametrize("tail", [False, True])
def test_states_equal_the_torch_loop(ext, L, kv, V, tail):
    gen = torch.Generator().manual_seed(L * 100 + kv)
    values = torch.randn(1 << L, V, generator=gen)  # [2^L, V]
    steps = 24
    x = torch.randn(9, steps, V, generator=gen)  # [B, S, V]
    w = torch.rand(9, steps, V, generator=gen)
    if tail:
        ref, got = _both(lambda: T.viterbi_tail_biting(x, values, L, kv, w, max_bytes=1))  # chunks of 1 tile
    else:
        ref, got = _both(lambda: T.viterbi(x, values, L, kv, weights=w))
    _assert_same_states(ref, got)
    if tail:  # the constraint holds: the walk closes on itself
        assert torch.equal(got[:, -1] % (1 << (L - kv)), got[:, 0] >> kv)


def test_ties_go_to_the_smallest_predecessor(ext):
    # a code whose values repeat: many exact ties, which both must break the same way
    L, kv = 8, 2
    values = torch.tensor([[0.0], [1.0], [-1.0], [0.5]]).repeat(1 << (L - 2), 1)  # [256, 1]
    x = torch.tensor([0.0, 1.0, 0.5, -1.0, 0.0, 0.25] * 3).view(1, 18, 1).repeat(3, 1, 1)
    ref, got = _both(lambda: T.viterbi(x, values, L, kv))
    assert torch.equal(ref, got)  # costs here are sums of exact small products: the same on any BLAS


def test_packed_matrix_is_identical(ext):
    cfg = TrellisConfig(bits=2, L=10)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, generator=gen)
    hdiag = torch.rand(64, generator=gen) + 0.1
    lut = T.initial_lut(cfg)
    ref, got = _both(lambda: T.quantize_matrix(w, cfg, lut, hdiag=hdiag))
    if EXACT:
        for a, b in zip(ref, got):
            assert torch.equal(a, b)
    else:
        err = [((w - r[2]).square() * hdiag).sum().item() for r in (ref, got)]
        assert err[1] <= err[0] * 1.01


def test_fast_path_steps_aside(ext):
    feats = torch.randn(2, 5, 2)
    table = torch.randn(2, 1 << 6)
    assert KV.fast_chunk(feats, table, 6, 2, None, None) is not None
    with reference_kernels():
        assert KV.fast_chunk(feats, table, 6, 2, None, None) is None
    assert KV.fast_chunk(feats.double(), table.double(), 6, 2, None, None) is None


@pytest.mark.parametrize("L,kv,V", [(12, 4, 2), (16, 4, 2), (10, 2, 2), (12, 4, 1), (11, 3, 3), (8, 3, 2)])
@pytest.mark.parametrize("tail", [False, True])
def test_half_values_path_gives_the_torch_loops_states(ext, L, kv, V, tail, monkeypatch):
    """fp16-exact values (a HYB LUT's codes): the kernel takes the fp16 path (values read as halves, squares
    formed in registers) and its walks equal the torch loop's: V = 2 is the unrolled vector path, V = 1 and 3
    the general one, kv = 2 the unfused (m < 8) step; L = 16 is the CLI's default trellis."""
    gen = torch.Generator().manual_seed(L * 10 + V)
    values = torch.randn(1 << L, V, generator=gen).half().float()  # [2^L, V], fp16-exact
    steps = 20 if L < 16 else 8
    x = torch.randn(5, steps, V, generator=gen)
    w = torch.rand(5, steps, V, generator=gen)
    taken = []
    real = KV.half_values
    monkeypatch.setattr(KV, "half_values", lambda t: taken.append(real(t) is not None) or real(t))
    if tail:
        ref, got = _both(lambda: T.viterbi_tail_biting(x, values, L, kv, w, max_bytes=1))
    else:
        ref, got = _both(lambda: T.viterbi(x, values, L, kv, weights=w))
    assert taken and all(taken)
    _assert_same_states(ref, got)


def test_half_values_only_for_an_exact_squares_and_values_table():
    v = torch.randn(2, 64).half().float()  # [V, n]
    table = torch.cat([v.square(), v])
    got = KV.half_values(table)
    assert got is not None and got.dtype == torch.float16 and torch.equal(got.float(), v)
    assert KV.half_values(torch.cat([v.square(), v + 1e-4])) is None  # values not fp16-exact
    off = v.square().clone()
    off[1, 5] = torch.nextafter(off[1, 5], torch.tensor(1e9))
    assert KV.half_values(torch.cat([off, v])) is None  # not the squares of the values
    assert KV.half_values(torch.randn(3, 64)) is None  # odd feature count
