"""What a GGUF export reads: a moequant checkpoint (packed tensors read straight from its shards, their
metadata and digests checked) or a float model (zoo alias, Hugging Face directory, ``.gguf`` file, hub id,
loaded by transformers in float32). Both give in-memory tensor names, the model config and the tokenizer
with a directory holding its files."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from moequant.errors import MoequantError
from moequant.formats.base import QuantizedTensor


@dataclass
class ModelSource:
    """spec: as given; is_run: a moequant checkpoint; hparams: the model's config (``config.json``);
    names: the tensors to write, in decoder order, tied duplicates left out (``tied``: dropped -> kept);
    packed: the packed ones; read(name): a float tensor in its stored dtype, info(name): its (shape, dtype)
    without reading it; tokenizer and the directory
    of its files; card_dir: where general.* metadata is read from (``gguf.Metadata``)."""

    spec: str
    is_run: bool
    hparams: dict[str, Any]
    names: list[str]
    packed: dict[str, QuantizedTensor]
    read: Callable[[str], torch.Tensor]
    info: Callable[[str], tuple[tuple[int, ...], torch.dtype]]
    tokenizer: Any
    tokenizer_dir: Path
    card_dir: Path | None
    tied: dict[str, str] = field(default_factory=dict)
    model: Any = None  # float models: the transformers model (calibration statistics run it)


def _natural(name: str) -> tuple:
    """Sort key putting ``layers.10`` after ``layers.9``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


@contextlib.contextmanager
def open_source(spec: str) -> Iterator[ModelSource]:
    """The model ``spec`` as a ``ModelSource`` (a temporary directory holds the tokenizer files of a model
    that has no local directory; removed on exit)."""
    from moequant.fsutil import temp_dir
    from moequant.models.loader import resolve_model_spec

    r = resolve_model_spec(spec)
    if r.kind == "moequant":
        yield _run_source(spec, Path(r.path))
        return
    with contextlib.ExitStack() as stack:
        yield _float_source(spec, r, stack.enter_context(temp_dir()))


def _run_source(spec: str, path: Path) -> ModelSource:
    from moequant.formats.checkpoint import ShardReader, read_config, read_packed, read_quantization_config
    from moequant.models.loader import ResolvedModel, load_tokenizer

    qcfg = read_quantization_config(path)
    reader = ShardReader(path)
    packed = {name: read_packed(reader, name, meta) for name, meta in qcfg["tensors"].items()}
    data_keys = {f"{name}_{d}" for name, qt in packed.items() for d in qt.data}
    tied = dict(qcfg.get("tied", {}))
    floats = [k for k in reader.keys() if k not in data_keys and k not in tied]
    hparams = {k: v for k, v in read_config(path).items() if k != "quantization_config"}
    tok = load_tokenizer(ResolvedModel(spec, "moequant", str(path)))
    if tok is None:
        raise MoequantError(f"{path}: no tokenizer files; a GGUF file needs the tokenizer")
    return ModelSource(spec, True, hparams, sorted([*packed, *floats], key=_natural), packed,
                       lambda name: reader.read(name), lambda name: reader.info(name), tok, path, path, tied)


def _float_source(spec: str, r: Any, tmp: Path) -> ModelSource:
    from moequant.models.loader import load_model, read_model_config

    model, tok, _ = load_model(spec)  # float32
    if tok is None:
        raise MoequantError(f"{spec}: no tokenizer; a GGUF file needs the tokenizer")
    local = r.kind in ("alias", "dir")
    if local:
        hparams, tok_dir = read_model_config(r.path), Path(r.path)
    else:  # a hub id: the config and tokenizer files as transformers has them
        hparams, tok_dir = model.config.to_dict(), tmp
        tok.save_pretrained(tmp)
    state = model.state_dict()
    seen: dict[tuple[int, int], str] = {}
    names, tied = [], {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        names.append(name)
    return ModelSource(spec, False, hparams, sorted(names, key=_natural), {}, lambda name: state[name],
                       lambda name: (tuple(state[name].shape), state[name].dtype), tok, tok_dir,
                       Path(r.path) if local else None, tied, model)
