"""Checkpoint files: safetensors shards + ``model.safetensors.index.json`` + ``config.json`` carrying
``quantization_config``. No pickle anywhere.

Contract (``moequant`` checkpoint format version 1):
- ``config.json`` is the model's own config plus ``quantization_config = {"quant_method": "moequant",
  "format_version": 1, "moequant_version", "recipe", "tensors": {param_name: meta}, "tied": {dropped: kept}}``
  where each ``meta`` is ``QuantizedTensor.meta()`` (format id and version, logical shape, attributes);
- a quantized parameter ``P`` is stored as the tensors ``P_<data>`` of its format's ``data_names``;
- every other parameter and persistent buffer is stored under its own name in its own dtype; a
  parameter that shares storage with an earlier one (tied embeddings) is stored once.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moequant.errors import MoequantError
from moequant.fsutil import AtomicDir  # noqa: F401  (re-exported: it moved to fsutil)

CHECKPOINT_FORMAT_VERSION = 1
QUANT_METHOD = "moequant"
INDEX_NAME = "model.safetensors.index.json"
# torch dtype <-> safetensors dtype string
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}
_TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}


def write_shards(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = 2 << 30) -> list[str]:
    """Write ``tensors`` into shards of at most ``max_shard_bytes`` (one tensor never split)."""
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
    weight_map = {}
    for fname, shard in zip(files, shards):
        save_file(shard, str(out_dir / fname), metadata={"format": "pt", "producer": QUANT_METHOD})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(out_dir / INDEX_NAME, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1, sort_keys=True)
    return files


class ShardReader:
    """Lazy access to the tensors of a checkpoint directory (one file or an index of shards)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            with safe_open(str(self.path / "model.safetensors"), framework="pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise MoequantError(f"{self.path}: no model.safetensors or {INDEX_NAME}")
        self._open: dict[str, Any] = {}
        self._headers: dict[Path, tuple[dict[str, Any], int]] = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)

    def _handle(self, key: str) -> Any:
        if key not in self.weight_map:
            raise MoequantError(f"{self.path}: checkpoint lacks tensor {key!r}")
        fname = self.weight_map[key]
        if fname not in self._open:
            fpath = self.path / fname
            if not fpath.is_file():
                raise MoequantError(f"{self.path}: shard {fname} listed in the index is missing")
            self._open[fname] = safe_open(str(fpath), framework="pt")
        return self._open[fname]

    def read(self, key: str) -> torch.Tensor:
        """``key``'s tensor read with plain file reads into fresh memory, not through the mmap that
        ``get`` uses: its pages leave the process when the tensor is freed (the streaming path reads
        every layer once, and mmapped pages would stay counted in RSS until the kernel reclaims them)."""
        path, info, start = self.raw_location(key)
        dtype = _TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise MoequantError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which moequant cannot read")
        nbytes = info["data_offsets"][1] - info["data_offsets"][0]
        out = torch.empty(nbytes, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            got = f.readinto(memoryview(out.numpy()))
        if got != nbytes:
            raise MoequantError(f"{path}: truncated safetensors file (tensor {key!r})")
        return out.view(dtype).reshape(info["shape"])

    def slice(self, key: str) -> Any:
        """A lazy slice object: ``reader.slice(k)[a:b]`` reads only those rows."""
        return self._handle(key).get_slice(key)

    def raw_location(self, key: str) -> tuple[Path, dict[str, Any], int]:
        """(file, its header entry for ``key``, absolute byte offset of the tensor's data)."""
        self._handle(key)
        path = self.path / self.weight_map[key]
        if path not in self._headers:
            self._headers[path] = safetensors_header(path)
        header, data_start = self._headers[path]
        info = header[key]
        return path, info, data_start + info["data_offsets"][0]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.keys():
            yield k, self.get(k)


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header dict, byte offset where the data section starts) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def checkpoint_bytes(path: Path) -> int:
    """Bytes of every file in the checkpoint directory (safetensors headers and JSON included)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def read_quantization_config(path: Path) -> dict[str, Any]:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise MoequantError(f"{path}: no config.json (not a checkpoint directory)")
    cfg = json.loads(cfg_path.read_text())
    q = cfg.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise MoequantError(f"{cfg_path}: not a moequant checkpoint (quantization_config.quant_method != 'moequant')")
    if int(q.get("format_version", 0)) > CHECKPOINT_FORMAT_VERSION:
        raise MoequantError(f"{cfg_path}: checkpoint format {q['format_version']} is newer than this moequant "
                            f"supports ({CHECKPOINT_FORMAT_VERSION}); upgrade moequant")
    return q
