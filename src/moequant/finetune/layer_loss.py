"""Layer-wise distillation (``moequant finetune --loss layer``): each trained decoder layer of the student is
fed the teacher's input to that layer and matched to the teacher's output of it.

    L = mean over layers i of  ‖f_i^student(x_i) − y_i‖² / ‖y_i‖²,    x_i, y_i = the teacher's input / output of layer i

(token sums over the batch; the teacher runs once per step without a graph). Because every layer starts from
the teacher's hidden state, no gradient crosses from one layer to another: each layer's packed tensors and
norms learn to reproduce their own unquantized layer, as in QuIP#/QTIP's per-block fine-tuning, and the final
norm and head take no part. The model runs only as far as the last layer in the set, and the student's layers
outside the set before it do not compute at all (``_skipped``): their outputs would be replaced by the teacher's
input to the next trained layer anyway.

The layers' other arguments (mask, position embeddings, ...) are the ones the student's own forward passes;
its hidden state is swapped for the teacher's by a pre-hook, which reads it positionally or as
``hidden_states=``, whichever the architecture uses.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from moequant.models.adapters import adapter_for, decoder_layers


class _Stop(Exception):
    """Raised after the last layer of the set: the rest of the model is not needed."""


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def _hooks(model: nn.Module, indices: tuple[int, ...], pre, post) -> Iterator[None]:
    layers = decoder_layers(model, adapter_for(model))
    handles = []
    try:
        for i in indices:
            if pre is not None:
                handles.append(layers[i].register_forward_pre_hook(pre(i), with_kwargs=True))
            handles.append(layers[i].register_forward_hook(post(i)))
        yield
    finally:
        for h in handles:
            h.remove()


def _run_until(model: nn.Module, ids: torch.Tensor) -> None:
    try:
        model(ids, use_cache=False)
    except _Stop:
        pass


def teacher_targets(teacher: nn.Module, ids: torch.Tensor, indices: tuple[int, ...]
                    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{i: (x_i, y_i)}``: the teacher's input and output hidden states ``[b, L, H]`` of decoder layers
    ``indices`` (sorted) on ``ids [b, L]``, without a graph."""
    got: dict[int, list[torch.Tensor]] = {}
    last = indices[-1]

    def pre(i):
        def hook(_m, args, kwargs):
            got[i] = [_hidden(args, kwargs).detach()]
        return hook

    def post(i):
        def hook(_m, _args, out):
            got[i].append(_output(out).detach())
            if i == last:
                raise _Stop
        return hook

    with torch.no_grad(), _hooks(teacher, indices, pre, post):
        _run_until(teacher, ids)
    return {i: (x, y) for i, (x, y) in got.items()}


def _returns_tensor(layer: nn.Module) -> bool:
    """The layer's ``forward`` is declared to return the hidden state itself (transformers 5's decoder layers,
    except those annotated otherwise): a pass-through may stand in for it."""
    return inspect.signature(type(layer).forward).return_annotation is torch.Tensor


@contextmanager
def _skipped(model: nn.Module, indices: tuple[int, ...]) -> Iterator[None]:
    """Decoder layers before ``indices[-1]`` and not in ``indices`` return their hidden-state input unchanged
    instead of computing (their output is overwritten by the next trained layer's pre-hook). A layer whose
    ``forward`` is not declared to return a tensor runs as usual (a stand-in could not match a tuple output)."""
    layers = decoder_layers(model, adapter_for(model))
    keep = set(indices)
    swapped = [layers[i] for i in range(indices[-1]) if i not in keep and _returns_tensor(layers[i])]
    own = [layer.__dict__.get("forward") for layer in swapped]  # an instance forward (e.g. a hook library's), or None
    try:
        for layer in swapped:
            layer.forward = lambda *args, **kwargs: _hidden(args, kwargs)  # instance attribute: shadows the class's
        yield
    finally:
        for layer, fwd in zip(swapped, own):
            if fwd is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = fwd


def layer_loss(student: nn.Module, ids: torch.Tensor, targets: dict[int, tuple[torch.Tensor, torch.Tensor]]
               ) -> torch.Tensor:
    """The mean over the layers of ``targets`` of ``‖f_i(x_i) − y_i‖² / ‖y_i‖²`` (float32 sums, a scalar with
    the graph of each student layer on its own input ``x_i``)."""
    indices = tuple(sorted(targets))
    last = indices[-1]
    terms: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(_m, args, kwargs):
            x = targets[i][0]
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}
        return hook

    def post(i):
        def hook(_m, _args, out):
            y = targets[i][1].float()
            terms[i] = (_output(out).float() - y).pow(2).sum() / y.pow(2).sum()
            if i == last:
                raise _Stop
        return hook

    with _hooks(student, indices, pre, post), _skipped(student, indices):
        _run_until(student, ids)
    return torch.stack([terms[i] for i in indices]).mean()


def trained_layers(model: nn.Module, layers: tuple[int, ...] | None) -> tuple[int, ...]:
    """The decoder layers a layer-wise loss covers: ``layers`` (``--layers``), else every layer."""
    return tuple(layers) if layers is not None else tuple(range(len(decoder_layers(model, adapter_for(model)))))
