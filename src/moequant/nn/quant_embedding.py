"""Packed input embeddings and a head that shares them.

- ``QuantEmbedding``: an embedding table stored packed (``weight_*`` buffers, like ``QuantLinear``); a
  lookup decodes only the distinct rows the ids name (``embedding_rows``), never the whole table.
- ``TiedQuantLinear``: the output head of a model whose head *is* its embedding table
  (``tie_word_embeddings``): a ``QuantLinear`` that computes from the packed tensor of its
  ``QuantEmbedding`` and holds no buffer of its own, so ``state_dict()``, ``.to()`` and the checkpoint
  see one copy of the table.

Only formats whose every data tensor is indexed by the row first (codes, scales and zero points of a
row stored in that row) can be looked up row by row: ``ROW_LOCAL_FORMATS``.
"""

from __future__ import annotations

import torch
from torch import nn

from moequant.formats.base import QuantizedTensor
from moequant.nn.packed import cached_packed_tensor, clear_packed_cache, register_packed
from moequant.nn.quant_linear import QuantLinear

# Formats whose data tensors are all [N, ...] with row n's codes, scales and zero points in row n, and whose
# decode of a row reads nothing else: a row slice of each data tensor is that row's packed tensor.
# (``gguf-*``: ``blocks [N, row bytes]``, each row's GGUF blocks; ``formats.kquant``.)
ROW_LOCAL_FORMATS: tuple[str, ...] = ("uniform-packed", "uniform-asym-packed", "lut4-packed", "gguf-q2_k", "gguf-q3_k",
                                      "gguf-q4_k", "gguf-q5_k", "gguf-q6_k", "gguf-q4_0", "gguf-q5_0", "gguf-q5_1",
                                      "gguf-q8_0", "gguf-iq4_nl")


def check_row_local(qt: QuantizedTensor | type[QuantizedTensor]) -> None:
    """``ValueError`` unless ``qt``'s format can be decoded row by row."""
    if qt.format_id not in ROW_LOCAL_FORMATS:
        raise ValueError(f"format {qt.format_id!r} cannot be decoded row by row (embeddings take "
                         f"{', '.join(ROW_LOCAL_FORMATS)})")


def select_rows(qt: QuantizedTensor, rows: torch.Tensor) -> QuantizedTensor:
    """The packed tensor ``[len(rows), K]`` of rows ``rows [R]`` (int64) of the 2-D row-local ``qt [N, K]``:
    each data tensor indexed by row, no decoding."""
    check_row_local(qt)
    return type(qt)((int(rows.numel()), qt.shape[-1]), {n: t[rows] for n, t in qt.data.items()}, dict(qt.attrs))


def embedding_rows(qt: QuantizedTensor, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``qt [V, H]`` looked up at ``ids [...]`` -> ``[..., H]`` in ``dtype``: each distinct id's row decoded
    once, bit for bit what ``qt.dequantize(dtype)[ids]`` holds (the decode is elementwise within a row)."""
    flat = ids.reshape(-1)  # [T]
    if torch.compiler.is_compiling():  # unique's size depends on the data: decode every id's row (same bits)
        return select_rows(qt, flat).dequantize(dtype).reshape(*ids.shape, qt.shape[-1])
    uniq, inverse = torch.unique(flat, return_inverse=True)  # [U], [T]
    rows = select_rows(qt, uniq).dequantize(dtype)  # [U, H]
    return rows[inverse].reshape(*ids.shape, qt.shape[-1])  # [..., H]


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` computed from a packed ``weight [V, H]``: ``forward(ids [...]) -> [..., H]`` in
    ``dtype``, times ``embed_scale`` when the replaced embedding had one (Gemma's scaled embeddings: a
    non-persistent buffer, as there)."""

    def __init__(self, qweight: QuantizedTensor, embed_scale: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, padding_idx: int | None = None) -> None:
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(f"QuantEmbedding needs a 2-D table, got {qweight.shape}")
        check_row_local(qweight)
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.out_dtype = dtype
        register_packed(self, "weight", qweight)
        if embed_scale is not None:
            self.register_buffer("embed_scale", embed_scale.detach().clone(), persistent=False)  # [] scalar
        else:
            self.embed_scale = None

    @property
    def qweight(self) -> QuantizedTensor:
        # one view while the buffers are unchanged: a fast kernel's repack cached on it serves a tied head
        return cached_packed_tensor(self, "weight")

    def _apply(self, fn, recurse: bool = True):
        clear_packed_cache(self)  # the cached view belongs to the old tensors
        return super()._apply(fn, recurse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = embedding_rows(self.qweight, ids, self.out_dtype)  # [..., H]
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(self.out_dtype)
        return out

    def extra_repr(self) -> str:
        q = self.qweight
        return f"{self.num_embeddings}, {self.embedding_dim}, {q.format_id}, {q.bits_per_weight():.3f} bpw"


class TiedQuantLinear(QuantLinear):
    """The head ``y = x Ŵᵀ + b`` over the packed table of ``source`` (a ``QuantEmbedding``, ``Ŵ [V, H]``).
    ``source`` is referenced, not registered as a submodule: its buffers stay its own."""

    def __init__(self, source: QuantEmbedding, bias: torch.Tensor | None = None) -> None:
        nn.Module.__init__(self)
        if not isinstance(source, QuantEmbedding):
            raise TypeError(f"TiedQuantLinear shares a QuantEmbedding, got {type(source).__name__}")
        self.__dict__["_source"] = source
        self.out_features, self.in_features = source.qweight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def source(self) -> QuantEmbedding:
        return self.__dict__["_source"]

    @property
    def qweight(self) -> QuantizedTensor:
        return self.source.qweight

    def extra_repr(self) -> str:
        return super().extra_repr() + ", tied to the input embeddings"
