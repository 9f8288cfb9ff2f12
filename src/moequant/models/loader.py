"""Resolve a model spec — zoo alias, local HF directory, local ``.gguf`` file, moequant checkpoint or
hub id — and load it with ``transformers``. One code path for all of them."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moequant.errors import MoequantError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model spec points: ``kind`` is alias / dir / gguf / moequant / hub."""

    spec: str
    kind: str
    path: str  # directory, hub id, or the directory holding the GGUF
    gguf_file: str | None = None


def resolve_model_spec(spec: str) -> ResolvedModel:
    from moequant.zoo.models import BUILT_MODELS, GGUF_MODELS, resolve_alias

    if spec in GGUF_MODELS or spec in BUILT_MODELS:
        return ResolvedModel(spec, "alias", str(resolve_alias(spec)))
    p = Path(spec)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise MoequantError(f"{p}: directory has no config.json (not a Hugging Face model directory)")
        from moequant.formats.checkpoint import QUANT_METHOD
        import json

        q = json.loads((p / "config.json").read_text()).get("quantization_config") or {}
        kind = "moequant" if q.get("quant_method") == QUANT_METHOD else "dir"
        return ResolvedModel(spec, kind, str(p))
    if p.is_file() and p.suffix == ".gguf":
        return ResolvedModel(spec, "gguf", str(p.parent), p.name)
    if p.exists() or spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
        raise MoequantError(f"model {spec!r}: no such directory or .gguf file")
    from moequant.zoo.models import model_aliases

    if "/" not in spec:
        raise MoequantError(f"unknown model {spec!r}: not a zoo alias ({', '.join(model_aliases())}), "
                            f"a local directory, a .gguf file, nor a hub id (owner/name)")
    return ResolvedModel(spec, "hub", spec)


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object | None, ResolvedModel]:
    """(model in eval mode, tokenizer or None, where it came from)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = resolve_model_spec(spec)
    if r.kind == "moequant":
        from moequant.api import load

        model = load(r.path)
        return model, load_tokenizer(r), r
    kwargs: dict = {"dtype": dtype}
    if r.gguf_file:
        kwargs["gguf_file"] = r.gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(r.path, **kwargs)
    except OSError as e:
        if r.kind == "hub":
            raise MoequantError(f"could not load {spec!r} from the Hugging Face hub: {str(e).splitlines()[0]} "
                                f"(offline? set HF_HUB_OFFLINE=0 and check network, or pass a local directory "
                                f"or a zoo alias)") from None
        raise MoequantError(f"could not load model from {r.path}: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        raise MoequantError(f"could not load model {spec!r}: {str(e).splitlines()[0]}") from None
    model.eval()
    return model, load_tokenizer(r), r


def load_tokenizer(r: ResolvedModel):
    from transformers import AutoTokenizer

    try:
        if r.gguf_file:
            return AutoTokenizer.from_pretrained(r.path, gguf_file=r.gguf_file)
        return AutoTokenizer.from_pretrained(r.path)
    except (OSError, ValueError) as e:
        log.warning("no tokenizer for %s (%s)", r.spec, str(e).splitlines()[0])
        return None


