"""Kept tables found again, bit for bit, in the model's source GGUF file, and stored in its block type.

Every zoo model is converted from a GGUF file, and so is any ``.gguf`` a user passes: their embedding and head
tables are the GGUF's blocks decoded to float32. ``embed_head.with_exact_grids`` stores a kept table packed when
its values lie on one of the group-32 grids it can prove from the floats alone (``Q4_0`` / ``Q5_0`` / ``Q8_0``);
the K-quant tables of ``Q4_K_M`` files (Qwen2.5-Coder-1.5B: ``token_embd`` Q4_K, ``output`` Q6_K) cannot be
proved that way (a two-level scale is not recoverable from the values), so here the source's own bytes are taken
(``exact_gguf_table``): the GGUF tensor of the table's role (``TABLE_NAMES``), in one of the block types moequant
stores (``formats.kquant.GGUF_CLASSES``), becomes a ``gguf-<type>`` packed tensor, and is used only if decoding
it gives the loaded table exactly (compared row chunk by row chunk). Anything else (no source GGUF, another
type, a shape or value mismatch) leaves the table as it was: kept in float.

At run time such a table costs what its format does: an embedding is looked up row by row from the blocks
(``QuantEmbedding``) and a head is multiplied from its blocks by the GGUF kernel (``kernels.gguf``: the same
values, products summed in another order). Only where that kernel is not available (no C++ extension) does
``decode_slow_tables`` mark the head to be decoded once, at its first call, into float32 kept beside the blocks,
and multiplied with ``F.linear`` (on disk 6.56 instead of 32 bits per weight, in memory the blocks plus the
decoded copy) instead of being decoded again at every call.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# The GGUF tensor holding each table (llama.cpp's names; every architecture moequant reads uses these two).
TABLE_NAMES = {"embedding": "token_embd.weight", "head": "output.weight"}
# Rows decoded at a time when comparing with the loaded table (bounds the float32 temporaries to ~64 MiB).
_CHECK_FLOATS = 1 << 24


def source_gguf(resolved: Any) -> Path | None:
    """The GGUF file a resolved model spec (``models.loader.ResolvedModel``) was converted from: a ``.gguf``
    spec itself, a GGUF zoo alias's cached file, or that file for the alias's converted directory given by path
    (``<cache>/models/<alias>/hf``); None for anything else."""
    from moequant.zoo.fetch import cache_root
    from moequant.zoo.models import GGUF_MODELS, cached_gguf_path

    if getattr(resolved, "gguf_file", None):
        return Path(resolved.path) / resolved.gguf_file
    kind = getattr(resolved, "kind", None)
    if kind == "alias":
        spec = GGUF_MODELS.get(resolved.spec)
    elif kind == "dir":
        models = (cache_root() / "models").resolve()
        here = Path(resolved.path).resolve()
        spec = next((s for s in GGUF_MODELS.values() if here == models / s.alias / "hf"), None)
    else:
        spec = None
    if spec is None:
        return None
    path = cached_gguf_path(spec)
    return path if path.is_file() else None


def exact_gguf_table(weight: torch.Tensor, gguf: Path, role: str):
    """The ``gguf-<type>`` packed tensor holding exactly ``weight [N, K]`` (float32) as the GGUF file ``gguf``
    stores the table of ``role`` (``"embedding"`` / ``"head"``), or None when it does not (see the module doc)."""
    from gguf import GGUFReader

    from moequant.codecs.kquant import stored_type
    from moequant.formats.kquant import GGUF_CLASSES

    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.is_meta or not weight.is_cpu:
        return None
    try:
        reader = GGUFReader(str(gguf))
    except (OSError, ValueError) as e:
        log.debug("%s: not read (%s)", gguf, e)
        return None
    t = next((t for t in reader.tensors if t.name == TABLE_NAMES[role]), None)
    if t is None:
        return None
    n, k = weight.shape
    cls = GGUF_CLASSES.get(t.tensor_type.name.lower())
    if cls is None or [int(d) for d in t.shape] != [k, n] or stored_type(cls.ggml.name, k).name != cls.ggml.name:
        return None  # a type we do not store, another shape, or rows whose width the type does not divide
    blocks = torch.from_numpy(t.data.copy())  # [N, K / block * block_bytes] uint8: each row's blocks
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[0] != n:
        return None
    qt = cls((n, k), {"blocks": blocks}, {"qtype": cls.ggml.name})
    try:
        qt.check_data()  # the bytes per row the type implies for K
    except ValueError:
        return None
    step = max(1, _CHECK_FLOATS // max(1, k))
    for r0 in range(0, n, step):
        rows = cls((min(step, n - r0), k), {"blocks": blocks[r0:r0 + step]}, dict(qt.attrs))
        if not torch.equal(rows.dequantize(torch.float32), weight[r0:r0 + step]):
            log.debug("%s: %s differs from the loaded table from row %d on", gguf, t.name, r0)
            return None
    return qt


def decode_slow_tables(model: nn.Module) -> list[str]:
    """Mark every packed head over a GGUF block table (``gguf-*``) that the GGUF kernel cannot multiply here (no
    extension, a type it does not decode) to be decoded once and multiplied in float32
    (``QuantLinear.keep_decoded``); -> the names of the modules marked."""
    from moequant.kernels import gguf as gguf_kernels
    from moequant.nn.quant_linear import QuantLinear

    marked = []
    head = getattr(model, "get_output_embeddings", lambda: None)()
    for name, module in model.named_modules():
        if (module is head and isinstance(module, QuantLinear) and module.qweight.format_id.startswith("gguf-")
                and not gguf_kernels.applies(module.qweight)):
            module.keep_decoded = True
            marked.append(name)
    return marked
