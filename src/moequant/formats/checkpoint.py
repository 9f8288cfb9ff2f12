"""Checkpoint files: safetensors shards + ``model.safetensors.index.json`` + ``config.json`` carrying
``quantization_config``. No pickle anywhere.

Contract (``moequant`` checkpoint format version 1):
- ``config.json`` is the model's own config plus ``quantization_config = {"quant_method": "moequant",
  "format_version": 1, "moequant_version", "recipe", "tensors": {param_name: meta}, "tied": {dropped: kept}}``
  where each ``meta`` is ``QuantizedTensor.meta()`` (format id and version, logical shape, attributes);
- a quantized parameter ``P`` is stored as the tensors ``P_<data>`` of its format's ``data_names``;
- every other parameter and persistent buffer is stored under its own name in its own dtype; a
  parameter that shares storage with an earlier one (tied embeddings) is stored once;
- a tied head over a *packed* embedding table is only a ``tied`` entry whose value names a key of
  ``tensors`` (``{"lm_head.weight": "model.embed_tokens.weight"}``): loaded, it computes from that packed
  tensor (``nn.quant_embedding.TiedQuantLinear``);
- optional ``"exact": [param_name, ...]``, keys of ``tensors``: tables the recipe kept that are stored packed
  because every value lies on the format's grid (``embed_head.with_exact_grids``): decoded, they are the
  kept float32 values bit for bit, so they are not counted as quantized.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open

from moequant.errors import MoequantError
from moequant.formats.base import QuantizedTensor, check_data
from moequant.fsutil import AtomicDir  # noqa: F401  (re-exported: it moved to fsutil)
from moequant.formats.safetensors_io import ST_DTYPES  # noqa: F401  (re-exported)
from moequant.formats.safetensors_io import (DIGEST_ALGORITHM, TORCH_DTYPES, new_digest, range_digest, read_header,
                                             write_safetensors)

CHECKPOINT_FORMAT_VERSION = 1
QUANT_METHOD = "moequant"
INDEX_NAME = "model.safetensors.index.json"
SHARD_METADATA = {"format": "pt", "producer": QUANT_METHOD}


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int, digests: dict[str, str]) -> None:
    """``model.safetensors.index.json``, written for every checkpoint (one shard too): the weight map and,
    in its metadata, each tensor's digest ``{"algorithm", "tensors": {name: hex}}``. Sorted keys."""
    index = {"metadata": {"total_size": total_size,
                          "digests": {"algorithm": DIGEST_ALGORITHM, "tensors": dict(sorted(digests.items()))}},
             "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")


def write_shards(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = 2 << 30) -> list[str]:
    """Write ``tensors`` into shards of at most ``max_shard_bytes`` (one tensor never split) and the index.
    Same tensors, same bytes: shard headers and JSON have sorted keys."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        nb = t.numel() * t.element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nb
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    digests: dict[str, str] = {}
    for fname, shard in zip(files, shards):
        digests.update(write_safetensors(out_dir / fname, shard, SHARD_METADATA))
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_index(out_dir, weight_map, total, digests)
    return files


class ShardReader:
    """Checked, lazy access to the tensors of a checkpoint directory (one file or an index of shards).

    - The index must be an object whose ``weight_map`` maps names to shard file names that stay in the
      directory (no path separators, no ``..``, no symlink leading out); every shard header is checked
      (``safetensors_io.read_header``) before a tensor of it is read.
    - ``verify`` (default): a tensor whose digest the index records is hashed as it is read (``read``,
      ``slice``, and ``StreamingWriter.copy`` through ``check_digest``) and a mismatch is an error naming
      the tensor. ``digests`` is None when the index records none (an older moequant, or any HF model).
    Every failure is a ``MoequantError`` naming the file (and the tensor).
    """

    def __init__(self, path: Path, verify: bool = True) -> None:
        self.path = Path(path)
        self.verify = verify
        self.digests: dict[str, str] | None = None
        index = self.path / INDEX_NAME
        if index.is_file() or index.is_symlink():
            self.weight_map, self.digests = _read_index(self.path, index)
        elif (self.path / "model.safetensors").is_file():
            header = read_header(self.path / "model.safetensors")[0]
            self.weight_map = {k: "model.safetensors" for k in header}
        else:
            raise MoequantError(f"{self.path}: no model.safetensors or {INDEX_NAME}")
        self._files: dict[str, Path] = {}
        self._headers: dict[Path, tuple[dict[str, Any], int]] = {}
        self._open: dict[Path, Any] = {}
        self._verified: set[str] = set()

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str) -> torch.Tensor:
        return self.read(key)

    def file(self, key: str) -> Path:
        """The shard holding ``key``, confined to the checkpoint directory."""
        if key not in self.weight_map:
            raise MoequantError(f"{self.path}: checkpoint lacks tensor {key!r}")
        fname = self.weight_map[key]
        if fname not in self._files:
            self._files[fname] = _confined_shard(self.path, fname)
        return self._files[fname]

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype | None]:
        """(shape, torch dtype or None) of ``key`` from its shard's header, without reading the data."""
        _, info, _ = self.raw_location(key)
        return tuple(info["shape"]), TORCH_DTYPES.get(info["dtype"])

    def read(self, key: str) -> torch.Tensor:
        """``key``'s tensor read with plain file reads into fresh memory, not through an mmap: its pages
        leave the process when the tensor is freed (the streaming path reads every layer once, and mmapped
        pages would stay counted in RSS until the kernel reclaims them). Verified when ``verify``."""
        path, info, start = self.raw_location(key)
        dtype = TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise MoequantError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which moequant cannot read")
        nbytes = info["data_offsets"][1] - info["data_offsets"][0]
        out = torch.empty(nbytes, dtype=torch.uint8)
        try:
            with open(path, "rb", buffering=0) as f:
                f.seek(start)
                got = f.readinto(memoryview(out.numpy()))
        except OSError as e:
            raise MoequantError(f"{path}: cannot read tensor {key!r} ({e.strerror or e})") from None
        if got != nbytes:
            raise MoequantError(f"{path}: truncated safetensors file (tensor {key!r})")
        if self._must_verify(key):
            h = new_digest()
            h.update(memoryview(out.numpy()))
            self.check_digest(key, h.hexdigest())
        return out.view(dtype).reshape(info["shape"])

    def slice(self, key: str) -> Any:
        """A lazy slice object: ``reader.slice(k)[a:b]`` reads only those rows (the whole tensor is hashed
        once first, in chunks, when it has a digest to verify)."""
        path, info, start = self.raw_location(key)
        if self._must_verify(key):
            self.check_digest(key, range_digest(path, start, info["data_offsets"][1] - info["data_offsets"][0]))
        if path not in self._open:
            try:
                self._open[path] = safe_open(str(path), framework="pt")
            except SafetensorError as e:
                raise MoequantError(f"{path}: corrupted safetensors file ({_first_line(e)})") from None
        return self._open[path].get_slice(key)

    def raw_location(self, key: str) -> tuple[Path, dict[str, Any], int]:
        """(file, its header entry for ``key``, absolute byte offset of the tensor's data)."""
        path = self.file(key)
        if path not in self._headers:
            header, _, data_start = read_header(path)
            self._headers[path] = header, data_start
        header, data_start = self._headers[path]
        info = header.get(key)
        if info is None:
            raise MoequantError(f"{path}: has no tensor {key!r}, which {INDEX_NAME} places there")
        return path, info, data_start + info["data_offsets"][0]

    def _must_verify(self, key: str) -> bool:
        return self.verify and self.digests is not None and key not in self._verified

    def check_digest(self, key: str, hexdigest: str) -> None:
        """``hexdigest`` (of ``key``'s data bytes as just read) against the index; no-op unless verifying."""
        if not self.verify or self.digests is None:
            return
        want = self.digests.get(key)
        if want is None:
            raise MoequantError(f"{self.path / INDEX_NAME}: records no digest for tensor {key!r} (the index "
                                "was edited or truncated)")
        if hexdigest != want:
            raise MoequantError(f"{self.file(key)}: tensor {key!r} is corrupted (its {DIGEST_ALGORITHM} does not "
                                f"match {INDEX_NAME})")
        self._verified.add(key)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.keys():
            yield k, self.read(k)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise MoequantError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise MoequantError(f"{path}: {what} is not valid JSON ({_first_line(e)})") from None


def _read_index(root: Path, index: Path) -> tuple[dict[str, str], dict[str, str] | None]:
    """(weight map, digests or None) of ``index``, every field checked."""
    obj = _read_json(index, "the shard index")
    if not isinstance(obj, dict):
        raise MoequantError(f"{index}: the shard index is a {type(obj).__name__}, not an object")
    wm = obj.get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise MoequantError(f"{index}: weight_map is not a map of tensor names to shard file names")
    for fname in set(wm.values()):
        _check_shard_name(root, fname)
    meta = obj.get("metadata", {})
    if not isinstance(meta, dict):
        raise MoequantError(f"{index}: metadata is not an object")
    dg = meta.get("digests")
    if dg is None:
        return wm, None
    tensors = dg.get("tensors") if isinstance(dg, dict) else None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tensors.items()):
        raise MoequantError(f"{index}: metadata.digests is not {{'algorithm', 'tensors': {{name: hex}}}}")
    if dg.get("algorithm") != DIGEST_ALGORITHM:
        raise MoequantError(f"{index}: digest algorithm {dg.get('algorithm')!r} is not supported "
                            f"(this moequant writes and checks {DIGEST_ALGORITHM})")
    return wm, tensors


def _check_shard_name(root: Path, fname: str) -> None:
    """A shard name is a plain file name in the checkpoint directory: no separator, no ``..``, not absolute."""
    if (not fname or fname in (".", "..") or "/" in fname or "\\" in fname or "\0" in fname
            or Path(fname).is_absolute() or Path(fname).name != fname):
        raise MoequantError(f"{root / INDEX_NAME}: shard name {fname!r} is not a file name inside the checkpoint "
                            "directory")


def _confined_shard(root: Path, fname: str) -> Path:
    """``root / fname`` after checking it is a regular file whose real path (symlinks resolved) lies in ``root``."""
    _check_shard_name(root, fname)
    p = root / fname
    try:
        real, real_root = p.resolve(strict=True), root.resolve(strict=True)
    except (OSError, RuntimeError):
        raise MoequantError(f"{root}: shard {fname} listed in the index is missing") from None
    if real.parent != real_root:
        raise MoequantError(f"{p}: shard is a link to {real}, outside the checkpoint directory")
    if not real.is_file():
        raise MoequantError(f"{p}: shard is not a regular file")
    return p


def packed_evidence(path: Path) -> str | None:
    """Why the safetensors files of the HF-style directory ``path`` look like a moequant packed checkpoint
    (its shards' producer is moequant, or tensor names end in a format's data suffix such as
    ``.weight_codes``), or None. A directory whose ``config.json`` lost ``quantization_config`` would
    otherwise load in transformers as a randomly initialised model."""
    from moequant.formats.registry import FORMATS

    suffixes = {f"_{d}" for f in FORMATS for d in FORMATS.get(f).data_names}
    suffixes |= {f"_inner{s}" for s in suffixes}
    try:
        reader = ShardReader(path, verify=False)
        first = reader.file(next(iter(reader.weight_map))) if reader.weight_map else None
        producer = read_header(first)[1].get("producer") if first is not None else None
    except (MoequantError, StopIteration):
        return None
    if producer == QUANT_METHOD:
        return f"its shards were written by moequant ({first.name}: producer={QUANT_METHOD})"
    for k in reader.keys():
        base, sep, data = k.rpartition("_")
        if sep and f"_{data}" in suffixes and base.endswith((".weight", "_proj", ".weight_inner")):
            return f"it holds packed tensors such as {k!r}"
    return None


def checkpoint_bytes(path: Path) -> int:
    """Bytes of every file in the checkpoint directory (safetensors headers and JSON included)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ------------------------------------------------------------------------------------------------
# quantization_config: read, checked, sealed
# ------------------------------------------------------------------------------------------------

def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def seal_quantization_config(qcfg: dict[str, Any]) -> dict[str, Any]:
    """``qcfg`` plus ``integrity = {"algorithm", "digest"}``: the digest of its canonical JSON (sorted keys,
    no spaces) without that field. What decodes the tensors (formats, attributes, shapes, tied names) is
    then covered like the tensors themselves."""
    plain = json.loads(_canonical({k: v for k, v in qcfg.items() if k != "integrity"}))
    h = new_digest()
    h.update(_canonical(plain))
    return {**plain, "integrity": {"algorithm": DIGEST_ALGORITHM, "digest": h.hexdigest()}}


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` of the checkpoint directory ``path`` as an object (one-line errors otherwise)."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise MoequantError(f"{path}: no config.json (not a checkpoint directory)")
    cfg = _read_json(cfg_path, "config.json")
    if not isinstance(cfg, dict):
        raise MoequantError(f"{cfg_path}: is a JSON {type(cfg).__name__}, not an object")
    return cfg


def read_quantization_config(path: Path, verify: bool = True) -> dict[str, Any]:
    """``quantization_config`` of the checkpoint ``path``, checked: method and version, its seal (when
    ``verify`` and the checkpoint has one: ``has_seal``), ``tensors`` a map of names to metadata that
    their format accepts (``QuantizedTensor.check_meta``), ``tied`` a map of names to names."""
    cfg_path = Path(path) / "config.json"
    q = read_config(path).get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise MoequantError(f"{cfg_path}: not a moequant checkpoint (quantization_config.quant_method != 'moequant')")
    version = q.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise MoequantError(f"{cfg_path}: quantization_config.format_version {version!r} is not an int")
    if version > CHECKPOINT_FORMAT_VERSION:
        raise MoequantError(f"{cfg_path}: checkpoint format {version} is newer than this moequant "
                            f"supports ({CHECKPOINT_FORMAT_VERSION}); upgrade moequant")
    if verify and "integrity" in q:
        seal = q["integrity"]
        if not isinstance(seal, dict) or seal.get("algorithm") != DIGEST_ALGORITHM:
            raise MoequantError(f"{cfg_path}: quantization_config.integrity {seal!r} is not a {DIGEST_ALGORITHM} seal")
        if seal_quantization_config(q)["integrity"] != seal:
            raise MoequantError(f"{cfg_path}: quantization_config was changed after it was written (its "
                                f"{DIGEST_ALGORITHM} does not match integrity.digest)")
    tensors, tied = q.get("tensors"), q.get("tied", {})
    if not isinstance(tensors, dict):
        raise MoequantError(f"{cfg_path}: quantization_config.tensors is not a map of tensor names to metadata")
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise MoequantError(f"{cfg_path}: quantization_config.tied is not a map of tensor names to tensor names")
    exact = q.get("exact", [])
    if not isinstance(exact, list) or not all(isinstance(n, str) and n in tensors for n in exact):
        raise MoequantError(f"{cfg_path}: quantization_config.exact is not a list of names of its packed tensors")
    for name, meta in tensors.items():
        tensor_meta(cfg_path, name, meta)
    return q


def tensor_meta(cfg_path: Path, name: str, meta: Any) -> tuple[type[QuantizedTensor], tuple[int, ...], dict[str, Any]]:
    """(format class, shape, attributes) of the packed tensor ``name``, its metadata checked."""
    from moequant.formats.registry import FORMATS

    fmt = meta.get("format") if isinstance(meta, dict) else None
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise MoequantError(f"{cfg_path}: tensor {name!r} has unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    cls = FORMATS.get(fmt)
    try:
        shape, attrs = cls.check_meta(meta)
        cls.data_spec(shape, attrs)
    except (ValueError, TypeError, KeyError) as e:
        raise MoequantError(f"{cfg_path}: tensor {name!r}: bad metadata ({_first_line(e)})") from None
    return cls, shape, attrs


def read_packed(reader: ShardReader, name: str, meta: dict[str, Any], device: str | torch.device = "cpu"
                ) -> QuantizedTensor:
    """The packed tensor ``name``: its data tensors' shapes and dtypes (from the shard headers) checked
    against what its metadata implies before any byte is read, then read (and verified) and built."""
    cls, shape, attrs = tensor_meta(reader.path / "config.json", name, meta)
    spec = cls.data_spec(shape, attrs)
    found = {}
    for d in spec:
        key = f"{name}_{d}"
        if key not in reader:
            raise MoequantError(f"{reader.path}: checkpoint lacks tensor {key!r} of the {cls.format_id} tensor {name!r}")
        found[d] = reader.info(key)
    try:
        check_data(cls, shape, attrs, found)
    except ValueError as e:
        raise MoequantError(f"{reader.path}: tensor {name!r}: {e}") from None
    tensors = {f"{name}_{d}": reader.read(f"{name}_{d}").to(device) for d in spec}
    try:
        return cls.from_state_dict(tensors, name, meta)
    except (ValueError, TypeError, KeyError) as e:
        raise MoequantError(f"{reader.path}: tensor {name!r}: {_first_line(e)}") from None
