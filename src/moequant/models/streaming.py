"""Streaming weights for ``--offload``: build a model on the meta device, fill one decoder layer at a
time from the safetensors files, empty it again, and write the output checkpoint piece by piece.

- ``read_param``: one in-memory parameter name -> its tensor from disk, assembling fused experts
  (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) from the per-expert linears that
  ``save_pretrained`` writes, with the adapter's on-disk renames (Mixtral's ``block_sparse_moe``, ``w1/w3/w2``).
- ``materialize`` / ``release``: a module's parameters from disk / back to the meta device.
- ``embed_rows``: embeddings of token ids read row by row (the table is never loaded whole).
- ``StreamingWriter``: safetensors shards written as they come, plus tensors copied from the source
  files in chunks of raw bytes (embeddings and head are never held in memory), then the index.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moequant.errors import MoequantError
from moequant.formats.checkpoint import SHARD_METADATA, ShardReader, write_index
from moequant.formats.safetensors_io import ST_ITEMSIZE, copy_range, encode_header, write_safetensors
from moequant.models.adapters import ModelAdapter


def _disk_names(name: str, adapter: ModelAdapter) -> list[str]:
    out = [name]
    for mem, disk in adapter.disk_renames:
        if mem in name:
            out.append(name.replace(mem, disk))
    return out


def read_param(reader: ShardReader, name: str, adapter: ModelAdapter, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor of parameter/buffer ``name`` (expected ``shape``) from the checkpoint."""
    for key in _disk_names(name, adapter):
        if key in reader:
            return reader.read(key)
    base, _, param = name.rpartition(".")
    if len(shape) == 3 and param in ("gate_up_proj", "down_proj"):
        g, u, d = adapter.disk_expert_names
        for b in _disk_names(base, adapter):
            if f"{b}.0.{d}.weight" not in reader:
                continue
            if param == "gate_up_proj":
                return torch.stack([torch.cat([reader.read(f"{b}.{e}.{g}.weight"), reader.read(f"{b}.{e}.{u}.weight")])
                                    for e in range(shape[0])])  # [E, 2I, H]
            return torch.stack([reader.read(f"{b}.{e}.{d}.weight") for e in range(shape[0])])  # [E, H, I]
    raise MoequantError(f"{reader.path}: checkpoint has no tensor for {name} {tuple(shape)}")


def materialize(module: nn.Module, prefix: str, reader: ShardReader, adapter: ModelAdapter,
                dtype: torch.dtype | None = None) -> None:
    """Load every meta parameter and buffer of ``module`` (full names ``prefix.<name>``) from disk."""
    state = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if not t.is_meta:
            continue
        v = read_param(reader, f"{prefix}.{name}", adapter, tuple(t.shape))
        if tuple(v.shape) != tuple(t.shape):
            raise MoequantError(f"{reader.path}: {prefix}.{name} has shape {tuple(v.shape)}, the model expects "
                                f"{tuple(t.shape)}")
        state[name] = v.to(dtype if dtype is not None and v.is_floating_point() else v.dtype)
    module.load_state_dict(state, strict=False, assign=True)


def release(module: nn.Module) -> None:
    """Move every tensor of ``module`` to the meta device (frees its memory)."""
    module.to(torch.device("meta"))


def embed_rows(reader: ShardReader, key: str, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``table[ids]`` for an embedding table stored under ``key``, reading only the rows used:
    ids ``[B, L]`` -> ``[B, L, H]``."""
    uniq, inv = torch.unique(ids, return_inverse=True)
    sl = reader.slice(key)
    parts, ids_sorted = [], uniq.tolist()
    start = 0
    for i in range(1, len(ids_sorted) + 1):  # read runs of consecutive ids as one slice
        if i == len(ids_sorted) or ids_sorted[i] != ids_sorted[i - 1] + 1:
            parts.append(sl[ids_sorted[start]:ids_sorted[i - 1] + 1])
            start = i
    rows = torch.cat(parts).to(dtype)  # [U, H]
    return rows[inv]


class StreamingWriter:
    """Write a checkpoint directory shard by shard (``add``), or by raw copy from a source checkpoint
    (``copy``), then ``finish`` with the index. Tensors keep their dtype and bytes exactly; every shard is
    written by ``formats.safetensors_io`` (sorted header: same tensors, same bytes) and each tensor's
    digest is taken from the bytes written, for the index."""

    def __init__(self, out_dir: Path) -> None:
        self.out = Path(out_dir)
        self.weight_map: dict[str, str] = {}
        self.digests: dict[str, str] = {}
        self.total = 0
        self._n = 0

    def _next_name(self) -> str:
        self._n += 1
        return f"model-{self._n:05d}.safetensors"

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        fname = self._next_name()
        digests = write_safetensors(self.out / fname, tensors, SHARD_METADATA)
        self._record(fname, {k: v.numel() * v.element_size() for k, v in tensors.items()}, digests)

    def _record(self, fname: str, sizes: dict[str, int], digests: dict[str, str]) -> None:
        for k, nb in sizes.items():
            if k in self.weight_map:
                raise MoequantError(f"tensor {k} written twice")
            self.weight_map[k] = fname
            self.total += nb
        self.digests.update(digests)

    def copy(self, reader: ShardReader, keys: dict[str, str]) -> None:
        """Copy ``{source_key: output_name}`` byte for byte into one new shard, in chunks (a source
        tensor with a recorded digest is verified on the way)."""
        if not keys:
            return
        entries, offset = {}, 0
        sources = []
        located = {src: reader.raw_location(src) for src in keys}
        # file order as write_safetensors: element size descending, then name (each tensor aligned)
        for src, dst in sorted(keys.items(), key=lambda kv: (-ST_ITEMSIZE.get(located[kv[0]][1]["dtype"], 1), kv[1])):
            path, info, start = located[src]
            nbytes = info["data_offsets"][1] - info["data_offsets"][0]
            entries[dst] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + nbytes]}
            sources.append((src, dst, path, start, nbytes))
            offset += nbytes
        fname = self._next_name()
        digests = {}
        with open(self.out / fname, "wb") as f:
            f.write(encode_header(entries, SHARD_METADATA))
            for src, dst, path, start, nbytes in sources:
                digests[dst] = copy_range(path, start, nbytes, f)
                reader.check_digest(src, digests[dst])
        self._record(fname, {dst: e["data_offsets"][1] - e["data_offsets"][0] for dst, e in entries.items()}, digests)

    def finish(self) -> None:
        write_index(self.out, self.weight_map, self.total, self.digests)
