"""``moequant export gguf MODEL_OR_RUN --out F.gguf``: a GGUF file llama.cpp loads, written with gguf-py.

Two inputs, one writer:

- a **moequant checkpoint** (``--types auto``, the only choice): every packed tensor is *repacked* into its
  ggml type, never rounded again (``QuantizedTensor.gguf_blocks``: uniform int4/5/8 symmetric in groups of
  32 -> Q4_0/Q5_0/Q8_0, the GGUF-native k-quant formats -> their own type); a format with no GGUF
  equivalent (trellis, NF4/FP4, RHT-rotated, asymmetric grids, other group sizes) is refused with one line
  naming the tensor. Tensors the run kept in full precision are written as ``--kept-type`` (default
  ``stored``: F32 / F16 / BF16 as stored, exact).
- a **float model** (zoo alias, HF directory, hub id): a plain converter, every weight matrix in
  ``--types`` f32 / f16 / bf16 / q8_0 / q4_0 / q4_1 (``auto``: f16), rounded by gguf-py's own encoders
  (the "llama.cpp's own quantizer" baseline and the F16 reference).

In both, as llama.cpp's converter does: 1-D tensors, norms, routers and the shared-expert gate are F32; a
row whose width is not a multiple of the type's block falls back to F16 (reported); names, metadata and
tokenizer as ``gguf_names`` / ``gguf_meta`` / ``gguf_tokenizer`` write them. The file is written
atomically (a failure leaves nothing) and an existing file is replaced only with ``--overwrite`` and only
if it is a GGUF file.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import torch

from moequant.calib.cli_args import add_calib_arguments
from moequant.calib.data import CalibData
from moequant.errors import MoequantError

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
FLOAT_TYPES: dict[str, Q] = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0,
                             "q4_1": Q.Q4_1}
KEPT_TYPES = ("stored", "f32", "f16", "bf16", "q8_0")
_STORED = {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}


@dataclass(frozen=True)
class GgufExportJob:
    """model: a moequant checkpoint or a float model spec; out: the .gguf file; types: ``auto`` or a
    ``FLOAT_TYPES`` key (float models); kept_type: a ``KEPT_TYPES`` entry (checkpoints); imatrix_out: also
    write the calibration Hessian diagonals as a llama.cpp imatrix file (float models), over ``calib``."""

    model: str
    out: Path
    types: str = "auto"
    kept_type: str = "stored"
    overwrite: bool = False
    imatrix_out: Path | None = None
    calib: CalibData = CalibData()
    calib_batch_size: int = 8


@dataclass
class PlannedTensor:
    """One GGUF tensor: its name, ggml type, logical shape ``[..., N, K]`` (numpy order), the source tensor
    it comes from, and how to make its bytes."""

    name: str
    qtype: Q
    shape: tuple[int, ...]
    source: str
    data: Callable[[], np.ndarray]
    repacked: bool = False
    fallback: str | None = None

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return gguf.quant_shape_to_byte_shape(self.shape, self.qtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.byte_shape))


# ------------------------------------------------------------------------------------------------ planning

def encode_float(t: torch.Tensor, qtype: Q) -> np.ndarray:
    """A float tensor in ``qtype`` by gguf-py's encoders (from float32, as llama.cpp's converter does)."""
    return gguf.quants.quantize(t.detach().to(torch.float32).contiguous().numpy(), qtype)


def float_type(shape: tuple[int, ...], want: Q, always_f32: bool) -> tuple[Q, str | None]:
    """(type, why it is not ``want``): F32 for 1-D tensors and ``always_f32`` ones; F16 when the rows are not
    whole blocks of a quantized ``want`` (llama.cpp's converter falls back the same way)."""
    if len(shape) <= 1 or always_f32:
        return Q.F32, None
    block = gguf.GGML_QUANT_SIZES[want][0]
    if shape[-1] % block:
        return Q.F16, f"rows of {shape[-1]} are not whole {want.name} blocks of {block}"
    return want, None


def plan_tensors(src: Any, places: list[Any], job: GgufExportJob) -> list[PlannedTensor]:
    """The GGUF tensors of ``src`` placed by ``places``; packed tensors repacked now (their bytes kept)."""
    from moequant.export.gguf_meta import llama3_rope_factors
    from moequant.export.gguf_names import place

    out: list[PlannedTensor] = []
    factors = llama3_rope_factors(src.hparams)
    if factors is not None:
        out.append(PlannedTensor("rope_freqs.weight", Q.F32, tuple(factors.shape), "(rope_parameters)",
                                 lambda f=factors: encode_float(f, Q.F32)))
    blocks: dict[str, tuple[Q, torch.Tensor]] = {}
    for p in places:
        if p.source in src.packed:
            if p.source not in blocks:
                try:
                    qtype, raw = src.packed[p.source].gguf_blocks()
                except MoequantError as e:
                    raise MoequantError(f"{src.spec}: tensor {p.source!r}: {e}") from None
                blocks[p.source] = (Q(qtype), raw)
            qtype, raw = blocks[p.source]
            b = place(p, raw).contiguous().numpy()  # [..., N, row_bytes]
            shape = gguf.quant_shape_from_byte_shape(b.shape, qtype)
            out.append(PlannedTensor(p.gguf_name, qtype, tuple(shape), p.source, lambda b=b: b, repacked=True))
            continue
        src_shape, dtype = src.info(p.source)
        shape = tuple(place(p, torch.empty(src_shape, device="meta")).shape)  # placed without reading the data
        qtype, why = float_type(shape, _want(job, dtype), p.always_f32)

        def make(p=p, qtype=qtype) -> np.ndarray:
            v = place(p, src.read(p.source).to(torch.float32))
            return encode_float(v + p.shift if p.shift else v, qtype)

        out.append(PlannedTensor(p.gguf_name, qtype, shape, p.source, make, fallback=why))
    return out


def _want(job: GgufExportJob, stored: torch.dtype) -> Q:
    """The type asked for a float (not packed) weight matrix."""
    if job.types != "auto":
        return FLOAT_TYPES[job.types]
    if job.kept_type == "stored":
        return _STORED.get(stored, Q.F32)
    return FLOAT_TYPES[job.kept_type]


def file_type(tensors: list[PlannedTensor]) -> int:
    """``general.file_type``: the type holding most weights among the matrices (F32 when all are F32)."""
    from moequant.export.gguf_meta import FILE_TYPES

    count: Counter = Counter()
    for t in tensors:
        if len(t.shape) >= 2 and t.qtype != Q.F32:
            count[t.qtype] += int(np.prod(t.shape))
    if not count:
        return int(gguf.LlamaFileType.ALL_F32)
    top = count.most_common(1)[0][0]
    return int(FILE_TYPES.get(top, gguf.LlamaFileType.GUESSED))


# ------------------------------------------------------------------------------------------------ writing

def check_out_file(out: Path, overwrite: bool, sources: list[Path], what: str = "--out") -> None:
    """Before any work: ``out`` writable; an existing ``out`` replaced only with ``--overwrite`` and only when
    it is a GGUF file that is not the input."""
    from moequant.fsutil import check_writable

    check_writable(out, what)
    p = Path(out).expanduser()
    for s in sources:
        if p.resolve() == Path(s).expanduser().resolve():
            raise MoequantError(f"{what} {out}: is the input model; choose another file")
    if p.exists() or p.is_symlink():
        if not overwrite:
            raise MoequantError(f"{what} {out}: already exists (choose another file or pass --overwrite)")
        if not p.is_file() or _magic(p) != b"GGUF":
            raise MoequantError(f"{what} {out}: exists and is not a GGUF file, so --overwrite will not replace it")


def _magic(p: Path) -> bytes:
    with open(p, "rb") as f:
        return f.read(4)


def check_job(job: GgufExportJob, is_run: bool) -> None:
    """The options against the input kind, before any work."""
    if job.types != "auto" and job.types not in FLOAT_TYPES:
        raise MoequantError(f"--types {job.types!r}: choose auto or one of {', '.join(FLOAT_TYPES)}")
    if job.kept_type not in KEPT_TYPES:
        raise MoequantError(f"--kept-type {job.kept_type!r}: choose one of {', '.join(KEPT_TYPES)}")
    if is_run and job.types != "auto":
        raise MoequantError(f"--types {job.types}: {job.model} is a moequant checkpoint, exported by repacking its "
                            f"tensors (--types auto; --kept-type sets the kept ones); convert the float model it "
                            f"came from to use --types {job.types}")
    if is_run and job.imatrix_out is not None:
        raise MoequantError(f"--imatrix-out: {job.model} is a moequant checkpoint, which keeps no Hessians; write the "
                            f"imatrix from the float model it came from (moequant export gguf FLOAT_MODEL --types "
                            f"f16 --out F.gguf --imatrix-out F.imatrix.gguf --calib ...)")
    if not is_run and job.kept_type != "stored":
        raise MoequantError(f"--kept-type applies to moequant checkpoints; {job.model} is a float model (--types)")
    if job.calib_batch_size < 1:
        raise MoequantError(f"--calib-batch-size must be >= 1, got {job.calib_batch_size}")


def export_gguf(job: GgufExportJob) -> dict[str, Any]:
    """Write ``job.out`` (and ``job.imatrix_out``); -> a summary (tensor and type counts, fallbacks, bytes)."""
    from moequant.export.gguf_meta import add_model_keys
    from moequant.export.gguf_names import arch_for, check_llama_cpp, placements
    from moequant.export.gguf_source import open_source
    from moequant.export.gguf_tokenizer import add_vocab, read_vocab
    from moequant.fsutil import input_paths
    from moequant.models.loader import resolve_model_spec

    kind = resolve_model_spec(job.model).kind
    if kind == "gguf":
        raise MoequantError(f"{job.model}: is a GGUF file already; export the Hugging Face directory or moequant "
                            f"checkpoint it came from (transformers' GGUF reader does not keep the tokenizer exactly)")
    check_job(job, kind == "moequant")
    check_out_file(job.out, job.overwrite, input_paths(job.model))
    if job.imatrix_out is not None:
        if Path(job.imatrix_out).expanduser().absolute() == Path(job.out).expanduser().absolute():
            raise MoequantError(f"--imatrix-out {job.imatrix_out}: is --out; choose another file")
        check_out_file(job.imatrix_out, job.overwrite, input_paths(job.model), "--imatrix-out")
    with open_source(job.model) as src:
        arch = arch_for(str(src.hparams.get("model_type")))
        check_llama_cpp(arch, src.hparams)
        vocab = read_vocab(src.tokenizer, src.tokenizer_dir, None if arch.trim_vocab else int(src.hparams["vocab_size"]))
        places = placements(arch, src.names, src.hparams, len(vocab.tokens))
        tensors = plan_tensors(src, places, job)
        imatrix = _imatrix(job, src, places) if job.imatrix_out is not None else None
        writer = gguf.GGUFWriter(None, arch.name)
        for t in tensors:
            writer.add_tensor_info(t.name, t.byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
        _add_general(writer, src)
        ftype = file_type(tensors)
        add_model_keys(writer, arch, src.hparams, ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocab(writer, vocab)
        _write(writer, tensors, job.out)
    summary = _summary(job, tensors, ftype, arch.name)
    if imatrix is not None:
        from moequant.export.gguf_imatrix import write_imatrix

        c = job.calib
        dataset = c.data if Path(c.data).is_file() else f"{c.data}:{c.split}"
        write_imatrix(Path(job.imatrix_out), arch.name, imatrix, dataset, c.samples, c.seqlen)
        summary["imatrix"] = {"out": str(job.imatrix_out), "entries": len(imatrix), "calib": c.to_dict()}
    return summary


def _imatrix(job: GgufExportJob, src: Any, places: list[Any]) -> dict[str, Any]:
    """The imatrix entries of the float model over ``job.calib`` (see ``gguf_imatrix``)."""
    from moequant.calib.data import calibration_tokens
    from moequant.export.gguf_imatrix import hessian_diagonals, imatrix_entries

    tokens = calibration_tokens(src.tokenizer, job.calib)  # [S, L]
    return imatrix_entries(hessian_diagonals(src.model, tokens, job.calib_batch_size), places)


def _add_general(writer: gguf.GGUFWriter, src: Any) -> None:
    """``general.*`` as the converter writes them (gguf-py's ``Metadata`` from the model card and config),
    plus ``general.quantized_by`` for a moequant checkpoint."""
    from moequant import __version__

    total, shared, expert, n_exp = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, src.card_dir, None, total)
    if meta.name is None:
        meta.name = Path(src.spec).stem if src.card_dir is None else Path(src.card_dir).name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_exp)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)
    if src.is_run:
        writer.add_quantized_by(f"moequant {__version__}")


def _write(writer: gguf.GGUFWriter, tensors: list[PlannedTensor], out: Path) -> None:
    """Header, keys, tensor infos, then each tensor's bytes made one at a time, into a temp file renamed
    over ``out`` on success (``fsutil.atomic_file``)."""
    from gguf.gguf_writer import WriterState

    from moequant.fsutil import atomic_file

    with atomic_file(out) as f:
        writer.fout, writer.state = [f], WriterState.EMPTY  # gguf-py's writer on our temp file
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            data = t.data()
            if data.nbytes != t.nbytes:
                raise AssertionError(f"{t.name}: {data.nbytes} bytes made, {t.nbytes} planned")
            writer.write_tensor_data(data)
        writer.fout = None  # atomic_file closes the file


def _summary(job: GgufExportJob, tensors: list[PlannedTensor], ftype: int, arch: str) -> dict[str, Any]:
    return {"out": str(job.out), "model": job.model, "arch": arch, "bytes": job.out.stat().st_size,
            "tensors": len(tensors), "repacked": sum(t.repacked for t in tensors),
            "types": dict(sorted(Counter(t.qtype.name for t in tensors).items())),
            "file_type": gguf.LlamaFileType(ftype).name,
            "fallbacks": {t.name: t.fallback for t in tensors if t.fallback}}


# ------------------------------------------------------------------------------------------------ CLI

def add_parser(esub: argparse._SubParsersAction) -> None:
    g = esub.add_parser("gguf", help="a GGUF file for llama.cpp (repack a moequant checkpoint, or convert a float model)",
                        description="Write a GGUF file llama.cpp loads: a moequant checkpoint's packed tensors "
                                    "repacked bit for bit into their ggml types, or a float model converted.")
    g.add_argument("model", help="moequant checkpoint directory, or a float model (zoo alias, HF directory, "
                                 ".gguf, hub id)")
    g.add_argument("--out", required=True, type=Path, help="the .gguf file to write")
    g.add_argument("--types", default="auto", choices=["auto", *FLOAT_TYPES],
                   help="auto: repack a checkpoint (float models: f16); f32/f16/bf16/q8_0/q4_0/q4_1: the type of "
                        "every weight matrix of a float model (norms, routers, biases stay F32)")
    g.add_argument("--kept-type", default="stored", choices=KEPT_TYPES,
                   help="checkpoints: the type of the matrices the run kept in full precision (default: as stored)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing GGUF file")
    c = g.add_argument_group("importance matrix (float models)")
    c.add_argument("--imatrix-out", type=Path, help="also write the calibration Hessian diagonals as a llama.cpp "
                                                    "imatrix file (GGUF format; llama-quantize --imatrix)")
    add_calib_arguments(c, data_help="default ptb, train split", samples=128, defer_defaults=True)
    g.set_defaults(func=cmd_export_gguf)


def cmd_export_gguf(args: argparse.Namespace) -> int:
    given = [f for f in ("calib", "calib_samples", "calib_seqlen", "calib_seed") if getattr(args, f) is not None]
    if given and args.imatrix_out is None:
        raise MoequantError(f"--{given[0].replace('_', '-')} applies with --imatrix-out")
    d = CalibData()
    try:
        calib = CalibData(data=args.calib or d.data, split="train",
                          samples=d.samples if args.calib_samples is None else args.calib_samples,
                          seqlen=d.seqlen if args.calib_seqlen is None else args.calib_seqlen,
                          seed=d.seed if args.calib_seed is None else args.calib_seed)
    except ValueError as e:
        raise MoequantError(str(e)) from None
    job = GgufExportJob(model=args.model, out=args.out, types=args.types, kept_type=args.kept_type,
                        overwrite=args.overwrite, imatrix_out=args.imatrix_out, calib=calib,
                        calib_batch_size=args.calib_batch_size)
    s = export_gguf(job)
    types = ", ".join(f"{n} x{c}" for n, c in s["types"].items())
    print(f"wrote {s['out']}: {s['arch']}, {s['tensors']} tensors ({s['repacked']} repacked; {types}), "
          f"{s['bytes'] / 2**20:.1f} MiB, file type {s['file_type']}")
    for name, why in s["fallbacks"].items():
        print(f"  {name}: F16 ({why})")
    if "imatrix" in s:
        c = s["imatrix"]["calib"]
        print(f"wrote {s['imatrix']['out']}: imatrix of {s['imatrix']['entries']} weights over {c['samples']} x "
              f"{c['seqlen']} tokens of {c['data']}")
    return 0
