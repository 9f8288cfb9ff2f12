"""The C++ beam search of the additive encoder (``kernels.additive_beam``) against the torch loop of
``codecs.additive_search``: the same codes on random problems (beam 1 to 8, 1 to 3 codebooks, groups of 2 to 8,
rows of scale 0) and errors equal to the loop's on a SmolLM2-sized matrix, where a near-tie may go the other way.
(``tests/codecs/test_additive.py`` checks both paths against the greedy brute-force optimum at beam 1.)"""

from __future__ import annotations

import pytest
import torch
from conftest import require_extension

from moequant.codecs.additive import output_error, reconstruct
from moequant.codecs.additive_search import beam_search
from moequant.kernels import additive_beam as KA
from moequant.kernels.select import kernels


@pytest.fixture(scope="module")
def ext():
    return require_extension(KA.extension, "additive-beam")


def _problem(n: int, k: int, m: int, c: int, g: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(4 * k, k, generator=gen) @ torch.randn(k, k, generator=gen)  # correlated inputs
    h = x.T @ x / (4 * k) + 0.1 * torch.eye(k)
    cb = torch.randn(m, c, g, generator=gen)
    scale = torch.rand(n, generator=gen) + 0.5
    codes = torch.randint(c, (n, k // g, m), generator=gen)
    return w, h, cb, scale, codes


def _both(w, h, cb, codes, scale, beam):
    with kernels("reference"):
        want = beam_search(w, h, cb, codes, scale, beam)
    assert KA.fast_beam is not None
    got = beam_search(w, h, cb, codes, scale, beam)
    return got, want


def _errors(w, h, cb, scale, codes):
    return output_error(w[None], reconstruct(codes[None], cb, scale[None]), h[None])[0]  # [N]


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
        KA.fast_beam(err @ h, (err * (err @ h)).sum(-1), h, cb, torch.zeros(4, 4, 4), torch.zeros(2, 4, 16), codes,
                     scale, 2)
