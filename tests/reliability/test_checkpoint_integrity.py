"""Checkpoints are byte-reproducible, verified and checked: every corruption is a one-line MoequantError
naming the file (and the tensor), never a traceback and never a silently altered model."""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_model
from moequant import api
from moequant.alloc.recipe import Recipe
from moequant.codecs.config import UniformConfig
from moequant.errors import MoequantError
from moequant.formats.checkpoint import INDEX_NAME, ShardReader, write_shards
from moequant.formats.safetensors_io import read_header, write_safetensors

ASYM4 = UniformConfig(bits=4, group_size=32, symmetric=False)


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, one_thread) -> Path:
    """A tiny Llama, int4 asym g32, saved once (tests copy it before damaging it)."""
    model = tiny_model("llama")
    api.quantize(model, Recipe.uniform(ASYM4), progress=False)
    out = tmp_path_factory.mktemp("ckpt") / "int4"
    api.save(model, out)
    return out


# --- byte-reproducible ------------------------------------------------------------------------------

def test_two_saves_of_the_same_model_are_byte_identical(tmp_path, one_thread):
    got = []
    for i in range(2):
        model = tiny_model("llama")
        api.quantize(model, Recipe.uniform(ASYM4), progress=False)
        api.save(model, tmp_path / f"c{i}")
        got.append(_hashes(tmp_path / f"c{i}"))
    assert got[0] == got[1]
    assert {"config.json", "model.safetensors", INDEX_NAME} <= set(got[0])


def test_writer_output_is_sorted_aligned_and_read_by_safetensors(tmp_path):
    ts = {"b": torch.arange(6, dtype=torch.int16).reshape(2, 3), "a": torch.tensor([1.5, -2.0]),
          "c": torch.tensor([True, False, True]), "d": torch.tensor(7, dtype=torch.int64)}
    meta = {"z": "1", "producer": "moequant", "a": "2"}
    digests = write_safetensors(tmp_path / "x.safetensors", ts, meta)
    raw = (tmp_path / "x.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n]
    assert n % 8 == 0
    text = header.decode().rstrip(" ")
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    # element size descending, then name: d (8), a (4), b (2), c (1)
    entries, _, start = read_header(tmp_path / "x.safetensors")
    assert [k for k, _ in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"])] == ["d", "a", "b", "c"]
    assert start == 8 + n
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == meta
        for k, t in ts.items():
            assert torch.equal(f.get_tensor(k), t), k
    assert digests["a"] == hashlib.sha256(ts["a"].numpy().tobytes()).hexdigest()


def test_transformers_reads_the_shards_and_index(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    files = write_shards(dict(model.state_dict()), tmp_path, max_shard_bytes=200_000)
    assert len(files) == 3
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    for k, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], t), k
