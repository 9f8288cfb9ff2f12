"""Resolve a model spec — zoo alias, local HF directory, local ``.gguf`` file, moequant checkpoint or
hub id — and load it with ``transformers``. One code path for all of them."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moequant.errors import MoequantError, one_line

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

        q = read_model_config(p).get("quantization_config") or {}
        kind = "moequant" if isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD else "dir"
        if kind == "dir" and not q:
            from moequant.formats.checkpoint import packed_evidence

            why = packed_evidence(p)
            if why:
                raise MoequantError(f"{p / 'config.json'}: has no moequant quantization_config, but {why}; "
                                    f"restore the config.json that moequant wrote")
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


def read_model_config(path: str | Path) -> dict:
    """``path/config.json`` as a dict, checked before ``transformers`` sees it: a JSON object with a
    ``model_type``, and nothing that asks for the model's own Python code (see ``refuse_remote_code``)."""
    f = Path(path) / "config.json"
    cfg = _read_json_object(f)
    if cfg is None:
        raise MoequantError(f"{f}: no such file (not a Hugging Face model directory)")
    refuse_remote_code(path, cfg)
    if not isinstance(cfg.get("model_type"), str) or not cfg["model_type"]:
        raise MoequantError(f"{f}: no 'model_type' (cannot tell the architecture)")
    from transformers import CONFIG_MAPPING, __version__

    if cfg["model_type"] not in CONFIG_MAPPING:
        raise MoequantError(f"{f}: unsupported architecture model_type={cfg['model_type']!r} (not known to "
                            f"transformers {__version__})")
    return cfg


def refuse_remote_code(path: str | Path, config: dict | None = None) -> None:
    """moequant never runs a model's own Python code: a directory whose ``config.json`` or
    ``tokenizer_config.json`` has an ``auto_map`` (classes to import from ``*.py`` files there or on
    the hub) is refused, whatever ``transformers`` would do with it."""
    path = Path(path)
    for name in ("config.json", "tokenizer_config.json"):
        d = config if name == "config.json" and config is not None else _read_json_object(path / name)
        if d is not None and d.get("auto_map"):
            raise MoequantError(f"{path}: needs trust_remote_code (auto_map in {name}); moequant never runs a "
                                f"model's own Python code")


def _read_json_object(f: Path) -> dict | None:
    """The JSON object in ``f``; None when the file does not exist."""
    try:
        d = json.loads(f.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise MoequantError(f"{f}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoequantError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise MoequantError(f"{f}: expected a JSON object, found a {type(d).__name__}")
    return d


def load_model(spec: str, dtype: torch.dtype = torch.float32, verify: bool = True
               ) -> tuple[nn.Module, object | None, ResolvedModel]:
    """(model in eval mode, tokenizer or None, where it came from). A model whose weights do not match
    its architecture (a missing or an extra tensor) is refused: transformers would fill a missing one
    with random values. ``verify=False`` skips the SHA-256 checks of a moequant checkpoint's tensors."""
    from transformers import AutoModelForCausalLM

    r = resolve_model_spec(spec)
    if r.kind == "moequant":
        from moequant.api import load

        model = load(r.path, verify=verify)
        return model, load_tokenizer(r), r
    # a tensor of the wrong shape is reported in the loading info (and refused below) rather than raised
    kwargs: dict = {"dtype": dtype, "trust_remote_code": False, "output_loading_info": True,
                    "ignore_mismatched_sizes": True}
    if r.gguf_file:
        kwargs["gguf_file"] = r.gguf_file
    where = os.path.join(r.path, r.gguf_file) if r.gguf_file else r.path
    with _load_errors(spec, r), _no_load_report():
        model, info = AutoModelForCausalLM.from_pretrained(r.path, **kwargs)
    check_loading_info(where, info)
    model.eval()
    return model, load_tokenizer(r), r


def check_loading_info(where: str, info: dict) -> None:
    """Refuse weights missing from the files (they would be random) and tensors the model has no place
    for (the files belong to another model), naming them."""
    for key, what in (("missing_keys", "has no tensor for"), ("unexpected_keys", "holds tensors the model does "
                                                                                  "not have:"),
                      ("mismatched_keys", "holds tensors of the wrong shape:")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        if names:
            more = f" (and {len(names) - 5} more)" if len(names) > 5 else ""
            raise MoequantError(f"{where}: {what} {', '.join(names[:5])}{more}")
    if info.get("error_msgs"):
        raise MoequantError(f"{where}: {one_line(info['error_msgs'][0])}")


class _load_errors:
    """Turn what ``transformers`` (and gguf-py, safetensors underneath) raise on a bad model into one
    ``MoequantError`` naming the file or hub id. A GGUF file is parsed by gguf-py, which meets a
    truncated or garbled file with whatever its reader trips on (struct.error, IndexError, ...), so
    every ``Exception`` is converted there."""

    def __init__(self, spec: str, r: ResolvedModel) -> None:
        self.spec, self.r = spec, r

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, e, tb) -> bool:
        if e is None or isinstance(e, MoequantError) or not isinstance(e, Exception):
            return False
        msg = one_line(e)
        if "trust_remote_code" in msg:
            raise MoequantError(f"{self.spec}: needs trust_remote_code; moequant never runs a model's own "
                                f"Python code") from None
        if self.r.gguf_file:
            raise MoequantError(f"{os.path.join(self.r.path, self.r.gguf_file)}: not a readable GGUF model "
                                f"({type(e).__name__}: {msg[:300]})") from None
        if self.r.kind == "hub" and isinstance(e, OSError):
            raise MoequantError(f"could not load {self.spec!r} from the Hugging Face hub: {msg[:300]} "
                                f"(offline? set HF_HUB_OFFLINE=0 and check network, or pass a local directory "
                                f"or a zoo alias)") from None
        state_dict_error = isinstance(e, RuntimeError) and msg.startswith(_STATE_DICT_ERRORS)
        if isinstance(e, (OSError, ValueError)) or state_dict_error or _is_safetensors_or_config_error(e):
            raise MoequantError(f"could not load model from {self.r.path}: {type(e).__name__}: {msg[:300]}") from None
        return False


# what transformers raises (as RuntimeError) when a checkpoint's tensors do not fit the model
_STATE_DICT_ERRORS = ("Error(s) in loading state_dict", "We encountered some issues during automatic conversion")


class _no_load_report(logging.Filter):
    """Drop transformers' multi-line LOAD REPORT warning while loading: what it lists (missing,
    unexpected, mismatched tensors) is refused with one line by ``check_loading_info``."""

    def __enter__(self) -> None:
        logging.getLogger("transformers.modeling_utils").addFilter(self)

    def __exit__(self, *exc) -> None:
        logging.getLogger("transformers.modeling_utils").removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def _is_safetensors_or_config_error(e: Exception) -> bool:
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return isinstance(e, (SafetensorError, StrictDataclassError))


def load_tokenizer(r: ResolvedModel):
    """The model's tokenizer (never its own code), or None with a warning when it has none."""
    from transformers import AutoTokenizer

    if r.kind != "hub" and not r.gguf_file:
        refuse_remote_code(r.path)
    try:
        if r.gguf_file:
            return AutoTokenizer.from_pretrained(r.path, gguf_file=r.gguf_file, trust_remote_code=False)
        return AutoTokenizer.from_pretrained(r.path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise MoequantError(f"{r.spec}: its tokenizer needs trust_remote_code; moequant never runs a model's "
                                f"own Python code") from None
        log.warning("no tokenizer for %s (%s)", r.spec, one_line(e)[:300])
        return None
