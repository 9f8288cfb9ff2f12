"""QuantEmbedding decodes only the rows it looks up, bit for bit what the whole table decodes to;
TiedQuantLinear computes from its embedding's packed tensor and holds none of its own."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moequant.codecs.config import LutConfig, TrellisConfig, UniformConfig
from moequant.formats.registry import encode
from moequant.nn.quant_embedding import (QuantEmbedding, TiedQuantLinear, check_row_local, embedding_rows,
                                         select_rows)

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = [
    pytest.param(UniformConfig(bits=8, group_size=64, symmetric=True, clip_search=False), id="int8-sym-g64"),
    pytest.param(UniformConfig(bits=4, group_size=32, symmetric=False), id="int4-asym-g32"),
    pytest.param(UniformConfig(bits=3, group_size=48, symmetric=False), id="int3-asym-partial-group"),
    pytest.param(LutConfig(lut="nf4", block_size=16), id="nf4"),
]


def _table(v: int = 50, h: int = 80, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, h, generator=g)  # [V, H]


@pytest.mark.parametrize("config", CONFIGS)
def test_rows_decode_bit_exact(config):
    qt = encode(_table(), config)
    ids = torch.tensor([[3, 0, 49, 3], [7, 7, 12, 1]])  # [2, 4], repeats included
    want = qt.dequantize()[ids]  # [2, 4, H]
    got = embedding_rows(qt, ids)
    assert got.shape == (2, 4, 80) and torch.equal(got, want)
    assert torch.equal(embedding_rows(qt, torch.tensor(5)), qt.dequantize()[5])  # a 0-d id
    sub = select_rows(qt, torch.tensor([9, 2]))
    assert sub.shape == (2, 80) and torch.equal(sub.dequantize(), qt.dequantize()[[9, 2]])
    assert torch.equal(embedding_rows(qt, ids, torch.bfloat16), qt.dequantize(torch.bfloat16)[ids])


def test_module_matches_nn_embedding_of_the_decoded_table():
    qt = encode(_table(), UniformConfig(bits=4, group_size=32, symmetric=False))
    emb = QuantEmbedding(qt, padding_idx=0)
    dense = nn.Embedding.from_pretrained(qt.dequantize())
    ids = torch.randint(0, 50, (3, 17))
    assert torch.equal(emb(ids), dense(ids))
    assert (emb.num_embeddings, emb.embedding_dim, emb.padding_idx) == (50, 80, 0)
    assert set(emb.state_dict()) == {"weight_codes", "weight_scale", "weight_zero"}
    with pytest.raises(IndexError):
        emb(torch.tensor([50]))


def test_embed_scale_like_gemma():
    qt = encode(_table(), UniformConfig(bits=8, group_size=64))
    emb = QuantEmbedding(qt, embed_scale=torch.tensor(80 ** 0.5))
    ids = torch.tensor([1, 2, 3])
    assert torch.equal(emb(ids), qt.dequantize()[ids] * torch.tensor(80 ** 0.5))
    assert "embed_scale" not in emb.state_dict()  # non-persistent, as in Gemma


@pytest.mark.parametrize("config", [LutConfig(lut="nf4", block_size=16, double_quant=True),
                                    TrellisConfig(bits=2)], ids=["nf4-double-quant", "trellis"])
def test_formats_not_decodable_row_by_row_are_refused(config):
    qt = encode(torch.randn(32, 64), config)
    with pytest.raises(ValueError, match="cannot be decoded row by row"):
        check_row_local(qt)
    with pytest.raises(ValueError, match="cannot be decoded row by row"):
        QuantEmbedding(qt)


def test_tied_head_shares_the_packed_table():
    qt = encode(_table(), UniformConfig(bits=8, group_size=64, symmetric=True, clip_search=False))
    emb = QuantEmbedding(qt)
    head = TiedQuantLinear(emb)
    x = torch.randn(2, 5, 80)
    assert torch.equal(head(x), nn.functional.linear(x, qt.dequantize()))
    assert all(a is b for a, b in zip(head.qweight.data.values(), emb.qweight.data.values()))
    assert dict(head.named_buffers()) == {} and dict(head.state_dict()) == {} and list(head.children()) == []
    both = nn.ModuleDict({"emb": emb, "head": head})
    assert len(both.state_dict()) == 2  # codes and scale, once
    clone = copy.deepcopy(both)
    assert clone["head"].source is clone["emb"]
    # one view of the packed tensor while its buffers are unchanged: a kernel's repack cached on it is shared
    assert head.qweight is emb.qweight is head.qweight
    view = emb.qweight
    both.to(torch.float64)  # new scale tensors: a new view, and the head follows
    assert emb.qweight is not view and head.qweight is emb.qweight and emb.qweight.data["scale"].dtype == torch.float64
    assert (head.out_features, head.in_features) == (50, 80)
    with pytest.raises(TypeError):
        TiedQuantLinear(nn.Embedding(4, 4))
