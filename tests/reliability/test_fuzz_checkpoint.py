"""Property-based fuzzing of checkpoint loading: a tiny checkpoint (int4 and int3 asymmetric, NF4 with
double quant) is damaged at random — byte flips anywhere in the shards, index or config, truncation,
header, index, config and metadata edits — and ``api.load`` must either raise ``MoequantError`` or
return a model whose every stored tensor, format and attribute equals the original bit for bit. Never
another exception, never a silently altered model. Deterministic (``derandomize``); a bigger run is
marked slow."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import tiny_model
from moequant import api
from moequant.alloc.recipe import DEFAULT_KEEP, Recipe, Rule
from moequant.codecs.config import LutConfig, UniformConfig
from moequant.errors import MoequantError
from moequant.formats.checkpoint import INDEX_NAME, seal_quantization_config

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

RECIPE = Recipe(tuple(Rule(p, None) for p in DEFAULT_KEEP) + (
    Rule(r"re:.*self_attn\..*", UniformConfig(bits=4, group_size=32, symmetric=False)),
    Rule(r"re:.*down_proj\.weight", LutConfig(lut="nf4", block_size=32, double_quant=True, dq_block_size=16)),
    Rule("kind:linear", UniformConfig(bits=3, group_size=32, symmetric=False)),
))


def _state(model: torch.nn.Module) -> dict[str, Any]:
    """Everything that decides the model's numbers: persistent tensors (packed data included) and each
    packed tensor's format, shape and attributes."""
    out: dict[str, Any] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, qt in api.packed_modules(model).items():
        out[f"{name}#meta"] = json.dumps(qt.meta(), sort_keys=True)
        out.update({f"{name}#{d}": t for d, t in qt.data.items()})
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, torch.Tensor):
            if v.dtype != w.dtype or v.shape != w.shape or not torch.equal(
                    v.reshape(-1).view(torch.uint8) if v.numel() else v, w.reshape(-1).view(torch.uint8) if w.numel() else w):
                return False
        elif v != w:
            return False
    return True


class Original(tuple):
    """(checkpoint dir, reference state), with a short repr for hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"Original({self[0]})"


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Original:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_model("llama")
    api.quantize(model, RECIPE, progress=False)
    out = tmp_path_factory.mktemp("fuzz") / "ckpt"
    api.save(model, out)
    ref = _state(api.load(out))
    torch.set_num_threads(n)
    return Original((out, ref))


# --- mutations ----------------------------------------------------------------------------------------

FILES = ("model.safetensors", INDEX_NAME, "config.json")
SHARD_NAMES = ("../elsewhere.safetensors", "/etc/passwd", "sub/model.safetensors", "", ".", "model.safetensors",
               "missing.safetensors", "config.json")
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                 st.text(max_size=8), st.lists(st.integers(-3, 300), max_size=4), st.just({}))


@st.composite
def mutations(draw) -> list[tuple]:
    """1-3 edits, each a tuple naming what to do (applied by ``_apply``)."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(("flip", "flip", "flip", "truncate", "header", "index", "config", "meta")))
        if kind == "flip":
            out.append(("flip", draw(st.sampled_from(FILES)), draw(st.floats(0, 1, exclude_max=True)),
                        draw(st.integers(1, 255))))
        elif kind == "truncate":
            out.append(("truncate", draw(st.sampled_from(FILES)), draw(st.floats(0, 1, exclude_max=True))))
        elif kind == "header":
            out.append(("header", draw(st.integers(0, 10**6)), draw(st.sampled_from(("shape", "dtype", "data_offsets",
                                                                                     "swap", "drop"))), draw(JUNK)))
        elif kind == "index":
            out.append(("index", draw(st.integers(0, 10**6)), draw(st.sampled_from(("shard", "digest", "drop_digest",
                                                                                    "drop_entry", "junk"))),
                        draw(st.sampled_from(SHARD_NAMES)), draw(JUNK)))
        elif kind == "config":
            out.append(("config", draw(st.sampled_from(("drop_qcfg", "drop_tensors", "model_field", "tied"))),
                        draw(st.integers(0, 10**6)), draw(JUNK)))
        else:
            out.append(("meta", draw(st.integers(0, 10**6)), draw(st.sampled_from(("shape", "bits", "group_size",
                                                                                   "format", "scale_dtype", "lut",
                                                                                   "block_size", "dq_block_size",
                                                                                   "format_version", "symmetric"))),
                        draw(st.one_of(JUNK, st.lists(st.integers(-70, 70), min_size=1, max_size=3))),
                        draw(st.booleans())))
    return out


def _header(p: Path) -> tuple[int, dict]:
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n])


def _put_header(p: Path, header: dict) -> None:
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    p.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _pick(keys, i: int):
    keys = sorted(keys)
    return keys[i % len(keys)] if keys else None


def _apply(d: Path, m: tuple) -> None:
    """Apply one mutation; a mutation that no longer applies (file already broken) is skipped."""
    try:
        _apply_one(d, m)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, OSError, struct.error):
        pass


def _apply_one(d: Path, m: tuple) -> None:
    kind = m[0]
    if kind == "flip":
        p = d / m[1]
        raw = bytearray(p.read_bytes())
        raw[int(m[2] * len(raw))] ^= m[3]
        p.write_bytes(bytes(raw))
    elif kind == "truncate":
        p = d / m[1]
        raw = p.read_bytes()
        p.write_bytes(raw[:int(m[2] * len(raw))])
    elif kind == "header":
        p = d / "model.safetensors"
        _, h = _header(p)
        names = [k for k in h if k != "__metadata__"]
        a, b = _pick(names, m[1]), _pick(names, m[1] * 7 + 3)
        if m[2] == "swap":
            h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
        elif m[2] == "drop":
            del h[a]
        else:
            h[a][m[2]] = m[3]
        _put_header(p, h)
    elif kind == "index":
        p = d / INDEX_NAME
        idx = json.loads(p.read_text())
        key = _pick(idx["weight_map"], m[1])
        if m[2] == "shard":
            idx["weight_map"][key] = m[3]
        elif m[2] == "digest":
            hexd = idx["metadata"]["digests"]["tensors"][key]
            idx["metadata"]["digests"]["tensors"][key] = ("0" if hexd[0] != "0" else "1") + hexd[1:]
        elif m[2] == "drop_digest":
            del idx["metadata"]["digests"]["tensors"][key]
        elif m[2] == "drop_entry":
            del idx["weight_map"][key]
        else:
            idx = m[4]
        p.write_text(json.dumps(idx))
    elif kind == "config":
        p = d / "config.json"
        cfg = json.loads(p.read_text())
        if m[1] == "drop_qcfg":
            del cfg["quantization_config"]
        elif m[1] == "drop_tensors":
            q = cfg["quantization_config"]
            del q["tensors"][_pick(q["tensors"], m[2])]
            cfg["quantization_config"] = seal_quantization_config(q)
        elif m[1] == "tied":
            cfg["quantization_config"]["tied"] = m[3]
        else:
            cfg[_pick([k for k in cfg if k != "quantization_config"], m[2])] = m[3]
        p.write_text(json.dumps(cfg))
    else:  # meta: a field of one packed tensor's metadata, resealed or not
        p = d / "config.json"
        cfg = json.loads(p.read_text())
        q = cfg["quantization_config"]
        q["tensors"][_pick(q["tensors"], m[1])][m[2]] = m[3]
        cfg["quantization_config"] = seal_quantization_config(q) if m[4] else q
        p.write_text(json.dumps(cfg))


def _check(original: tuple[Path, dict[str, Any]], muts: list[tuple], cli: bool = False) -> None:
    src, ref = original
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "c"
        shutil.copytree(src, d)
        for m in muts:
            _apply(d, m)
        try:
            model = api.load(d)
        except MoequantError as e:
            assert "\n" not in str(e)
            loaded = None
        else:
            assert _same(ref, _state(model)), f"loaded with altered tensors after {muts}"
            loaded = True
        if cli:
            from moequant.cli import main

            assert main(["inspect", str(d)]) == (0 if loaded else 2)


FUZZ = settings(max_examples=120, derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(muts=mutations())
def test_damaged_checkpoint_loads_bit_exact_or_fails_with_one_line(original, one_thread, muts):
    _check(original, muts)


@settings(FUZZ, max_examples=15)
@given(muts=mutations())
def test_damaged_checkpoint_cli_inspect_exits_0_or_2(original, one_thread, muts, capsys):
    _check(original, muts, cli=True)


@pytest.mark.slow
@settings(FUZZ, max_examples=2000)
@given(muts=mutations())
def test_damaged_checkpoint_fuzz_long(original, one_thread, muts):
    _check(original, muts)
