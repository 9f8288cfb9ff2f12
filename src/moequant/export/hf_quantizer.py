"""transformers' ``from_pretrained`` for moequant checkpoints: ``quant_method: "moequant"``.

``register()`` (run by ``import moequant``, see ``export.hf_hook``) adds ``MoequantConfig`` and
``MoequantHfQuantizer`` to transformers' registry. ``AutoModelForCausalLM.from_pretrained(run_dir)`` then:

1. builds the model on the meta device (transformers);
2. ``_process_model_before_weight_loading``: reads ``quantization_config`` from the checkpoint's
   ``config.json`` (its seal checked), swaps in the same packed modules ``moequant.load`` builds
   (``api.swap_packed_modules``, fed by ``_HeaderReader``: meta tensors of exactly the stored shapes and
   dtypes, from the safetensors headers), and checks the rest against the headers before a byte is read —
   a tensor the model lacks, one of another shape, one the checkpoint lacks: a one-line ``MoequantError``
   naming it;
3. transformers loads every stored tensor into the buffer or parameter of the same name, in its stored
   dtype (``get_new_dtype`` -> None: no cast, as ``moequant.load`` assigns them);
4. ``_process_model_after_weight_loading``: ties the dense pairs ``quantization_config.tied`` names,
   restores scaled embeddings' ``embed_scale``, fails if anything is left on the meta device, checks
   every loaded tensor's SHA-256 against the index (``ShardReader.check_digest``), and finishes as
   ``moequant.load`` does (``api.finish_loaded``).

The result is bit for bit the model ``moequant.load`` returns: same tensors, same logits. ``dtype=`` does
not recast stored tensors (a warning says so when it differs). ``save_pretrained`` writes the packed
tensors under their own names and ``quantization_config`` unchanged (its seal still holds); transformers'
index carries no digests, so the copy loads unverified (with a warning) — ``moequant.save`` writes them.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from moequant.errors import MoequantError
from moequant.formats.checkpoint import QUANT_METHOD, ShardReader

log = logging.getLogger(__name__)


class MoequantConfig(QuantizationConfigMixin):
    """``quantization_config`` of a moequant checkpoint, kept verbatim: ``to_dict()`` is every key as read
    (``formats.checkpoint`` documents them), so ``save_pretrained`` writes it back unchanged."""

    def __init__(self, quant_method: str = QUANT_METHOD, **fields: Any) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"MoequantConfig: quant_method {quant_method!r} is not {QUANT_METHOD!r}")
        self.quant_method = QUANT_METHOD
        self.fields = fields

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, **copy.deepcopy(self.fields)}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()


@dataclass
class _Pending:
    """What the first hook learns about one checkpoint and the second one needs."""

    path: Path
    qcfg: dict[str, Any]
    reader: ShardReader
    tied: dict[str, str]  # dense tied pairs {dropped: kept} left to tie
    embed_scales: dict[str, tuple[float, torch.dtype]]  # QuantEmbedding module -> (embed_scale, its dtype)


class MoequantHfQuantizer(HfQuantizer):
    """Loader-only: a moequant checkpoint in, the packed model ``moequant.load`` builds out."""

    requires_calibration = True

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        if not kwargs.get("pre_quantized", True):
            raise MoequantError("quant_method 'moequant' only loads checkpoints written by moequant (its config.json "
                                "has no moequant quantization_config); quantize with `moequant quantize MODEL --out "
                                "DIR`, then load DIR")
        super().__init__(quantization_config, **kwargs)
        self.requested_dtype: torch.dtype | None = None
        self._pending: _Pending | None = None

    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise MoequantError("moequant checkpoints do not load with disk offload (device_map places modules on "
                                "'disk'); the packed model is loaded whole")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        self.requested_dtype = dtype
        return dtype

    def get_new_dtype(self, converter: Any, param: Any, dtype: torch.dtype | None) -> torch.dtype | None:
        return None  # every tensor keeps its stored dtype, as moequant.load assigns it

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        from moequant.checkpoint_io import swap_packed_modules
        from moequant.formats.checkpoint import read_quantization_config

        path = checkpoint_dir(checkpoint_files)
        qcfg = read_quantization_config(path)
        reader = ShardReader(path)
        scales = embedding_scales(model, qcfg)
        used, tied = swap_packed_modules(model, qcfg, _HeaderReader(reader), path, "meta")
        check_against_headers(model, reader, used, tied, path)
        self._warn_dtype(reader, used, path)
        self._pending = _Pending(path, qcfg, reader, tied, scales)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from moequant.checkpoint_io import finish_loaded

        p, self._pending = self._pending, None
        if p is None:
            raise MoequantError("moequant: transformers did not run the quantizer's first step before loading weights")
        for dropped, kept in p.tied.items():
            tie(model, dropped, kept)
        for name, (scale, dtype) in p.embed_scales.items():
            emb = model.get_submodule(name)
            emb.embed_scale = torch.tensor(scale, dtype=dtype, device=emb.qweight.device)
        still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if still_meta:
            raise MoequantError(f"{p.path}: tensors left on the meta device after loading: {still_meta[:5]}")
        verify_loaded(model, p.reader, p.qcfg)
        finish_loaded(model, p.qcfg, p.path)
        return model

    def _warn_dtype(self, reader: ShardReader, used: set[str], path: Path) -> None:
        """A warning when ``dtype=`` asked for something other than config.json's dtype and the kept tensors."""
        from moequant.formats.checkpoint import read_config

        stored = {dt for k in reader.keys() if k not in used for dt in [reader.info(k)[1]]
                  if dt is not None and dt.is_floating_point}
        config = read_config(path)
        in_config = config.get("dtype") or config.get("torch_dtype")
        want = self.requested_dtype
        if want is not None and stored and stored != {want} and str(want).removeprefix("torch.") != in_config:
            log.warning("%s: dtype=%s is not applied: a moequant checkpoint loads its kept tensors as stored (%s)",
                        path, want, ", ".join(sorted(str(d).removeprefix("torch.") for d in stored)))

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[None, dict[str, str]]:
        return None, {"producer": QUANT_METHOD}  # shards read as moequant's (formats.checkpoint.packed_evidence)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


class _HeaderReader:
    """A ``ShardReader`` whose ``read`` returns a meta tensor of the stored shape and dtype: the packed
    modules are built from the headers alone, checked as ``moequant.load`` checks them."""

    def __init__(self, reader: ShardReader) -> None:
        self._reader = reader
        self.path = reader.path

    def __contains__(self, key: str) -> bool:
        return key in self._reader

    def keys(self) -> list[str]:
        return self._reader.keys()

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype | None]:
        return self._reader.info(key)

    def read(self, key: str) -> torch.Tensor:
        shape, dtype = self._reader.info(key)
        if dtype is None:
            file, info, _ = self._reader.raw_location(key)
            raise MoequantError(f"{file}: tensor {key!r} has dtype {info['dtype']}, which moequant cannot read")
        return torch.empty(shape, dtype=dtype, device="meta")


def checkpoint_dir(checkpoint_files: list[str] | None) -> Path:
    """The directory holding the shards transformers resolved (a local run directory or a hub snapshot)."""
    if not checkpoint_files:
        raise MoequantError("moequant checkpoints load from their directory (safetensors shards); none was given")
    dirs = {Path(f).parent for f in checkpoint_files}
    if len(dirs) != 1 or not all(str(f).endswith(".safetensors") for f in checkpoint_files):
        raise MoequantError(f"moequant checkpoints are safetensors shards in one directory, not {checkpoint_files[:3]}")
    return dirs.pop()


def embedding_scales(model: nn.Module, qcfg: dict[str, Any]) -> dict[str, tuple[float, torch.dtype]]:
    """``{module: (scale, dtype)}`` of each scaled embedding (Gemma) about to be packed: its ``embed_scale``
    buffer is not stored, and transformers rebuilds non-persistent buffers only for modules it knows."""
    out = {}
    for name in qcfg["tensors"]:
        module_name = name.rpartition(".")[0]
        try:
            old = model.get_submodule(module_name)
        except AttributeError:
            continue  # swap_packed_modules names it
        scale = getattr(old, "embed_scale", None)
        if isinstance(old, nn.Embedding) and isinstance(scale, torch.Tensor):
            value = getattr(old, "scalar_embed_scale", None)
            if not isinstance(value, (int, float)):
                raise MoequantError(f"packed embedding {name!r}: its module {type(old).__name__} has an embed_scale "
                                    "this loader cannot rebuild (no scalar_embed_scale); use moequant.load")
            out[module_name] = (float(value), scale.dtype)
    return out


def check_against_headers(model: nn.Module, reader: ShardReader, used: set[str], tied: dict[str, str],
                          path: Path) -> None:
    """Before loading: every stored tensor names a tensor of the model, of its shape; every tensor the model
    stores is in the checkpoint or a tied name. One-line ``MoequantError`` naming the tensors otherwise."""
    state = model.state_dict(keep_vars=True)
    stored = set(reader.keys())
    unexpected = sorted(k for k in stored if k not in state)
    if unexpected:
        raise MoequantError(f"{path}: tensors the model does not have: {unexpected[:5]}")
    for k in sorted(stored - used):
        shape = reader.info(k)[0]
        if tuple(shape) != tuple(state[k].shape):
            raise MoequantError(f"{path}: tensor {k!r} is {list(shape)}, the model expects {list(state[k].shape)}")
    for dropped, kept in tied.items():
        if kept not in stored:
            raise MoequantError(f"{path}: tied tensor {dropped!r} names {kept!r}, which the checkpoint lacks")
    missing = sorted(k for k in state if k not in stored and k not in tied)
    if missing:
        raise MoequantError(f"{path}: checkpoint lacks tensors {missing[:5]}")


def tie(model: Any, dropped: str, kept: str) -> None:
    """``dropped`` becomes the very tensor ``kept`` (transformers ties only what the config says)."""
    src = model.get_parameter_or_buffer(kept)
    parent_name, _, attr = dropped.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if getattr(parent, attr, None) is not src:
        setattr(parent, attr, src)


def verify_loaded(model: nn.Module, reader: ShardReader, qcfg: dict[str, Any]) -> None:
    """Every checkpoint tensor as loaded (same name in the model, stored dtype) against its SHA-256 in the
    index: the digest ``moequant.save`` recorded, checked by the reader ``moequant.load`` uses."""
    from moequant.formats.safetensors_io import tensor_digest

    if reader.digests is None or "integrity" not in qcfg:
        log.warning("%s: no tensor digests (written by an older moequant or by save_pretrained): loaded without "
                    "verification", reader.path)
        if reader.digests is None:
            return
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    for k in reader.keys():
        reader.check_digest(k, tensor_digest(tensors[k]))


def register() -> None:
    """Add ``MoequantConfig`` / ``MoequantHfQuantizer`` to transformers' registry under ``"moequant"`` (once:
    again is a no-op; another class already under the name is an error)."""
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)

    for mapping, cls, add in ((AUTO_QUANTIZATION_CONFIG_MAPPING, MoequantConfig, register_quantization_config),
                              (AUTO_QUANTIZER_MAPPING, MoequantHfQuantizer, register_quantizer)):
        have = mapping.get(QUANT_METHOD)
        if have is cls:
            continue
        if have is not None and (have.__module__, have.__qualname__) != (cls.__module__, cls.__qualname__):
            raise MoequantError(f"transformers already has a {QUANT_METHOD!r} quantization method "
                                f"({have.__module__}.{have.__qualname__})")
        mapping.pop(QUANT_METHOD, None)  # this module reloaded: its new class replaces the old one
        add(QUANT_METHOD)(cls)


# Importing this module registers (idempotent). ``export.hf_hook`` relies on it when this module's own import of
# transformers' quantizers is what ran the hook, before ``register`` existed.
register()
