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


def test_streaming_writer_is_deterministic_and_records_digests(tmp_path):
    from moequant.models.streaming import StreamingWriter

    src = tmp_path / "src"
    src.mkdir()
    write_shards({"emb": torch.arange(12, dtype=torch.float16).reshape(3, 4), "n": torch.ones(4)}, src)
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        out.mkdir()
        w = StreamingWriter(out)
        w.add({"l.b": torch.tensor([1, 2], dtype=torch.uint8), "l.a": torch.tensor([0.5, 0.25])})
        w.copy(ShardReader(src), {"emb": "model.emb", "n": "model.norm"})
        w.finish()
        outs.append(_hashes(out))
    assert outs[0] == outs[1]
    r = ShardReader(tmp_path / "o0")
    assert sorted(r.digests) == ["l.a", "l.b", "model.emb", "model.norm"]
    assert torch.equal(r.read("model.emb"), torch.arange(12, dtype=torch.float16).reshape(3, 4))
    # copied tensors are laid out like written ones: element size descending, so each is aligned
    for key in r.keys():
        _, info, start = r.raw_location(key)
        assert start % {"F32": 4, "F16": 2, "U8": 1}[info["dtype"]] == 0, key
    _, info, _ = r.raw_location("model.norm")
    assert info["data_offsets"][0] == 0


# --- helpers that damage a copy of the checkpoint --------------------------------------------------

def _copy(ckpt: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "c"
    shutil.copytree(ckpt, out)
    return out


def _index(d: Path) -> dict:
    return json.loads((d / INDEX_NAME).read_text())


def _set_index(d: Path, index: dict) -> None:
    (d / INDEX_NAME).write_text(json.dumps(index))


def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def _set_qcfg(d: Path, qcfg: dict, reseal: bool) -> None:
    from moequant.formats.checkpoint import seal_quantization_config

    cfg = _config(d)
    cfg["quantization_config"] = seal_quantization_config(qcfg) if reseal else qcfg
    (d / "config.json").write_text(json.dumps(cfg))


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    r = ShardReader(d, verify=False)
    return {k: r.read(k).clone() for k in r.keys()}


def _rewrite(d: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` as the checkpoint's shards with a consistent index (fresh digests): a file
    that passes every byte check, for the checks that come after them."""
    for p in d.glob("*.safetensors"):
        p.unlink()
    write_shards(tensors, d)


def _data_offset(d: Path, key: str) -> int:
    _, info, start = ShardReader(d).raw_location(key)
    return start


def _load_error(d: Path, **kw) -> str:
    with pytest.raises(MoequantError) as e:
        api.load(d, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


CODES = "model.layers.0.self_attn.q_proj.weight_codes"
ZERO = "model.layers.0.self_attn.q_proj.weight_zero"
SCALE = "model.layers.0.mlp.down_proj.weight_scale"
QPARAM = "model.layers.0.self_attn.q_proj.weight"


# --- digests ----------------------------------------------------------------------------------------

def test_index_records_the_sha256_of_every_tensor(ckpt):
    index = _index(ckpt)
    dg = index["metadata"]["digests"]
    assert dg["algorithm"] == "sha256"
    assert set(dg["tensors"]) == set(index["weight_map"])
    for k, t in _tensors(ckpt).items():
        assert dg["tensors"][k] == hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest(), k
    assert _config(ckpt)["quantization_config"]["integrity"]["algorithm"] == "sha256"


@pytest.mark.parametrize("key", [CODES, ZERO, SCALE, "model.norm.weight"])
def test_flipped_data_byte_is_a_digest_error_naming_the_tensor(ckpt, tmp_path, key):
    d = _copy(ckpt, tmp_path)
    shard = d / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[_data_offset(d, key)] ^= 0x10
    shard.write_bytes(bytes(raw))
    msg = _load_error(d)
    assert f"{shard}: tensor {key!r} is corrupted (its sha256 does not match" in msg
    # verify=False skips the digests: the flipped byte is then loaded as it is
    model = api.load(d, verify=False)
    assert model is not None


def test_swapped_tensor_offsets_are_a_digest_error(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    shard = d / "model.safetensors"
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    # two tensors of the same shape and dtype: swapping their offsets keeps every header check happy
    a, b = "model.layers.0.mlp.gate_proj.weight_codes", "model.layers.0.mlp.up_proj.weight_codes"
    assert header[a]["shape"] == header[b]["shape"]
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (n - len(text))
    shard.write_bytes(raw[:8] + text + raw[8 + n:])
    msg = _load_error(d)
    assert "is corrupted (its sha256 does not match" in msg and ("gate_proj" in msg or "up_proj" in msg)


def test_checkpoint_without_digests_loads_with_one_warning(ckpt, tmp_path, caplog):
    d = _copy(ckpt, tmp_path)
    index = _index(d)
    del index["metadata"]["digests"]
    _set_index(d, index)
    q = _config(d)["quantization_config"]
    del q["integrity"]
    _set_qcfg(d, q, reseal=False)
    with caplog.at_level(logging.WARNING):
        model = api.load(d)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{d}: no tensor digests (written by an older moequant): loaded without verification"]
    ref = api.load(ckpt)
    a, b = api.packed_modules(ref), api.packed_modules(model)
    for k in a:
        for n in a[k].data:
            assert torch.equal(a[k].data[n], b[k].data[n]), (k, n)


def test_index_missing_one_digest_or_with_unknown_algorithm_is_an_error(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    index = _index(d)
    del index["metadata"]["digests"]["tensors"][CODES]
    _set_index(d, index)
    assert f"records no digest for tensor {CODES!r}" in _load_error(d)
    index["metadata"]["digests"]["algorithm"] = "md5"
    _set_index(d, index)
    assert "digest algorithm 'md5' is not supported" in _load_error(d)


def test_edited_quantization_config_breaks_its_seal(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    q = _config(d)["quantization_config"]
    q["tensors"][QPARAM]["bits"] = 3
    _set_qcfg(d, q, reseal=False)
    assert "quantization_config was changed after it was written" in _load_error(d)


def test_slice_verifies_the_whole_tensor_first(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    shard = d / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[_data_offset(d, "model.embed_tokens.weight") + 1000] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(MoequantError, match="'model.embed_tokens.weight' is corrupted"):
        ShardReader(d).slice("model.embed_tokens.weight")
    assert ShardReader(d, verify=False).slice("model.embed_tokens.weight")[0:2].shape == (2, 64)


# --- metadata and data shapes -----------------------------------------------------------------------

@pytest.mark.parametrize("field,value,needle", [
    ("shape", [-64, 64], "shape [-64, 64] is not a list of at least 2 positive ints"),
    ("shape", [64], "shape [64] is not a list of at least 2 positive ints"),
    ("shape", [64, 32], "data tensor 'codes' is [64, 32] torch.uint8, the metadata implies [64, 16] torch.uint8"),
    ("bits", "4", "attribute bits='4' is not a int"),
    ("bits", 7, "--bits 7 is not supported"),
    ("group_size", 0, "--group-size must be positive or -1"),
    ("group_size", 16, "data tensor 'scale' is [64, 2] torch.float16, the metadata implies [64, 4] torch.float16"),
    ("scale_dtype", "bfloat16", "the metadata implies [64, 2] torch.bfloat16"),
    ("symmetric", True, "stores symmetric=False, metadata says True"),
    ("format", "nope", "unknown format 'nope'"),
    ("format_version", 99, "format_version 99 is not supported"),
])
def test_bad_metadata_is_an_error_naming_the_tensor(ckpt, tmp_path, field, value, needle):
    d = _copy(ckpt, tmp_path)
    q = _config(d)["quantization_config"]
    q["tensors"][QPARAM][field] = value
    _set_qcfg(d, q, reseal=True)  # a writer that got it wrong: the seal matches, the checks must not
    for verify in (True, False):
        msg = _load_error(d, verify=verify)
        assert QPARAM in msg and needle in msg, msg
        assert str(d) in msg


def test_data_tensor_of_the_wrong_shape_or_dtype_is_an_error(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    ts = _tensors(d)
    ts[SCALE] = ts[SCALE][:, :1].contiguous()  # a consistent file, but not what the metadata implies
    _rewrite(d, ts)
    msg = _load_error(d)
    assert msg == (f"{d}: tensor 'model.layers.0.mlp.down_proj.weight': data tensor 'scale' is [64, 1] "
                   f"torch.float16, the metadata implies [64, 4] torch.float16")
    ts[SCALE] = torch.zeros(64, 4, dtype=torch.float32)
    _rewrite(d, ts)
    assert "is [64, 4] torch.float32, the metadata implies [64, 4] torch.float16" in _load_error(d)


def test_missing_packed_or_kept_tensor_and_extra_tensor_are_errors(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    ts = _tensors(d)
    _rewrite(d, {k: v for k, v in ts.items() if k != ZERO})
    assert _load_error(d) == (f"{d}: checkpoint lacks tensor {ZERO!r} of the uniform-asym-packed tensor "
                              f"{QPARAM!r}")
    _rewrite(d, {k: v for k, v in ts.items() if k != "model.norm.weight"})
    assert "checkpoint lacks tensors ['model.norm.weight']" in _load_error(d)
    _rewrite(d, {**ts, "model.extra.weight": torch.ones(2)})
    assert "tensors the model does not have: ['model.extra.weight']" in _load_error(d)
    _rewrite(d, {**ts, "model.norm.weight": torch.ones(3)})
    assert "tensor 'model.norm.weight' is [3], the model expects [64]" in _load_error(d)


def test_config_without_quantization_config_is_refused(ckpt, tmp_path):
    from moequant.models.loader import resolve_model_spec

    d = _copy(ckpt, tmp_path)
    cfg = _config(d)
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoequantError) as e:
        resolve_model_spec(str(d))
    assert str(e.value) == (f"{d / 'config.json'}: has no moequant quantization_config, but its shards were "
                            f"written by moequant (model.safetensors: producer=moequant); restore the "
                            f"config.json that moequant wrote")
    assert "not a moequant checkpoint" in _load_error(d)
    # the same tensors written by another tool: the packed names give it away
    from safetensors.torch import save_file

    (d / INDEX_NAME).unlink()
    save_file(_tensors(ckpt), str(d / "model.safetensors"))
    with pytest.raises(MoequantError, match="it holds packed tensors such as 'model.layers"):
        resolve_model_spec(str(d))


# --- shard names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../elsewhere.safetensors", "/tmp/elsewhere.safetensors", "sub/model.safetensors",
                                  "..", ""])
def test_shard_names_stay_in_the_checkpoint_directory(ckpt, tmp_path, name):
    d = _copy(ckpt, tmp_path)
    index = _index(d)
    index["weight_map"][CODES] = name
    _set_index(d, index)
    assert _load_error(d) == (f"{d / INDEX_NAME}: shard name {name!r} is not a file name inside the checkpoint "
                              "directory")


def test_shard_symlink_leaving_the_directory_is_refused(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    outside = tmp_path / "outside.safetensors"
    (d / "model.safetensors").rename(outside)
    (d / "model.safetensors").symlink_to(outside)
    msg = _load_error(d)
    assert msg == f"{d / 'model.safetensors'}: shard is a link to {outside}, outside the checkpoint directory"


@pytest.mark.parametrize("index,needle", [
    ([1, 2], "the shard index is a list, not an object"),
    ({"weight_map": ["model.safetensors"]}, "weight_map is not a map of tensor names to shard file names"),
    ({"weight_map": {"a": 3}}, "weight_map is not a map of tensor names to shard file names"),
    ({"weight_map": {}, "metadata": {"digests": {"algorithm": "sha256", "tensors": []}}}, "metadata.digests is not"),
    ("{not json", "the shard index is not valid JSON"),
])
def test_malformed_index_is_an_error(ckpt, tmp_path, index, needle):
    d = _copy(ckpt, tmp_path)
    (d / INDEX_NAME).write_text(index if isinstance(index, str) else json.dumps(index))
    msg = _load_error(d)
    assert msg.startswith(f"{d / INDEX_NAME}: ") and needle in msg


# --- corrupted shard files ----------------------------------------------------------------------------

def _header_len(p: Path) -> int:
    return struct.unpack("<Q", p.read_bytes()[:8])[0]


def _damage(kind: str, p: Path) -> None:
    raw = p.read_bytes()
    n = _header_len(p)
    header = json.loads(raw[8:8 + n])

    def with_header(h: dict) -> bytes:
        text = json.dumps(h, separators=(",", ":")).encode()
        assert len(text) <= n
        return raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:]

    if kind == "truncated-data":
        p.write_bytes(raw[:-1000])
    elif kind == "truncated-header":
        p.write_bytes(raw[:5])
    elif kind == "huge-header-length":
        p.write_bytes(struct.pack("<Q", 1 << 60) + raw[8:])
    elif kind == "header-past-end":
        p.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    elif kind == "not-json":
        p.write_bytes(raw[:8] + b"\xff" * n + raw[8 + n:])
    elif kind == "json-list":
        p.write_bytes(raw[:8] + b"[]" + b" " * (n - 2) + raw[8 + n:])
    elif kind == "overlap":
        header[CODES]["data_offsets"] = list(header[ZERO]["data_offsets"])
        header[CODES]["data_offsets"][1] = header[CODES]["data_offsets"][0] + 64 * 32
        p.write_bytes(with_header(header))
    elif kind == "size-mismatch":
        header[CODES]["shape"] = [64, 31]
        p.write_bytes(with_header(header))
    elif kind == "negative-shape":
        header[CODES]["shape"] = [-64, -32]
        p.write_bytes(with_header(header))
    elif kind == "bad-dtype":
        header[CODES]["dtype"] = 7
        p.write_bytes(with_header(header))
    elif kind == "metadata-not-strings":
        header["__metadata__"] = {"format": 1}
        p.write_bytes(with_header(header))
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind,needle", [
    ("truncated-data", "run past the end of the"),
    ("truncated-header", "truncated safetensors file (5 bytes, no header)"),
    ("huge-header-length", "header length 1152921504606846976 does not fit"),
    ("header-past-end", "does not fit the"),
    ("not-json", "corrupted safetensors header (not JSON"),
    ("json-list", "corrupted safetensors header (a list, not an object)"),
    ("overlap", "overlap"),
    ("size-mismatch", f"for tensor {CODES!r} (2048 bytes for shape [64, 31] of U8)"),
    ("negative-shape", f"for tensor {CODES!r} (shape [-64, -32])"),
    ("bad-dtype", f"for tensor {CODES!r} (dtype 7)"),
    ("metadata-not-strings", "__metadata__ is not a map of strings"),
])
def test_corrupted_shard_is_one_line_naming_the_file(ckpt, tmp_path, kind, needle):
    d = _copy(ckpt, tmp_path)
    shard = d / "model.safetensors"
    _damage(kind, shard)
    for verify in (True, False):
        msg = _load_error(d, verify=verify)
        assert msg.startswith(f"{shard}: ") and needle in msg, msg


def test_safetensors_library_errors_become_moequant_errors(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    shard = d / "model.safetensors"
    shard.write_bytes(shard.read_bytes() + b"trailing bytes the safetensors library refuses")
    # our checks accept trailing bytes (and the digests still match); the library's mmap reader does not
    with pytest.raises(MoequantError, match=r"model.safetensors: corrupted safetensors file \("):
        ShardReader(d).slice("model.embed_tokens.weight")


def test_cli_inspect_exits_2_with_one_line(ckpt, tmp_path, capsys):
    from moequant.cli import main

    d = _copy(ckpt, tmp_path)
    shard = d / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[_data_offset(d, CODES) + 3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moequant: error: {shard}: tensor {CODES!r} is corrupted (its sha256 does not match {INDEX_NAME})"
