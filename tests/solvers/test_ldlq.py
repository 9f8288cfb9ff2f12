"""GPTQ / BlockLDLQ: beats RTN on the Hessian proxy, reduces to RTN when H is diagonal, matches the textbook
GPTQ update (column by column, and block by block), its LDL factor is one, and its reconstruction is exactly
what the packed format decodes."""

from __future__ import annotations

import pytest
import torch

from moequant.codecs.columns import UniformColumns
from moequant.codecs.config import LutConfig, UniformConfig
from moequant.formats.methods import column_quantizer
from moequant.formats.registry import encode, tensor_class_for
from moequant.solvers.ldlq import ldl_feedback, ldlq, proxy_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(r: int = 64, k: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [R, K] Gaussian; H [K, K] the second moment of correlated inputs; its 1%-damped version."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(r, k, generator=g)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)  # [K, K]
    x = torch.randn(2048, k, generator=g) @ mix  # [T, K]
    h = (x.T @ x / x.shape[0]).double()
    hd = h + 0.01 * h.diagonal().mean() * torch.eye(k, dtype=h.dtype)
    return w, h, hd


CONFIGS = [UniformConfig(bits=3, group_size=32), UniformConfig(bits=3, group_size=-1, clip_search=False),
           UniformConfig(bits=3, group_size=48), UniformConfig(bits=4, group_size=96, symmetric=False),  # partial last group
           UniformConfig(bits=2, group_size=32, symmetric=False), LutConfig(block_size=32),
           LutConfig(block_size=32, double_quant=True)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.short_name)
def test_ldlq_beats_rtn_and_packs_exactly(cfg):
    w, h, hd = _problem()
    rtn = proxy_loss(w, encode(w, cfg).dequantize(), h)
    q = column_quantizer(cfg, w)
    res = ldlq(w, hd, q, h_proxy=h)
    assert res.proxy <= 0.8 * rtn, (res.proxy, rtn)  # measured 0.57-0.67
    qt = tensor_class_for(cfg).from_parts(tuple(w.shape), q.parts(), cfg)
    assert torch.equal(qt.dequantize(), res.w_hat)


def test_int3_ratio_issue_threshold():
    """The issue's check: random 64x128 problem, non-identity H, int3: LDLQ proxy <= 0.8x RTN's."""
    w, h, hd = _problem(seed=1)
    cfg = UniformConfig(bits=3, group_size=128)
    ratio = ldlq(w, hd, column_quantizer(cfg, w), h_proxy=h).proxy / proxy_loss(w, encode(w, cfg).dequantize(), h)
    assert ratio <= 0.8


def test_diagonal_hessian_is_rtn():
    """No correlation between inputs -> nothing to feed forward -> exactly RTN."""
    w, _, _ = _problem()
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(3)).double() + 0.5)
    cfg = UniformConfig(bits=3, group_size=32)
    res = ldlq(w, h, column_quantizer(cfg, w))
    assert torch.equal(res.w_hat, encode(w, cfg).dequantize())


def _gptq_u(hd: torch.Tensor) -> torch.Tensor:
    """GPTQ's factor: upper ``U`` with ``H⁻¹ = UᵀU`` (float32)."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True).float()


def _naive_gptq(w: torch.Tensor, hd: torch.Tensor, q) -> torch.Tensor:
    """The textbook update, block by block (``q.block`` columns), no lazy batches: every column holds the best
    compensation for the errors so far whenever a group is fitted."""
    u = _gptq_u(hd)
    work = w.clone()
    out = torch.zeros_like(w)
    b = q.block
    for j in range(0, w.shape[1], b):
        if j % q.group == 0:
            q.fit(j, work[:, j:j + q.group])
        out[:, j:j + b] = q.round(j, work[:, j:j + b])
        e = torch.linalg.solve_triangular(u[j:j + b, j:j + b], work[:, j:j + b] - out[:, j:j + b], upper=True,
                                          left=False)  # [R, b]
        work[:, j + b:] -= e @ u[j:j + b, j + b:]
    return out


@pytest.mark.parametrize("lazy, group", [(8, 32), (32, 32), (128, 32), (32, 48), (16, 128)])
def test_lazy_batches_match_naive(lazy, group):
    """LDL form with lazy batches = the textbook GPTQ update, also where a group reaches past a batch (48 / 32,
    128 / 16): its columns are fitted with the batch's feedback included."""
    w, h, hd = _problem()
    cfg = UniformConfig(bits=3, group_size=group)
    ref = _naive_gptq(w, hd, column_quantizer(cfg, w))
    got = ldlq(w, hd, column_quantizer(cfg, w), lazy=lazy).w_hat
    _assert_same_but_one_group(w, h, got, ref, group)  # measured: 0 groups, except 1 at lazy 32 / group 32


def _assert_same_but_one_group(w, h, got, ref, group: int) -> None:
    """``got`` equals ``ref`` but in at most one (row, group): fp reassociation may flip a near-tie of one row's
    clip search, and with it that row's group scale (and every code fed back from it inside the group); a wrong
    update differs in many groups."""
    flipped = {(int(r), int(c) // group) for r, c in (got != ref).nonzero()}
    assert len(flipped) <= 1, flipped
    assert abs(proxy_loss(w, got, h) / proxy_loss(w, ref, h) - 1) <= 1e-5


@pytest.mark.parametrize("block", [1, 4, 16])
def test_ldl_feedback_is_a_block_ldl_factor(block):
    """``H = (I + A) D (I + A)ᵀ``: ``A`` exactly zero on and below the diagonal blocks, and
    ``(I + A)⁻¹ H (I + A)⁻ᵀ`` block-diagonal."""
    _, _, hd = _problem(k=64)
    a = ldl_feedback(hd, block)
    k = hd.shape[0]
    blk = torch.arange(k) // block
    on_or_below = blk[:, None] >= blk[None, :]  # [K, K]
    assert a.dtype == torch.float64 and bool((a[on_or_below] == 0).all()) and bool((a[~on_or_below] != 0).all())
    m = torch.eye(k, dtype=torch.float64) + a
    d = torch.linalg.solve_triangular(m, torch.linalg.solve_triangular(m, hd, upper=True).T, upper=True).T
    off = blk[:, None] != blk[None, :]
    assert d[off].abs().max() <= 1e-10 * hd.abs().max()
    assert torch.allclose(m @ torch.where(off, 0.0, d) @ m.T, hd, rtol=0, atol=1e-10 * hd.abs().max())
    assert torch.equal(ldl_feedback(hd, block, dtype=torch.float32), a.float())


class _JointUniform(UniformColumns):
    """A 'vector' codec stand-in: rounds 16 columns at a time with no feedback inside the block."""

    block = 16


def test_block_feedback_matches_textbook_block_gptq():
    """BlockLDLQ in LDL form = GPTQ's block update ``e = Δ_B U_BB⁻¹``, rest ``-= e U_B,rest`` (16-column blocks)."""
    w, h, hd = _problem()
    cfg = UniformConfig(bits=3, group_size=32)
    ref = _naive_gptq(w, hd, _JointUniform(64, 128, cfg))
    got = ldlq(w, hd, _JointUniform(64, 128, cfg)).w_hat
    # on an AVX-512 Xeon row 6's third group differs (27 codes, by <= 7e-4): a former ">= 99.9% equal" failed there
    _assert_same_but_one_group(w, h, got, ref, cfg.group_size)


def test_block_feedback_between_rtn_and_columnwise():
    w, h, hd = _problem()
    cfg = UniformConfig(bits=3, group_size=32)
    rtn = proxy_loss(w, encode(w, cfg).dequantize(), h)
    col = ldlq(w, hd, column_quantizer(cfg, w), h_proxy=h).proxy
    blk = ldlq(w, hd, _JointUniform(64, 128, cfg), h_proxy=h).proxy
    assert col < blk < 0.9 * rtn
    # one block spanning every column: no feedback at all -> RTN
    whole = _JointUniform(64, 128, UniformConfig(bits=3, group_size=-1, clip_search=False))
    whole.block = 128
    res = ldlq(w, hd, whole)
    assert torch.equal(res.w_hat, encode(w, UniformConfig(bits=3, group_size=-1, clip_search=False)).dequantize())


def test_act_order_static_groups():
    w, h, hd = _problem()
    cfg = UniformConfig(bits=3, group_size=32)
    q = column_quantizer(cfg, w)
    res = ldlq(w, hd, q, act_order=True, h_proxy=h)
    assert res.proxy <= 0.8 * proxy_loss(w, encode(w, cfg).dequantize(), h)
    assert torch.equal(tensor_class_for(cfg).from_parts((64, 128), q.parts(), cfg).dequantize(), res.w_hat)
    with pytest.raises(ValueError, match="act-order"):
        ldlq(w, hd, _JointUniform(64, 128, cfg), act_order=True)


def test_indefinite_hessian_gets_extra_damping_or_fails():
    w, _, _ = _problem()
    h = torch.zeros(128, 128, dtype=torch.float64)
    h[0, 0] = 1.0  # singular: the bump rescues it
    assert torch.isfinite(ldlq(w, h, column_quantizer(UniformConfig(bits=4, group_size=32), w)).w_hat).all()
    bad = -torch.eye(128, dtype=torch.float64)
    with pytest.raises(Exception, match="layer9.q_proj"):
        ldl_feedback(bad, 1, "layer9.q_proj")


def test_blockldlq_drives_the_trellis_codec():
    """BlockLDLQ with 16-column trellis tiles: beats the trellis without feedback on the proxy, and the
    packed tensor decodes to the solver's reconstruction exactly."""
    from moequant.codecs.config import TrellisConfig

    w, h, hd = _problem(64, 128, seed=4)
    cfg = TrellisConfig(bits=2, L=10)
    q = column_quantizer(cfg, w)
    assert q.block == 16
    res = ldlq(w, hd, q, h_proxy=h)
    rtn = proxy_loss(w, encode(w, cfg).dequantize(), h)
    assert res.proxy <= 0.8 * rtn, (res.proxy, rtn)
    qt = tensor_class_for(cfg).from_parts(tuple(w.shape), q.parts(), cfg)
    assert torch.equal(qt.dequantize(), res.w_hat)


def test_proxy_loss_float32_products_match_float64():
    """The float32 products stay within 1e-5 of the float64 formula at K = 1,024, and a perfect copy scores 0."""
    w, h, _ = _problem(r=256, k=1024, seed=5)
    w_hat = w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(6))
    w64, d = w.double(), (w - w_hat).double()
    ref = float(((d @ h) * d).sum() / ((w64 @ h) * w64).sum())
    assert abs(proxy_loss(w, w_hat, h) / ref - 1) <= 1e-5
    assert proxy_loss(w, w.clone(), h) == 0.0
