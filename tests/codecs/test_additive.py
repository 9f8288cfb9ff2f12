"""Additive codebooks (AQLM + OA-EM): the beam search's error expansion, its monotonicity, the initialisations,
chunked distance tables, expert sharing."""

import json

import pytest
import torch
from conftest import additive_problem, additive_row_errors

from moequant.codecs import additive, additive_search
from moequant.codecs.additive import (assign, decode_groups, group_blocks, output_error, reconstruct, row_scales)
from moequant.codecs.additive_search import beam_search, initialise, quantize, search
from moequant.codecs.config import AdditiveConfig, config_from_dict
from moequant.formats import additive as _additive_format  # noqa: F401  (installs the C++ beam search)
from moequant.kernels.select import kernels

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(kmeans_iters=4, em_rounds=2, adam_steps=10, search_rounds=1)


def _correlated_hessian(k: int, rho: float = 0.9, seed: int = 0) -> torch.Tensor:
    """E[xxᵀ] of AR(1) inputs (neighbouring inputs correlated by ``rho``) with uneven scales, damped: [K, K]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * k, k, generator=gen)
    for i in range(1, k):
        x[:, i] = rho * x[:, i - 1] + (1 - rho * rho) ** 0.5 * x[:, i]
    x = x * (0.5 + torch.rand(k, generator=gen))
    h = x.T @ x / x.shape[0]
    return h + 0.01 * h.diagonal().mean() * torch.eye(k)


def _relative(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr(ΔHΔᵀ) / tr(WHWᵀ) for w, ŵ [E, N, K] and h [E, K, K]."""
    return float(output_error(w, w_hat, h).sum() / output_error(w, torch.zeros_like(w), h).sum())


def _problem(n: int = 6, k: int = 16, m: int = 2, c: int = 16, g: int = 4, seed: int = 0):
    return additive_problem(n, k, m, c, g, seed, samples=64)


_row_errors = additive_row_errors


@pytest.mark.parametrize("mode", ["reference", "auto"])  # the torch loop, then the C++ kernel where it builds
def test_beam_of_one_is_greedy_coordinate_descent(mode):
    # With beam 1 each step must take exactly the codeword that minimises the row's full-H error (brute force,
    # recomputed from scratch): this checks AQLM's expansion and the carried (w - ŵ)H term.
    w, h, cb, scale, codes = _problem()
    ref = codes.clone()
    for j in range(codes.shape[1]):
        for m in range(codes.shape[2]):
            for r in range(w.shape[0]):
                errs = []
                for c in range(cb.shape[1]):
                    trial = ref.clone()
                    trial[r, j, m] = c
                    errs.append(float(_row_errors(w, h, cb, scale, trial)[r]))
                ref[r, j, m] = min(range(len(errs)), key=errs.__getitem__)
    with kernels(mode):
        got = beam_search(w, h, cb, codes, scale, beam=1)
    assert torch.equal(got, ref)
    assert _row_errors(w, h, cb, scale, ref).sum() < 0.5 * _row_errors(w, h, cb, scale, codes).sum()  # it moved


@pytest.mark.parametrize("beam", [1, 3, 8])
def test_beam_search_never_increases_the_error(beam):
    w, h, cb, scale, codes = _problem(n=12, k=24, seed=1)
    start = _row_errors(w, h, cb, scale, codes)
    found = beam_search(w, h, cb, codes, scale, beam=beam)
    after = _row_errors(w, h, cb, scale, found)
    assert bool((after <= start).all()) and float(after.sum()) < 0.5 * float(start.sum())
    # from a search result, searching again cannot get worse either
    again = _row_errors(w, h, cb, scale, beam_search(w, h, cb, found, scale, beam=beam))
    assert bool((again <= after).all())


def test_wider_beam_finds_lower_error_here():
    w, h, cb, scale, codes = _problem(n=16, k=24, seed=2)
    e1 = float(_row_errors(w, h, cb, scale, beam_search(w, h, cb, codes, scale, beam=1)).sum())
    e8 = float(_row_errors(w, h, cb, scale, beam_search(w, h, cb, codes, scale, beam=8)).sum())
    assert e8 < 0.95 * e1


def test_zero_rows_decode_to_zero():
    w, h, cb, scale, codes = _problem(n=4, k=16)
    w[1] = 0
    scale = row_scales(w[None])[0]
    assert float(scale[1]) == 0
    found = beam_search(w, h, cb, codes, scale, beam=4)
    assert torch.equal(reconstruct(found[None], cb, scale[None])[0, 1], torch.zeros(16))


def test_chunked_tables_equal_one_table(monkeypatch):
    # 1x16 needs its [points, 65536] tables in chunks; chunks of any size give the same argmin and search
    w, h, cb, scale, codes = _problem(n=10, k=16, m=2, c=32, seed=3)
    blocks = group_blocks(h[None], 4)  # [1, G, 4, 4]
    target = torch.randn(1, 4, 10, 4)
    whole_assign = assign(target, blocks, cb[0])
    whole_beam = beam_search(w, h, cb, codes, scale, beam=4)
    monkeypatch.setattr(additive, "_BUDGET", 64)
    monkeypatch.setattr(additive_search, "_BUDGET", 64)
    assert torch.equal(assign(target, blocks, cb[0]), whole_assign)
    assert torch.equal(beam_search(w, h, cb, codes, scale, beam=4), whole_beam)
    # assign is the exact nearest codeword under the block metric
    d = target[0][..., None, :] - cb[0]  # [G, P, C, g]
    brute = torch.einsum("gpca,gab,gpcb->gpc", d, blocks[0], d).argmin(-1)
    assert torch.equal(whole_assign[0], brute)


def test_codebook_gradient_is_the_ordered_sum_bit_for_bit():
    # each codeword's gradient is the sum over the groups using it, in group order (what a sequential index_add_
    # gives): the sorted segment sums reproduce it exactly, with codewords no group uses at zero
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 40, (3, 7, 50, 2), generator=gen)  # [E, G, N, M]: codewords 40..63 unused
    grad = torch.randn(3, 7, 50, 8, generator=gen)  # [E, G, N, g]
    got = additive.CodebookGrad(codes, 64)(grad)  # [M, C, g]
    flat_c, flat_g = codes.reshape(-1, 2), grad.reshape(-1, 8)
    want = torch.zeros(2, 64, 8)
    for p in range(flat_c.shape[0]):
        for m in range(2):
            want[m, flat_c[p, m]] += flat_g[p]
    assert torch.equal(got, want)
    assert torch.equal(got[:, 40:], torch.zeros(2, 24, 8))


def test_group_blocks_and_decode_order():
    h = torch.arange(64.0).reshape(8, 8)
    blocks = group_blocks(h[None], 4)
    assert torch.equal(blocks[0, 0], h[:4, :4]) and torch.equal(blocks[0, 1], h[4:, 4:])
    cb = torch.randn(3, 5, 2)
    codes = torch.tensor([[[4, 0, 2]]])  # [E=1, P=1, M=3]
    assert torch.equal(decode_groups(codes, cb)[0, 0], (cb[0, 4] + cb[1, 0]) + cb[2, 2])


def test_oa_em_init_beats_kmeans_on_a_correlated_hessian():
    # Synthetic AR(1) Hessian (rho 0.9: strong correlation inside every group of 8): OA-EM's block metric sees
    # what k-means' diagonal metric cannot.
    torch.manual_seed(0)
    w = (torch.randn(64, 64) * 0.05)[None]
    h = _correlated_hessian(64)[None]
    err = {}
    for init in ("kmeans", "oa-em"):
        cfg = AdditiveConfig(M=2, B=5, g=8, init=init, kmeans_iters=8, em_rounds=3, adam_steps=25)
        codes, books, scale = initialise(w, h, cfg)
        err[init] = _relative(w, reconstruct(codes, books, scale), h)
    assert err["oa-em"] < 0.6 * err["kmeans"], err
    assert err["kmeans"] < 0.5  # not vacuous: a real fit


def test_oa_em_init_beats_kmeans_on_a_real_smollm2_layer():
    # The test on a real layer: SmolLM2-135M layer 0 k_proj [192, 576] with its calibration Hessian,
    # E[xxᵀ] of its input (RMSNorm of the token embeddings) over the first 8192 tokens of PTB train, damped 0.01.
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from moequant.calib.hessian import damp
    from moequant.zoo.corpora import tokenize_corpus
    from moequant.zoo.corpora import load_text
    from moequant.zoo.models import resolve_alias

    d = resolve_alias("smollm2-135m")
    eps = json.loads((d / "config.json").read_text())["rms_norm_eps"]
    ids = tokenize_corpus(AutoTokenizer.from_pretrained(d), load_text("ptb", "train")[:100_000])[:8192]
    with safe_open(d / "model.safetensors", "pt") as f:
        x = f.get_tensor("model.embed_tokens.weight")[ids].float()  # [T, 576]
        norm = f.get_tensor("model.layers.0.input_layernorm.weight").float()
        w = f.get_tensor("model.layers.0.self_attn.k_proj.weight").float()[None]  # [1, 192, 576]
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm
    h = damp(x.T.double() @ x.double() / x.shape[0], 0.01).float()[None]  # [1, 576, 576]
    err = {}
    for init in ("kmeans", "oa-em"):
        codes, books, scale = initialise(w, h, AdditiveConfig(init=init, adam_steps=50))
        err[init] = _relative(w, reconstruct(codes, books, scale), h)
    # measured: k-means 0.00384, OA-EM 0.00334
    assert err["oa-em"] < 0.93 * err["kmeans"] and err["kmeans"] < 0.02, err


def test_search_improves_on_its_start_and_keeps_values_fp16():
    torch.manual_seed(1)
    w = torch.randn(2, 16, 32)
    h = torch.stack([_correlated_hessian(32, seed=s) for s in (1, 2)])
    cfg = AdditiveConfig(M=2, B=4, g=4, init="kmeans", **FAST)
    start = initialise(w, h, cfg)
    codes, books, scale = search(w, h, *start, cfg)
    assert _relative(w, reconstruct(codes, books, scale), h) < 0.9 * _relative(w, reconstruct(*start), h)
    assert torch.equal(books, books.half().float()) and torch.equal(scale, scale.half().float())


def test_quantize_shares_codebooks_or_fits_each_expert():
    torch.manual_seed(2)
    w = torch.randn(3, 8, 16)
    h = torch.stack([_correlated_hessian(16, seed=s) for s in range(3)])
    per = AdditiveConfig(M=1, B=4, g=4, **FAST)
    codes, books, scale = quantize(w, h, per)
    assert codes.shape == (3, 8, 4, 1) and books.shape == (3, 1, 16, 4) and scale.shape == (3, 8)
    one = quantize(w[1], h[1], per)  # expert 1 alone, its own Hessian: the same fit
    assert torch.equal(one[0], codes[1]) and torch.equal(one[1], books[1]) and torch.equal(one[2], scale[1])
    shared = quantize(w, h, AdditiveConfig(M=1, B=4, g=4, share="layer", **FAST))
    assert shared[1].shape == (1, 16, 4)
    # a [K, K] Hessian is every expert's; a diagonal [..., K] and None (identity) are accepted
    assert torch.equal(quantize(w, h[0], per)[0], quantize(w, h[0].expand(3, 16, 16), per)[0])
    eye = quantize(w[0], None, per)
    assert torch.equal(eye[0], quantize(w[0], torch.ones(16), per)[0])


def test_quantize_refuses_what_it_cannot_store():
    cfg = AdditiveConfig(M=1, B=4, g=8, **FAST)
    with pytest.raises(ValueError, match="K a multiple of 8"):
        quantize(torch.randn(4, 12), None, cfg)
    with pytest.raises(ValueError, match="overflows the float16 row scale"):
        quantize(torch.full((4, 16), 1e6), None, cfg)


def test_config_validates_and_round_trips():
    cfg = AdditiveConfig(M=1, B=16, share="layer", init="kmeans")
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.bits == 2.0 and cfg.short_name == "additive1x16-g8-kmeans-shared"
    for bad, msg in (({"B": 17}, "bits per codebook"), ({"M": 0}, "number of codebooks"), ({"init": "pq"}, "--init"),
                     ({"share": "model"}, "--share"), ({"beam": 0}, "--beam"), ({"g": 0}, "--group")):
        with pytest.raises(ValueError, match=msg):
            AdditiveConfig(**bad)
