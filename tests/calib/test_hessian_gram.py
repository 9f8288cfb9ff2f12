"""The blocked symmetric Gram product behind every Hessian statistic (``calib.hessian._add_gram``): the
blocks tile the columns, the result is exactly symmetric and equals ``xᵀx`` (float64 reference) to fp32
accuracy, and chunks of tokens add up to the whole."""

from __future__ import annotations

import pytest
import torch

from moequant.calib import hessian
from moequant.calib.hessian import HessianStat, _add_gram, _gram_blocks


@pytest.mark.parametrize("k", [1, 511, 512, 513, 896, 1536, 4864, 8960])
def test_blocks_tile_the_columns(k):
    blocks = _gram_blocks(k)
    assert blocks[0][0] == 0 and blocks[-1][1] == k
    assert all(a1 == b0 for (_, a1), (b0, _) in zip(blocks, blocks[1:]))
    widths = [b - a for a, b in blocks]
    assert max(widths) <= hessian._GRAM_BLOCK and max(widths) - min(widths) <= max(widths) // 2
    assert len(blocks) == -(-k // hessian._GRAM_BLOCK)


@pytest.mark.parametrize("k,block", [(40, 64), (100, 32), (130, 48), (257, 64)])
def test_gram_equals_the_full_product(monkeypatch, k, block):
    monkeypatch.setattr(hessian, "_GRAM_BLOCK", block)
    torch.manual_seed(k)
    c = torch.randn(300, k) * torch.linspace(0.1, 3.0, k)  # [t, K]: columns of different scales
    acc = torch.zeros(k, k, dtype=torch.float64)
    _add_gram(acc, c)
    want = c.double().T @ c.double()
    assert torch.equal(acc, acc.T)
    rel = ((acc - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-6
    full = (c.T @ c).double()  # the fp32 single-GEMM product the blocks replace
    assert ((acc - full).abs().max() / full.abs().max()).item() < 1e-6
    if len(_gram_blocks(k)) > 1:  # the off-diagonal blocks were really computed, not left at zero
        assert acc[-1, 0] != 0 and acc[0, -1] == acc[-1, 0]


def test_chunks_add_up(monkeypatch):
    monkeypatch.setattr(hessian, "_CHUNK_TOKENS", 7)
    monkeypatch.setattr(hessian, "_GRAM_BLOCK", 16)
    torch.manual_seed(0)
    x = torch.randn(3, 20, 50)  # [B, L, K]: 60 tokens in 9 chunks
    stat = HessianStat.zeros(50)
    stat.add(x)
    assert stat.count == 60
    flat = x.reshape(-1, 50).double()
    torch.testing.assert_close(stat.mean(), flat.T @ flat / 60, rtol=1e-5, atol=1e-6)  # fp32 chunk products
