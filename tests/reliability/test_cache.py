"""The zoo cache: entries verified against their manifest (a changed, truncated, missing or added file
is one line naming the entry and ``moequant zoo fetch ALIAS --refresh``), refresh rebuilds, and two
processes using the same item for the first time at once build it once (the file lock serializes them)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moequant.cli import main
from moequant.errors import MoequantError
from moequant.zoo import models
from moequant.zoo.manifest import MANIFEST, verify_manifest, write_manifest

FIX = "run `moequant zoo fetch fake --refresh`"
FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": bytes(range(256)) * 64,
         "tokenizer.json": b"{}"}


def _entry(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, data in FILES.items():
        (d / name).write_bytes(data)
    write_manifest(d, {"gguf": "fake.gguf"})
    return d


def _flip_byte(p: Path, keep_mtime: bool) -> None:
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def _err(d: Path, what: str) -> str:
    return f"^model fake: cache entry {d} is corrupted \\({what}\\); run `moequant zoo fetch fake --refresh`$"


def test_manifest_detects_every_change(tmp_path):
    d = _entry(tmp_path / "hf")
    m = json.loads((d / MANIFEST).read_text())
    assert sorted(m["files"]) == sorted(FILES) and m["source"] == {"gguf": "fake.gguf"}
    verify_manifest(d, "model fake", FIX)
    verify_manifest(d, "model fake", FIX, full=True)

    want = hashlib.sha256(FILES["model.safetensors"]).hexdigest()[:16]
    _flip_byte(d / "model.safetensors", keep_mtime=False)  # rewritten: mtime moved, so it is hashed on use
    got = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()[:16]
    changed = rf"model.safetensors has SHA-256 {got}\.\.\., expected {want}\.\.\."
    with pytest.raises(MoequantError, match=_err(d, changed)):
        verify_manifest(d, "model fake", FIX)

    d = _entry(tmp_path / "hf2")
    _flip_byte(d / "model.safetensors", keep_mtime=True)  # bit rot: same size and mtime, only a full check sees it
    verify_manifest(d, "model fake", FIX)
    with pytest.raises(MoequantError, match=_err(d, changed)):
        verify_manifest(d, "model fake", FIX, full=True)

    d = _entry(tmp_path / "hf3")
    with open(d / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(MoequantError, match=_err(d, "model.safetensors has 1000 bytes, expected 16384")):
        verify_manifest(d, "model fake", FIX)

    d = _entry(tmp_path / "hf4")
    (d / "tokenizer.json").unlink()
    with pytest.raises(MoequantError, match=_err(d, "tokenizer.json is missing")):
        verify_manifest(d, "model fake", FIX)

    d = _entry(tmp_path / "hf5")
    (d / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(MoequantError, match=_err(d, "extra.safetensors is not in its manifest")):
        verify_manifest(d, "model fake", FIX)


def test_touched_file_with_same_bytes_is_accepted_and_recorded(tmp_path):
    d = _entry(tmp_path / "hf")
    p = d / "model.safetensors"
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))  # a copy without -p, a restore
    verify_manifest(d, "model fake", FIX)
    assert json.loads((d / MANIFEST).read_text())["files"]["model.safetensors"]["mtime_ns"] == p.stat().st_mtime_ns


def test_entry_without_manifest_gets_one(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    for name, data in FILES.items():
        (d / name).write_bytes(data)
    verify_manifest(d, "model fake", FIX)  # made by an older moequant: recorded on first use
    assert sorted(json.loads((d / MANIFEST).read_text())["files"]) == sorted(FILES)


@pytest.fixture()
def fake_alias(tmp_path, monkeypatch):
    """A GGUF alias ``fake`` whose conversion writes ``FILES`` (no package, no transformers)."""
    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path / "cache"))
    spec = models.GgufModelSpec("fake", "a fake alias", (("fakepkg", "1.0", "fake.gguf"),), "fake.gguf", "00")
    monkeypatch.setitem(models.GGUF_MODELS, "fake", spec)
    calls = []

    def assemble(s):
        calls.append("assemble")
        out = tmp_path / "cache" / "models" / s.alias / s.gguf_name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"GGUF")
        return out

    def convert(gguf, out_dir, source=None):
        calls.append("convert")
        _entry(out_dir)

    monkeypatch.setattr(models, "assemble_gguf", assemble)
    monkeypatch.setattr(models, "convert_gguf_to_hf", convert)
    return tmp_path / "cache" / "models" / "fake" / "hf", calls


def test_corrupted_entry_is_one_line_and_refresh_rebuilds_it(fake_alias, capsys):
    hf, calls = fake_alias
    assert main(["-q", "zoo", "fetch", "fake"]) == 0
    assert capsys.readouterr().out == f"{hf}\n" and calls == ["assemble", "convert"]
    assert main(["-q", "zoo", "fetch", "fake"]) == 0  # the second use converts nothing
    assert calls == ["assemble", "convert"]
    _flip_byte(hf / "model.safetensors", keep_mtime=False)
    assert main(["-q", "zoo", "fetch", "fake"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"moequant: error: model fake: cache entry {hf} is corrupted (model.safetensors has SHA-256 ")
    assert err.endswith("...); run `moequant zoo fetch fake --refresh`")
    assert main(["-q", "zoo", "verify", "fake"]) == 2
    assert "is corrupted (model.safetensors has SHA-256" in capsys.readouterr().err
    assert main(["-q", "zoo", "fetch", "fake", "--refresh"]) == 0
    assert calls == ["assemble", "convert"] * 2
    assert (hf / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    capsys.readouterr()
    assert main(["-q", "zoo", "verify", "fake"]) == 0
    assert capsys.readouterr().out == f"fake: 3 files, 0.0 MiB match the SHA-256 of their manifest ({hf})\n"
    assert sorted(p.name for p in hf.parent.rglob("*")) == sorted([*FILES, MANIFEST, "fake.gguf", "hf"])


def test_refresh_of_a_built_model_says_how_to_rebuild(capsys):
    assert main(["-q", "zoo", "fetch", "tiny-olmoe", "--refresh"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "moequant: error: tiny-olmoe is trained here, not fetched: run `moequant zoo build tiny-olmoe --overwrite`")


# ------------------------------------------------------------------------------------------------ locks

_CORPUS_DRIVER = textwrap.dedent("""
    import hashlib, logging, os, sys, time
    from moequant.zoo import corpora

    logging.basicConfig(level=logging.INFO)

    log = sys.argv[1]
    texts = {"train": "a" * 1000, "valid": "b" * 10, "test": "c" * 10}

    def build():
        with open(log, "a") as f:
            f.write(f"start {os.getpid()}\\n")
        time.sleep(1.5)  # long enough for the other process to be waiting on the lock
        with open(log, "a") as f:
            f.write(f"end {os.getpid()}\\n")
        return texts

    corpora.CORPORA["toy"] = corpora.CorpusSpec(
        "toy", "toy", "0", "toy", {k: hashlib.sha256(v.encode()).hexdigest() for k, v in texts.items()})
    corpora._BUILDERS["toy"] = build
    open(log + f".ready-{os.getpid()}", "w").close()
    while not os.path.exists(log + ".go"):
        time.sleep(0.01)
    assert corpora.load_text("toy", "train") == texts["train"]
""")


def test_two_processes_first_use_build_once(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(_CORPUS_DRIVER)
    log = tmp_path / "log.txt"
    env = {**os.environ, "MOEQUANT_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, str(driver), str(log)], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    deadline = 120
    t0 = time.time()
    while len(list(tmp_path.glob("log.txt.ready-*"))) < 2:  # both imported, then released at the same instant
        assert time.time() - t0 < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    (tmp_path / "log.txt.go").touch()
    errs = [p.communicate(timeout=deadline)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("start ") and lines[1] == "end " + lines[0].split()[1]
    waited = [e for e in errs if "waiting for another moequant process to finish corpus-toy" in e]
    assert len(waited) == 1, errs  # the other one waited on the lock, then found the text built
    d = tmp_path / "cache" / "corpora" / "toy"
    assert sorted(p.name for p in d.iterdir()) == ["test.txt", "train.txt", "valid.txt"]
