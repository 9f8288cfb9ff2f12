"""Calibration Hessian diagonals as a llama.cpp importance matrix (``llama-quantize --imatrix F``).

The file is the GGUF imatrix format that llama.cpp's ``llama-imatrix`` writes and its loader reads
(``common/imatrix-loader.cpp``; the legacy ``.dat`` binary is only read for old files): ``general.type =
"imatrix"``, keys ``imatrix.datasets`` (strings), ``imatrix.chunk_count`` and ``imatrix.chunk_size``
(uint32; the loader refuses a file without all three), and for every weight ``W`` of the GGUF model two
F32 tensors: ``W.in_sum2`` ``[n_mat, K]`` = the sum over calibration tokens of each input column squared,
per expert for a 3-D expert tensor (``n_mat = 1`` otherwise), and ``W.counts`` ``[n_mat, 1]`` = the
tokens summed. ``llama-quantize`` divides one by the other: the diagonal of the Hessian ``H = E[x xᵀ]`` that
moequant's quantizer uses, routing-conditioned per expert.

The statistics are those of moequant's calibration (``calib.runner.LayerwiseRunner`` and
``calib.capture.LayerCapture``: the same windows, the same per-expert routing as ``quantize --calib``) on
the float model, layer by layer. A checkpoint keeps no Hessians, so it gets no imatrix here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import torch
from torch import nn

from moequant.calib.hessian import ExpertHessianStat


def hessian_diagonals(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{target name: (Σ x_k² [n_mat, K] float64, tokens [n_mat] int64)}`` for every quantizable weight of
    the float ``model`` (``models.adapters.iter_targets``), over the calibration windows ``tokens``
    ``[S, L]``; the layers run one at a time on the outputs of the previous (unquantized) ones."""
    from moequant.calib.float_pass import float_layer_stats

    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for _, stats in float_layer_stats(model, tokens, batch_size):
        for name, stat in stats.items():
            if isinstance(stat, ExpertHessianStat):
                sums = torch.diagonal(stat.xtx, dim1=-2, dim2=-1)  # [E, K]
                out[name] = (sums.clone(), stat.counts.clone())
            else:
                sums = torch.diagonal(stat.xtx)[None]  # [1, K]
                out[name] = (sums.clone(), torch.tensor([stat.count]))
    return out


def imatrix_entries(diagonals: dict[str, tuple[torch.Tensor, torch.Tensor]], places: list[Any]
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Keyed by GGUF weight name: the ``gate`` and ``up`` halves of a fused expert tensor share its input, so
    both get its statistic; Q/K row reordering permutes outputs, not the input columns the sums are over."""
    return {p.gguf_name: diagonals[p.source] for p in places if p.source in diagonals}


def write_imatrix(path: Path, arch: str, entries: dict[str, tuple[torch.Tensor, torch.Tensor]], dataset: str,
                  chunk_count: int, chunk_size: int) -> None:
    """The imatrix file (see the module docstring), written atomically."""
    from gguf.gguf_writer import WriterState

    from moequant.fsutil import atomic_file

    w = gguf.GGUFWriter(None, arch)
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_array("imatrix.datasets", [dataset])
    w.add_uint32("imatrix.chunk_count", int(chunk_count))
    w.add_uint32("imatrix.chunk_size", int(chunk_size))
    for name, (sums, counts) in entries.items():
        w.add_tensor(f"{name}.in_sum2", sums.to(torch.float32).numpy())  # [n_mat, K]
        w.add_tensor(f"{name}.counts", counts.to(torch.float32).reshape(-1, 1).numpy())  # [n_mat, 1] as llama.cpp
    with atomic_file(path) as f:
        w.fout, w.state = [f], WriterState.EMPTY  # gguf-py's writer on our temp file
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.fout = None
