"""The one orchestration entry: ``quantize(model, recipe) -> model``, ``save(model, dir)``, ``load(dir)``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moequant import __version__
from moequant.alloc.recipe import Recipe
from moequant.errors import MoequantError
from moequant.fsutil import atomic_write_text
from moequant.formats.checkpoint import (CHECKPOINT_FORMAT_VERSION, QUANT_METHOD, AtomicDir, ShardReader,
                                         read_packed, read_quantization_config, seal_quantization_config,
                                         write_shards)
from moequant.layerwise import Calibration, quantize_model, set_module
from moequant.nn.experts_impl import use_moequant_experts
from moequant.nn.packed import packed_names, packed_tensor
from moequant.nn.quant_experts import QuantExperts
from moequant.nn.quant_linear import QuantLinear
from moequant.report import QuantReport, TensorRecord  # noqa: F401  (re-exported)
from moequant.solvers.config import SolverConfig

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# quantize
# ------------------------------------------------------------------------------------------------

def quantize(model: nn.Module, recipe: Recipe, calib: Calibration | None = None, *,
             solver: SolverConfig | None = None, progress: bool = True, run: Any = None) -> nn.Module:
    """Quantize ``model`` in place with ``recipe``, decoder layer by decoder layer.

    Every ``nn.Linear`` inside the decoder layers and every fused expert tensor is a target; the
    first matching rule decides its method or keeps it. ``solver`` (default RTN) says how rounding
    errors are handled; ``calib`` (token windows + Hessian options, see ``moequant.layerwise``) is
    needed for ``SolverConfig(solver="ldlq")``: each layer's Hessians are then accumulated on what
    the already-quantized layers before it produce. Afterwards every target a rule assigned a method
    is verified to be stored packed (``MoequantError`` otherwise). The report is attached as
    ``model.moequant_report``. ``run`` (a ``moequant.resume.RunProgress``, ``quantize --resume``) stores
    each finished layer and restores those it already holds.
    """
    report = quantize_model(model, recipe, calib, solver or SolverConfig(), progress, run=run)
    verify_quantized(model, report)
    report.record_kept(model)
    model.moequant_report = report
    model.moequant_recipe = recipe
    model.moequant_exact = tuple(t.name for t in report.exact)
    return model


def verify_quantized(model: nn.Module, report: QuantReport) -> None:
    """Every tensor the recipe assigned a method is stored packed in the model; fail loudly otherwise."""
    missing = []
    for t in report.quantized:
        module_name, _, param = t.name.rpartition(".")
        mod = model.get_submodule(module_name)
        if param not in packed_names(mod):
            missing.append(t.name)
    if missing:
        raise MoequantError(f"{len(missing)} targeted tensors are not stored quantized: {missing[:5]}")


# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------

def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (shared storage counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes() if t.device.type != "meta" else 0
    return total


def packed_modules(model: nn.Module) -> dict[str, Any]:
    """``{param_name: QuantizedTensor}`` of every packed weight in the model."""
    out = {}
    for mname, mod in model.named_modules():
        for p in packed_names(mod):
            out[f"{mname}.{p}"] = packed_tensor(mod, p)
    return out


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------

def save(model: nn.Module, out_dir: str | Path, *, tokenizer: Any = None, overwrite: bool = False,
         extra: dict[str, Any] | None = None) -> Path:
    """Write a packed checkpoint (see ``moequant.formats.checkpoint``); nothing is left half-written."""
    out = Path(out_dir)
    packed = packed_modules(model)
    if not packed:
        raise MoequantError("model has no quantized tensors: run moequant.quantize first")
    state: dict[str, torch.Tensor] = {}
    for name, qt in packed.items():
        state.update(qt.to_state_dict(name))
    packed_keys = set(state)
    tied: dict[str, str] = tied_packed(model)  # a head over the packed embedding table: stored once
    seen: dict[tuple[int, int], str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name in packed_keys:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen and tuple(t.shape) == tuple(state[seen[key]].shape):
            tied[name] = seen[key]
            continue
        seen[key] = name
        state[name] = t.detach()
    recipe = getattr(model, "moequant_recipe", None)
    exact = sorted(n for n in getattr(model, "moequant_exact", ()) if n in packed)  # kept tables stored exactly
    if exact:
        extra = {**(extra or {}), "exact": exact}
    with AtomicDir(out, overwrite=overwrite) as tmp:
        write_shards(state, tmp)
        write_checkpoint_config(tmp, model.config.to_dict(), {n: qt.meta() for n, qt in packed.items()}, recipe,
                                tied, extra, getattr(model, "generation_config", None), tokenizer)
    return out


def tied_packed(model: nn.Module) -> dict[str, str]:
    """``{head weight: embedding weight}`` of every ``TiedQuantLinear`` (a head computing from the packed
    table of a ``QuantEmbedding``): the head's packed tensor is the embedding's, stored once."""
    from moequant.nn.quant_embedding import TiedQuantLinear

    names = {id(m): n for n, m in model.named_modules()}
    return {f"{n}.weight": f"{names[id(m.source)]}.weight" for n, m in model.named_modules()
            if isinstance(m, TiedQuantLinear) and id(m.source) in names}


def write_checkpoint_config(out: Path, model_config: dict[str, Any], metas: dict[str, Any], recipe: Recipe | None,
                            tied: dict[str, str], extra: dict[str, Any] | None = None, generation_config: Any = None,
                            tokenizer: Any = None) -> None:
    """``config.json`` with ``quantization_config`` (see ``formats.checkpoint``), the generation config
    and the tokenizer files."""
    qcfg = {"quant_method": QUANT_METHOD, "format_version": CHECKPOINT_FORMAT_VERSION,
            "moequant_version": __version__, "recipe": recipe.to_dict() if recipe else None,
            "tensors": metas, "tied": tied, **(extra or {})}
    config = dict(model_config)
    config["quantization_config"] = seal_quantization_config(qcfg)
    atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True, default=str))
    if generation_config is not None:
        generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def load(path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Build the model from its config without allocating full-precision weights, swap in
    ``QuantLinear`` / ``QuantExperts`` built straight from the packed tensors, load the kept tensors.

    Checked before use: the index and every shard header, each packed tensor's metadata and the shape
    and dtype of each of its data tensors, that the checkpoint holds exactly the tensors the model needs.
    ``verify`` (default) also checks every tensor's SHA-256 against the index and the seal of
    ``quantization_config`` (a checkpoint from an older moequant without them loads with a warning).
    Any failure is a one-line ``MoequantError`` naming the file and tensor."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    qcfg = read_quantization_config(path, verify=verify)
    reader = ShardReader(path, verify=verify)
    if verify and (reader.digests is None or "integrity" not in qcfg):
        log.warning("%s: no tensor digests (written by an older moequant): loaded without verification", path)
    from moequant.models.loader import refuse_remote_code

    refuse_remote_code(path)
    from huggingface_hub.errors import StrictDataclassError  # transformers' config field validation

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, StrictDataclassError) as e:
        # transformers validates config fields as it builds the config: any of these is a bad config.json
        raise MoequantError(f"{path / 'config.json'}: transformers cannot read it "
                            f"({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError) as e:
        raise MoequantError(f"{path / 'config.json'}: transformers cannot build the model from it "
                            f"({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from None
    used, tied = swap_packed_modules(model, qcfg, reader, path, device)
    rest = {k: reader.read(k).to(device) for k in reader.keys() if k not in used}
    for dropped, kept in tied.items():
        if kept not in rest:
            raise MoequantError(f"{path}: tied tensor {dropped!r} names {kept!r}, which the checkpoint lacks")
        rest[dropped] = rest[kept]
    expected = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    for k, v in rest.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            raise MoequantError(f"{path}: tensor {k!r} is {list(v.shape)}, the model expects {list(expected[k].shape)}")
    result = model.load_state_dict(rest, strict=False, assign=True)
    if result.unexpected_keys:
        raise MoequantError(f"{path}: tensors the model does not have: {result.unexpected_keys[:5]}")
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise MoequantError(f"{path}: checkpoint lacks tensors {still_meta[:5]}")
    finish_loaded(model, qcfg, path)
    from moequant.nn.exact_head import attach_exact_head

    attach_exact_head(model)  # a kept head dequantized from Q8_0 / Q5_0 / Q4_0 is multiplied from that grid at decode
    return model


def swap_packed_modules(model: nn.Module, qcfg: dict[str, Any], reader: ShardReader, path: Path,
                        device: str | torch.device) -> tuple[set[str], dict[str, str]]:
    """Swap in ``QuantLinear`` / ``QuantExperts`` / ``QuantEmbedding`` / ``TiedQuantLinear`` for every packed
    tensor of ``qcfg["tensors"]``, built from what ``reader`` returns (``load``: the checked tensors;
    ``export.hf_quantizer``: meta tensors of the stored shapes and dtypes, which transformers' loader fills).
    -> (the checkpoint tensors the new modules hold, the dense tied pairs ``{dropped: kept}`` left to tie)."""
    used: set[str] = set()
    experts: dict[str, dict[str, Any]] = {}
    for name, meta in qcfg["tensors"].items():
        qt = read_packed(reader, name, meta, device)
        used.update(f"{name}_{d}" for d in qt.data)
        module_name, _, param = name.rpartition(".")
        module = _submodule(model, module_name, path, name)
        if isinstance(module, nn.Embedding):
            if param != "weight" or tuple(module.weight.shape) != qt.shape:
                raise MoequantError(f"{path}: packed tensor {name!r} {list(qt.shape)} does not fit the model's "
                                    f"{module_name}.weight {list(module.weight.shape)}")
            set_module(model, module_name, _quant_embedding(qt, module, path, name))
        elif isinstance(module, nn.Linear):
            if param != "weight" or tuple(module.weight.shape) != qt.shape:
                raise MoequantError(f"{path}: packed tensor {name!r} {list(qt.shape)} does not fit the model's "
                                    f"{module_name}.weight {list(module.weight.shape)}")
            bias = reader.read(f"{module_name}.bias").to(device) if module.bias is not None else None
            if bias is not None:
                used.add(f"{module_name}.bias")
            set_module(model, module_name, QuantLinear(qt, bias))
        else:
            want = getattr(module, param, None)
            if param not in ("gate_up_proj", "down_proj") or not isinstance(want, torch.Tensor) \
                    or tuple(want.shape) != qt.shape:
                raise MoequantError(f"{path}: packed tensor {name!r} {list(qt.shape)} does not fit the model")
            experts.setdefault(module_name, {})[param] = qt
    for mname, parts in experts.items():
        old = model.get_submodule(mname)
        for p in ("gate_up_proj", "down_proj"):
            if p not in parts:
                parts[p] = reader.read(f"{mname}.{p}").to(device)
                used.add(f"{mname}.{p}")
        set_module(model, mname, QuantExperts(parts["gate_up_proj"], parts["down_proj"], old.act_fn))
    tied = dict(qcfg.get("tied", {}))
    for dropped, kept in list(tied.items()):
        if kept in qcfg["tensors"]:  # a head over the packed embedding table
            used.update(_tie_packed_head(model, reader, dropped, kept, path, device))
            del tied[dropped]
    _forget_packed_ties(model, set(qcfg["tensors"]) | (set(qcfg.get("tied", {})) - set(tied)))
    return used, tied


def _forget_packed_ties(model: nn.Module, packed: set[str]) -> None:
    """Drop the tie entries of transformers (``all_tied_weights_keys``, ``_tied_weights_keys``, on the model and
    its sub-models) that name a ``packed`` tensor: a head over a packed table is a ``TiedQuantLinear``, a packed
    head its own, and ``tie_weights()`` or transformers' loader would look for a ``weight`` there."""
    for prefix, sub in model.named_modules():
        for attr in ("all_tied_weights_keys", "_tied_weights_keys"):
            keys = getattr(sub, attr, None)
            if not isinstance(keys, dict):
                continue
            keep = {t: s for t, s in keys.items() if not {f"{prefix}.{t}" if prefix else t,
                                                         f"{prefix}.{s}" if prefix else s} & packed}
            if len(keep) != len(keys):
                setattr(sub, attr, keep)


def finish_loaded(model: nn.Module, qcfg: dict[str, Any], path: Path) -> None:
    """The last steps of loading a packed checkpoint (``load``, ``export.hf_quantizer``): embeddings return
    the kept tensors' dtype, the recipe is attached, experts dispatch to moequant's grouped path, eval mode."""
    _set_embedding_dtype(model)
    recipe = qcfg.get("recipe")
    try:
        model.moequant_recipe = Recipe.from_dict(recipe) if recipe else None
    except (ValueError, TypeError, KeyError) as e:
        raise MoequantError(f"{path / 'config.json'}: quantization_config.recipe is invalid ({e})") from None
    model.moequant_exact = tuple(qcfg.get("exact", ()))  # kept tables stored packed, values unchanged
    use_moequant_experts(model)  # stock experts modules left dense dispatch to moequant's grouped path too
    model.eval()


def _quant_embedding(qt: Any, old: nn.Embedding, path: Path, name: str) -> nn.Module:
    from moequant.nn.quant_embedding import QuantEmbedding

    scale = getattr(old, "embed_scale", None)  # Gemma's scaled embeddings: a non-persistent buffer, kept
    if scale is not None and not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale))
    try:
        return QuantEmbedding(qt, scale, padding_idx=old.padding_idx)
    except ValueError as e:
        raise MoequantError(f"{path}: packed tensor {name!r}: {e}") from None


def _tie_packed_head(model: nn.Module, reader: ShardReader, dropped: str, kept: str, path: Path,
                     device: str | torch.device) -> set[str]:
    """Swap the head ``dropped`` for a ``TiedQuantLinear`` over the ``QuantEmbedding`` holding ``kept``;
    -> the checkpoint tensors it used (its bias)."""
    from moequant.nn.quant_embedding import QuantEmbedding, TiedQuantLinear

    src_name, _, src_param = kept.rpartition(".")
    head_name, _, head_param = dropped.rpartition(".")
    src = _submodule(model, src_name, path, kept)
    head = _submodule(model, head_name, path, dropped)
    if not isinstance(src, QuantEmbedding) or src_param != "weight" or head_param != "weight" \
            or not isinstance(head, nn.Linear) or tuple(head.weight.shape) != src.qweight.shape:
        raise MoequantError(f"{path}: tied tensor {dropped!r} names the packed {kept!r}, which is not an embedding "
                            "table the model's head can share")
    bias = reader.read(f"{head_name}.bias").to(device) if head.bias is not None else None
    set_module(model, head_name, TiedQuantLinear(src, bias))
    return {f"{head_name}.bias"} if bias is not None else set()


def _set_embedding_dtype(model: nn.Module) -> None:
    """A ``QuantEmbedding`` returns the dtype of the model's floating-point parameters (what the dense
    embedding table had: ``--kept-dtype`` applies to every kept tensor)."""
    from moequant.nn.quant_embedding import QuantEmbedding

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for m in model.modules():
        if isinstance(m, QuantEmbedding):
            m.out_dtype = dtype


def _submodule(model: nn.Module, name: str, path: Path, tensor: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise MoequantError(f"{path}: packed tensor {tensor!r} names a module the model does not have") from None
