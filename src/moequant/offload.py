"""``--offload``: quantize a safetensors checkpoint holding at most one decoder layer's weights in memory.

The model is built on the meta device. Calibration inputs of layer 0 come from embedding rows read one
by one; then, for each layer: its weights are read from disk, its Hessians accumulated, it is
quantized exactly as in memory (``layerwise._quantize_layer``), the calibration batches go through
the quantized layer, its packed and kept tensors are written as one new shard, and it is emptied
back to the meta device. Embeddings, final norm and head are copied byte for byte from the source
files at the end — except a table the recipe keeps by default whose values lie exactly on a Q4_0 / Q5_0 /
Q8_0 grid, which is stored packed as in memory (``embed_head.with_exact_grids``). Activations live in files (read
back one batch at a time). The result has the same tensors, bit for bit, as quantizing in memory and
``api.save``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moequant.alloc.recipe import Recipe
from moequant.checkpoint_io import param_name, stored_ties
from moequant.errors import MoequantError
from moequant.formats.checkpoint import AtomicDir, ShardReader
from moequant.fsutil import make_temp_dir
from moequant.layerwise import Calibration, check_recipe, layer_state, quantize_layer
from moequant.models.adapters import Target, adapter_for, decoder_layers, iter_targets
from moequant.models.streaming import StreamingWriter, _disk_names, embed_rows, materialize, release
from moequant.report import LayerRecord, QuantReport
from moequant.resume import RunProgress, records_mark, records_since
from moequant.runinfo import current_rss_bytes, peak_rss_bytes, return_free_memory
from moequant.solvers.config import SolverConfig

log = logging.getLogger(__name__)


def skeleton(path: Path) -> nn.Module:
    """The model of the HF directory ``path`` with every parameter on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from moequant.models.loader import read_model_config

    read_model_config(path)  # a JSON object with a model_type, no auto_map
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def quantize_offloaded(path: Path, out: Path, recipe: Recipe, calib: Calibration | None, solver: SolverConfig,
                       tokenizer: Any = None, overwrite: bool = False, progress: bool = True,
                       run: RunProgress | None = None, verify: bool = True,
                       source_gguf: Path | None = None) -> QuantReport:
    """``run``: store each finished layer there, and write the layers it already holds from there
    instead of quantizing them again (``quantize --resume``). ``source_gguf``: the GGUF file the model was
    converted from (kept tables found there exactly are stored in its blocks: ``embed_head.with_exact_grids``)."""
    from moequant.checkpoint_io import write_checkpoint_config

    path = Path(path)
    reader = ShardReader(path, verify=verify)  # verify: tensors with a recorded digest are checked as read
    model = skeleton(path)
    adapter = adapter_for(model)
    layers = decoder_layers(model, adapter)
    targets = list(iter_targets(model, adapter))
    check_recipe(targets, recipe)
    from moequant.embed_head import refuse_offloaded

    refuse_offloaded(model, recipe)  # embeddings and head are copied byte for byte here
    if solver.needs_hessian and calib is None:
        raise MoequantError(f"solver {solver.solver!r} needs calibration data")
    report = QuantReport(recipe=recipe.to_dict(), solver=solver.to_dict(),
                         calibration=None if calib is None else calib.to_dict())
    by_layer: dict[int, list[Target]] = {}
    for t in targets:
        by_layer.setdefault(t.layer, []).append(t)
    emb_name = param_name(model, model.get_input_embeddings())
    with AtomicDir(out, overwrite=overwrite) as tmp, contextlib.ExitStack() as cleanup:
        writer = StreamingWriter(tmp)
        runner = None
        if calib is not None:
            from moequant.calib.runner import LayerwiseRunner

            scale = getattr(model.get_input_embeddings(), "embed_scale", None)
            # the rows of every token id the calibration uses, read once: [U, H]
            uniq = torch.unique(calib.tokens)
            rows = embed_rows(reader, _disk_key(reader, emb_name, adapter), uniq, torch.float32)
            if scale is not None:
                rows = rows * scale.to(rows.dtype)

            def embed(ids: torch.Tensor) -> torch.Tensor:
                return rows[torch.searchsorted(uniq, ids)]  # [B, L, H]

            # named moequant-act-<pid>-...: a killed run's spill is recognised and cleaned by the next one
            spill = make_temp_dir(Path(out).parent, kind="act")
            cleanup.callback(shutil.rmtree, spill, ignore_errors=True)
            runner = LayerwiseRunner(model, adapter, calib.tokens, calib.batch_size, spill_dir=spill, embed_fn=embed)
        metas: dict[str, Any] = {}
        bar = tqdm(range(len(layers)), desc="quantize (offload)", unit="layer", disable=not progress)
        for i in bar:
            prefix = f"{adapter.layers}.{i}"
            if run is not None and run.is_done(i):
                state, layer_metas = run.layer_tensors(i)
                run.restore_records(i, report)
                writer.add(state)
                metas.update(layer_metas)
                continue
            if run is not None:
                run.restore_inputs(runner)
            mark = records_mark(report)
            t0 = time.perf_counter()
            materialize(layers[i], prefix, reader, adapter)
            if i in by_layer:
                quantize_layer(model, adapter, i, by_layer[i], recipe, calib, solver, runner, report)
            elif runner is not None:
                runner.run(i, keep_outputs=True)
            report.layers.append(LayerRecord(i, round(time.perf_counter() - t0, 2)))
            layer_metas = {}
            state = layer_state(layers[i], prefix, layer_metas)
            writer.add(state)
            metas.update(layer_metas)
            if run is not None:
                run.commit(i, len(layers), state, layer_metas, records_since(report, mark), runner)
            del state
            release(layers[i])
            return_free_memory()
            log.info("layer %d written: rss %.0f MiB, peak so far %.0f MiB", i, current_rss_bytes() / 2**20,
                     peak_rss_bytes() / 2**20)
        if runner is not None:
            del runner
            cleanup.close()
        tied = _tied(model, reader, adapter)
        rest = _rest_keys(model, reader, adapter, adapter.layers + ".", tied)
        exact = _exact_tables(model, reader, adapter, recipe, report, bool(tied), source_gguf)  # {name: packed}, values unchanged
        for name, qt in exact.items():
            writer.add(qt.to_state_dict(name))
            metas[name] = qt.meta()
        writer.copy(reader, {k: n for k, n in rest.items() if n not in exact})
        writer.finish()
        write_checkpoint_config(tmp, model.config.to_dict(), metas, recipe, tied,
                                {"exact": sorted(exact)} if exact else None,
                                generation_config=getattr(model, "generation_config", None), tokenizer=tokenizer)
    return report


def _exact_tables(model: nn.Module, reader: ShardReader, adapter, recipe: Recipe, report: QuantReport,
                  tied: bool, source_gguf: Path | None = None) -> dict:
    """The kept embedding / head tables stored packed because every value lies on a Q4_0 / Q5_0 / Q8_0 grid (as
    in memory: ``embed_head.with_exact_grids``), read from disk one at a time; their records go into ``report``.
    ``tied``: the head is the embedding table (the meta skeleton cannot show it by storage)."""
    from dataclasses import replace

    from moequant.embed_head import exact_records, plan_embed_head, with_exact_grids

    plan = plan_embed_head(model, recipe, warn=False)
    plan = with_exact_grids(model, replace(plan, tied=plan.tied or (tied and plan.head is not None)),
                            lambda t: reader.read(_disk_key(reader, t.name, adapter)), source_gguf=source_gguf)
    before, after = exact_records(plan)
    report.tensors[:0] = before
    report.tensors.extend(after)
    return plan.exact_tables()


def _disk_key(reader: ShardReader, name: str, adapter) -> str:
    for k in _disk_names(name, adapter):
        if k in reader:
            return k
    raise MoequantError(f"{reader.path}: checkpoint has no tensor {name}")


def _rest_keys(model: nn.Module, reader: ShardReader, adapter, prefix: str, tied: dict[str, str]) -> dict[str, str]:
    """``{disk key: model name}`` of every tensor outside the decoder layers (tied copies excluded)."""
    out = {}
    for name in model.state_dict():
        if name.startswith(prefix) or name in tied:
            continue
        for k in _disk_names(name, adapter):
            if k in reader:
                out[k] = name
                break
    return out


def _tied(model: nn.Module, reader: ShardReader, adapter) -> dict[str, str]:
    """Tied weights ``{dropped: kept}`` by the rule ``api.save`` records (``checkpoint_io.stored_ties``); every
    other tensor outside the decoder layers must be in the source checkpoint."""
    tied = stored_ties(model)
    missing = [n for n in model.state_dict() if not n.startswith(adapter.layers + ".") and n not in tied
               and not any(k in reader for k in _disk_names(n, adapter))]
    if missing:
        raise MoequantError(f"{reader.path}: checkpoint lacks {missing[:5]}")
    return tied
