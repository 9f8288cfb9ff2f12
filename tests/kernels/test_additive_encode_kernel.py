"""The additive encoder's C++ kernels (``kernels.additive_encode``) against the torch code. ``assign``: the exact
nearest codeword under each point's block metric (brute force), for codebooks of 3 to 65,536 codewords and groups
of 1 to 12. The beam search against the torch loop of ``codecs.additive_search``: the same codes on random problems
(beam 1 to 8, 1 to 3 codebooks, groups of 2 to 8, rows of scale 0) and errors equal to the loop's on a
SmolLM2-sized matrix, where a near-tie may go the other way. (``tests/codecs/test_additive.py`` checks both beam
paths against the greedy brute-force optimum at beam 1.)"""

from __future__ import annotations

import pytest
import torch
from conftest import additive_problem, additive_row_errors, require_extension

from moequant.codecs.additive import assign, reconstruct
from moequant.codecs.additive_search import beam_search, set_beam_fast_path
from moequant.kernels import additive_encode as KA
from moequant.kernels.select import kernels


@pytest.fixture(scope="module")
def ext():
    return require_extension(KA.extension, "additive-encode")


def _problem(n: int, k: int, m: int, c: int, g: int, seed: int):
    return additive_problem(n, k, m, c, g, seed, samples=4 * k)


def _both(w, h, cb, codes, scale, beam):
    with kernels("reference"):
        want = beam_search(w, h, cb, codes, scale, beam)
    ran = []  # the kernel must take the search, not fall back to the loop

    def spy(*args):
        ran.append(KA.fast_beam(*args))
        return ran[-1]

    set_beam_fast_path(spy)
    try:
        got = beam_search(w, h, cb, codes, scale, beam)
    finally:
        set_beam_fast_path(KA.fast_beam)
    assert len(ran) == 1 and ran[0] is not None
    return got, want


_errors = additive_row_errors


@pytest.mark.parametrize("m,c,g,beam", [(2, 16, 4, 8), (1, 32, 8, 3), (3, 8, 2, 1), (2, 16, 4, 20)])
def test_same_codes_as_the_torch_loop(ext, m, c, g, beam):
    w, h, cb, scale, codes = _problem(12, 24, m, c, g, seed=m * 10 + beam)
    scale[3] = 0.0  # a row of scale 0: every candidate ties
    got, want = _both(w, h, cb, codes, scale, beam)
    assert got.dtype == torch.int64 and got.shape == codes.shape
    assert torch.equal(got[torch.arange(12) != 3], want[torch.arange(12) != 3])
    assert torch.equal(_errors(w, h, cb, scale, got)[3], _errors(w, h, cb, scale, want)[3])  # zero either way


def test_a_smollm2_sized_matrix_errs_as_the_loop_does(ext):
    # 2x8 g8, beam 8, 96 rows of a 1536-wide input: a near-tie scored in another order can send a row's beam down
    # another path (to a row error a little above or below the loop's); the total may not move
    gen = torch.Generator().manual_seed(4)
    k = 1536
    x = torch.randn(2048, k, generator=gen) * (0.2 + 2 * torch.rand(k, generator=gen))
    h = x.T @ x / 2048
    h += 0.01 * h.diagonal().mean() * torch.eye(k)
    w = torch.randn(96, k, generator=gen) * 0.02
    cb = torch.randn(2, 256, 8, generator=gen) * 0.5
    scale = w.abs().amax(1) / 1.5
    codes = torch.randint(256, (96, k // 8, 2), generator=gen)
    got, want = _both(w, h, cb, codes, scale, 8)
    e_got, e_want = _errors(w, h, cb, scale, got), _errors(w, h, cb, scale, want)
    start = _errors(w, h, cb, scale, codes)
    assert float(e_want.sum()) < 0.5 * float(start.sum())  # the search did work
    ratio = float(e_got.sum() / e_want.sum())
    same = float((got == want).double().mean())
    assert abs(ratio - 1) < 2e-3 and same > 0.95


def test_codes_out_of_range_are_refused(ext):
    w, h, cb, scale, codes = _problem(4, 16, 2, 16, 4, seed=9)
    codes[1, 2, 0] = 16  # one past the codebook
    err = w - reconstruct(codes.clamp_max(15)[None], cb, scale[None])[0]
    with pytest.raises(RuntimeError, match=r"codes must be in \[0, 16\)"):
        KA.beam_kernel(ext, err @ h, (err * (err @ h)).sum(-1), h, cb, torch.zeros(4, 4, 4), torch.zeros(2, 4, 16),
                       codes, scale, 2)

    with pytest.raises(RuntimeError, match=r"1 <= g <= 64"):  # an empty group once divided by zero (SIGFPE)
        KA.beam_kernel(ext, err @ h, (err * (err @ h)).sum(-1), h, torch.zeros(2, 16, 0), torch.zeros(4, 4, 4),
                       torch.zeros(2, 4, 16), codes, scale, 2)


@pytest.mark.parametrize("c,g", [(256, 8), (3, 1), (37, 12), (1 << 16, 8), (16, 5)])
def test_assign_is_the_nearest_codeword_under_each_metric(ext, c, g):
    gen = torch.Generator().manual_seed(c + g)
    points = 40 if c > 1000 else 300
    target = torch.randn(2, 3, points, g, generator=gen)  # [E, G, P, g]
    a = torch.randn(2, 3, g, g, generator=gen)
    blocks = a @ a.transpose(-1, -2) + 0.1 * torch.eye(g)  # [E, G, g, g] symmetric positive definite
    codebook = torch.randn(c, g, generator=gen)
    got = assign(target, blocks, codebook)  # the kernel (installed by the import above)
    assert KA.fast_assign(target.reshape(6, points, g), blocks.reshape(6, g, g), codebook) is not None
    with kernels("reference"):
        want = assign(target, blocks, codebook)
    t, h, cb = target.double(), blocks.double(), codebook.double()
    ht = t @ h  # [E, G, P, g] (H symmetric)
    dist = ((ht * t).sum(-1)[..., None] - 2 * ht @ cb.T  # [E, G, P, C]: (t − c)ᵀH(t − c) in float64
            + torch.einsum("ca,egab,cb->egc", cb, h, cb)[:, :, None, :])
    best = dist.gather(-1, got[..., None])[..., 0]
    assert got.dtype == torch.int64 and got.shape == (2, 3, points)
    assert torch.allclose(best, dist.min(-1).values, rtol=1e-5, atol=1e-6)  # a nearest codeword (float ties aside)
    assert float((got == want).double().mean()) > 0.99


@pytest.mark.parametrize("c", [256, 37])
def test_the_fixed_group_of_8_picks_the_codes_of_the_general_path(ext, c):
    # g = 8 takes nearest<8> (the point's broadcasts held in registers); the same problem padded to g = 9 with a
    # zero coordinate (zero target, zero codeword entry, identity on the new axis) takes the general path. Every
    # padded term adds an exact zero, so the scores and the codes must be the same bits, ties included: the
    # codebook repeats 5 of its codewords further on (a tie goes to the smaller index).
    gen = torch.Generator().manual_seed(c)
    p = 2000
    target = torch.randn(3, p, 8, generator=gen)  # [B, P, g]
    a = torch.randn(3, 8, 8, generator=gen)
    blocks = a @ a.transpose(-1, -2) + 0.1 * torch.eye(8)  # [B, 8, 8]
    codebook = torch.randn(c, 8, generator=gen)
    codebook[c - 5:] = codebook[:5]
    target[:, :5] = codebook[:5]  # points on a repeated codeword: a tie at distance 0
    got = KA.fast_assign(target, blocks, codebook)
    pad_t = torch.cat([target, torch.zeros(3, p, 1)], -1).contiguous()
    pad_h = torch.zeros(3, 9, 9)
    pad_h[:, :8, :8] = blocks
    pad_h[:, 8, 8] = 1.0
    pad_c = torch.cat([codebook, torch.zeros(c, 1)], -1).contiguous()
    want = KA.fast_assign(pad_t, pad_h, pad_c)
    assert got is not None and want is not None
    assert torch.equal(got, want)
    assert got[:, :5].tolist() == [[0, 1, 2, 3, 4]] * 3
