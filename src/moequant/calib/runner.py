"""Layer-by-layer calibration: feed the calibration batches through the decoder one layer at a time.

1. ``capture``: every decoder layer is swapped for a catcher and the model is run once per batch; the
   catcher of layer 0 keeps the hidden states entering the decoder, and every catcher keeps the
   keyword arguments its layer is called with (attention mask, position embeddings... — per layer,
   since e.g. Gemma3 alternates sliding and full attention), then passes the hidden states through
   unchanged; the last catcher stops the forward, so the final norm and the head never run.
2. ``run(i)``: the batches go through layer ``i`` alone — once under a ``LayerCapture`` to accumulate
   its Hessians, and once more after it has been quantized, to produce the inputs of layer ``i + 1``
   (so each layer is calibrated on what the already-quantized layers before it really produce).

The hidden states of all batches are held in memory (``samples x seqlen x hidden`` in the model's
dtype) or, with ``spill_dir``, in files read back one batch at a time. ``save_inputs`` /
``load_inputs`` copy them bit for bit to and from a directory (``quantize --resume``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from moequant.errors import MoequantError
from moequant.models.adapters import ModelAdapter, decoder_layers

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer ``index`` while the inputs are captured."""

    def __init__(self, index: int, wrapped: nn.Module, runner: "LayerwiseRunner") -> None:
        super().__init__()
        self.index = index
        self.__dict__["_wrapped"] = wrapped
        self.__dict__["_runner"] = runner

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_wrapped"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TypeError(f"decoder layer {self.index} called with positional arguments beyond the hidden "
                            "states; moequant's runner supports transformers v5 keyword calls only")
        runner = self.__dict__["_runner"]
        runner._record(self.index, hidden_states, kwargs)
        if self.index == len(runner.layers) - 1:
            raise _Stop  # the final norm and the head are not needed
        return hidden_states


class LayerwiseRunner:
    """Holds the hidden states entering the current layer for every calibration batch."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, tokens: torch.Tensor, batch_size: int = 8,
                 spill_dir: Path | None = None, embed_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 device: torch.device | str = "cpu") -> None:
        """``embed_fn``: token ids ``[B, L]`` -> input embeddings ``[B, L, H]``, for a model whose
        embedding table is not loaded (streaming); the model then runs from ``inputs_embeds``."""
        self.model = model
        self.embed_fn = embed_fn
        self.device = torch.device(device)
        self.layers = decoder_layers(model, adapter)
        self.batches = list(tokens.split(batch_size))  # [B, L] each
        self.spill_dir = spill_dir
        self.inputs: list[Any] = []  # per batch: [B, L, H] tensor, or (file, shape, dtype) when spilled
        self._generation = 0
        self.kwargs: list[dict[int, dict[str, Any]]] = [{} for _ in self.layers]  # per layer, by batch size
        self._capture()

    def _record(self, index: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        b = hidden.shape[0]
        if b not in self.kwargs[index]:
            self.kwargs[index][b] = {k: v for k, v in kwargs.items() if k != "past_key_values"}
        if index == 0:
            self.inputs.append(self._store(hidden.detach(), len(self.inputs)))

    def _capture(self) -> None:
        originals = list(self.layers)
        try:
            for i, layer in enumerate(originals):
                self.layers[i] = _Catcher(i, layer, self)
            with torch.no_grad():
                for batch in self.batches:
                    ids = batch.to(self.device)
                    inputs = {"input_ids": ids} if self.embed_fn is None else {"inputs_embeds": self.embed_fn(ids)}
                    try:
                        self.model(**inputs, use_cache=False)
                    except _Stop:
                        pass
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer

    def _store(self, t: torch.Tensor, j: int) -> Any:
        """Keep batch ``j``'s hidden states: the tensor itself, or (spilled) a file and its shape."""
        if self.spill_dir is None:
            return t
        # two generations of files: the inputs being read are never the files being written
        path = Path(self.spill_dir) / f"act_{self._generation % 2}_{j}.bin"
        t = t.contiguous().cpu()
        t.view(-1).view(torch.uint8).numpy().tofile(path)
        return (path, tuple(t.shape), t.dtype)

    def hidden(self, j: int) -> torch.Tensor:
        """Hidden states ``[B, L, H]`` entering the current layer for batch ``j``."""
        return self._fetch(j)

    def _fetch(self, j: int) -> torch.Tensor:
        x = self.inputs[j]
        if isinstance(x, torch.Tensor):
            return x
        path, shape, dtype = x
        raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
        return raw.view(dtype).view(shape)

    @property
    def tokens(self) -> int:
        return sum(int(b.numel()) for b in self.batches)

    def run(self, index: int, keep_outputs: bool) -> None:
        """Run every batch through layer ``index``; with ``keep_outputs`` the outputs become the inputs
        of the next layer."""
        layer = self.layers[index]
        outs = []
        self._generation += 1 if keep_outputs else 0
        with torch.no_grad():
            for j in range(len(self.inputs)):
                x = self._fetch(j).to(self.device)
                y = layer(x, **self.kwargs[index][x.shape[0]])
                if isinstance(y, tuple):
                    y = y[0]
                if keep_outputs:
                    outs.append(self._store(y.detach(), j))
        if keep_outputs:
            self.inputs = outs

    def save_inputs(self, directory: Path) -> list[dict[str, Any]]:
        """Write the hidden states entering the current layer as raw files ``act_<j>.bin`` in
        ``directory`` (one batch in memory at a time, fsynced); returns what ``load_inputs`` needs."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        spec = []
        for j in range(len(self.inputs)):
            t = self._fetch(j).contiguous().cpu()  # [B, L, H]
            name = f"act_{j}.bin"
            with open(directory / name, "wb") as f:
                t.view(-1).view(torch.uint8).numpy().tofile(f)
                f.flush()
                os.fsync(f.fileno())
            spec.append({"file": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")})
        return spec

    def load_inputs(self, directory: Path, spec: list[dict[str, Any]]) -> None:
        """Make the hidden states written by ``save_inputs`` the inputs of the next ``run``."""
        if len(spec) != len(self.batches):
            raise MoequantError(f"{directory}: {len(spec)} saved activation batches, the calibration has "
                             f"{len(self.batches)}")
        self._generation += 1  # never write over files still being read
        inputs = []
        for j, s in enumerate(spec):
            dtype, shape = getattr(torch, s["dtype"]), tuple(s["shape"])
            raw = torch.from_numpy(np.fromfile(Path(directory) / s["file"], dtype=np.uint8))
            if raw.numel() != int(np.prod(shape)) * dtype.itemsize:
                raise MoequantError(f"{Path(directory) / s['file']}: {raw.numel()} bytes, expected {shape} {dtype}")
            inputs.append(self._store(raw.view(dtype).view(shape), j))
        self.inputs = inputs
