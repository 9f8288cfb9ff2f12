"""Calibration statistics of a float model, layer by layer: each decoder layer runs once on the previous
(unquantized) layers' outputs with ``LayerCapture`` on its targets — the windows and per-expert routing of
``quantize --calib``, without quantizing anything. Used by the llama.cpp imatrix export and by benchmarks that
need real Hessians."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def float_layer_stats(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8, upto: int | None = None
                      ) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(layer index, {target name: HessianStat | ExpertHessianStat})`` for every decoder layer of the float
    ``model`` (the first ``upto + 1`` when given), over the calibration windows ``tokens [S, L]``; one forward per
    layer, whose outputs feed the next."""
    from moequant.calib.capture import LayerCapture
    from moequant.calib.runner import LayerwiseRunner
    from moequant.models.adapters import adapter_for, decoder_layers, iter_targets

    adapter = adapter_for(model)
    targets = list(iter_targets(model, adapter))
    runner = LayerwiseRunner(model, adapter, tokens, batch_size=batch_size)
    for i, layer in enumerate(decoder_layers(model, adapter)):
        if upto is not None and i > upto:
            return
        mine = [t for t in targets if t.layer == i]
        with LayerCapture(layer, f"{adapter.layers}.{i}", mine, adapter) as cap:
            runner.run(i, keep_outputs=True)
        yield i, cap.result()
