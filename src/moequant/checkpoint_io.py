"""Checkpoint I/O of packed models, below ``api``: ``save`` and ``load`` of a moequant checkpoint (the
layout is ``formats.checkpoint``'s), the one tie rule (``stored_ties``) and the ``config.json`` writer that
``api.save`` and the offloaded quantizer (``offload``) share, and the module swaps that ``load`` and
transformers' loader (``export.hf_quantizer``) use to rebuild packed modules. ``api`` re-exports ``save``,
``load`` and ``packed_modules``: they stay the public entry points."""

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
from moequant.exact_gguf import decode_slow_tables
from moequant.kernels.cpp_ops import prepare as prepare_compiled_ops
from moequant.formats.checkpoint import (CHECKPOINT_FORMAT_VERSION, QUANT_METHOD, AtomicDir, ShardReader,
                                         read_packed, read_quantization_config, seal_quantization_config,
                                         write_shards)
from moequant.fsutil import atomic_write_text
from moequant.layerwise import set_module
from moequant.nn.experts_impl import use_moequant_experts
from moequant.nn.packed import packed_names, packed_tensor
from moequant.nn.quant_experts import QuantExperts
from moequant.nn.quant_linear import QuantLinear

log = logging.getLogger(__name__)


def packed_modules(model: nn.Module) -> dict[str, Any]:
    """``{param_name: QuantizedTensor}`` of every packed weight in the model."""
    out = {}
    for mname, mod in model.named_modules():
        for p in packed_names(mod):
            out[f"{mname}.{p}"] = packed_tensor(mod, p)
    return out


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
    tied = stored_ties(model, set(state))  # {dropped: kept}: stored once, under ``kept``
    for name, t in model.state_dict(keep_vars=True).items():
        if name not in state and name not in tied:
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


# ------------------------------------------------------------------------------------------------
# the tie rule: which tensors a checkpoint stores once
# ------------------------------------------------------------------------------------------------

def stored_ties(model: nn.Module, packed_keys: set[str] = frozenset()) -> dict[str, str]:
    """``{dropped: kept}``: the tensors a checkpoint of ``model`` stores once, under ``kept``, recorded as
    ``quantization_config.tied`` (``api.save`` and ``offload.quantize_offloaded`` both write this).

    One rule, seen two ways: a materialized model shows its ties by storage (``ties_by_storage``: any two
    state tensors of one storage, offset and shape, and a ``TiedQuantLinear`` head over a packed table); the
    meta skeleton of an offloaded run has no storage to compare, and transformers does not tie its meta
    parameters, so there it is the config's ``tie_word_embeddings`` (``ties_by_config``). For the models
    transformers builds the two agree (``tests/test_checkpoint_io.py`` checks tied and untied ones)."""
    if any(t.is_meta for t in model.state_dict(keep_vars=True).values()):
        return ties_by_config(model)
    return ties_by_storage(model, packed_keys)


def ties_by_storage(model: nn.Module, packed_keys: set[str] = frozenset()) -> dict[str, str]:
    """Ties of a materialized model: every state tensor (not in ``packed_keys``) whose storage, offset and
    shape an earlier one has, plus ``tied_packed``."""
    tied: dict[str, str] = tied_packed(model)  # a head over the packed embedding table: stored once
    seen: dict[tuple[int, int], tuple[str, tuple[int, ...]]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name in packed_keys:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen and tuple(t.shape) == seen[key][1]:
            tied[name] = seen[key][0]
            continue
        seen[key] = (name, tuple(t.shape))
    return tied


def ties_by_config(model: nn.Module) -> dict[str, str]:
    """Ties of a model whose tensors cannot be compared (the meta skeleton): the head and the input
    embeddings when the config says ``tie_word_embeddings``."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return {}
    out_emb = model.get_output_embeddings()
    if out_emb is None:
        return {}
    return {param_name(model, out_emb): param_name(model, model.get_input_embeddings())}


def param_name(model: nn.Module, module: nn.Module) -> str:
    """``"<module path>.weight"`` of ``module`` inside ``model``."""
    for name, m in model.named_modules():
        if m is module:
            return f"{name}.weight"
    raise MoequantError(f"{type(module).__name__} not found in the model")


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
    decode_slow_tables(model)  # a head in GGUF blocks without the GGUF kernel here: decoded once, kept in float32
    use_moequant_experts(model)  # stock experts modules left dense dispatch to moequant's grouped path too
    prepare_compiled_ops(build=False)  # a torch.compile of this model calls the C++ kernels straight from its graph
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
