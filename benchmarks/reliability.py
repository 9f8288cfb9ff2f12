"""Issue #9's hostile-input count: feed the command line broken, hostile and conflicting inputs, each in a
fresh directory, and classify every outcome.

    python benchmarks/reliability.py --json benchmarks/results/reliability.json

Each case runs ``python -m moequant.cli ...`` in a subprocess (stdin ``y``, so a prompt would be answered)
and is judged by what a user would see:

- ``clean``: exit 2 and exactly one ``moequant: error: ...`` line on stderr, no traceback;
- ``traceback``: a Python traceback, or an exit code other than 0 / 2;
- ``silent``: exit 0 on a corrupted or hostile input whose result differs from the intact input's
  (perplexity on the same windows), or a remote-code marker file created;
- ``ok``: exit 0 where the input is legitimately usable and the result equals the intact one;
- ``leftovers``: files the run left behind (temp names, activation spills, partial files) and
  ``deleted``: sentinel files of the user's that disappeared, counted for every case.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

LEFTOVER_MARKERS = ("moequant-tmp", "moequant-act", ".partial", ".tmp-", "moequant-run")


@dataclass
class Case:
    name: str
    group: str  # the class
    prepare: Callable[[Path], list[str]]  # -> argv after "moequant"
    corrupt: bool = True  # the input is broken/hostile (exit 0 is only fine if the result is unchanged)
    signal_after: float | None = None  # send SIGTERM/SIGKILL after this many seconds
    sig: int = signal.SIGTERM


# --- fixtures ------------------------------------------------------------------------------------------
def build_fixtures(root: Path) -> None:
    """``root/model`` (tiny Llama + BPE tokenizer), ``root/text.txt``, ``root/ckpt`` (int4 of it)."""
    import transformers as tf

    from moequant.zoo.tiny_olmoe import train_tokenizer

    words = " ".join(f"w{(i * 7919) % 97}" for i in range(3000))
    text = "\n".join(words[i:i + 80] for i in range(0, len(words), 80))
    (root / "text.txt").write_text(text)
    tok = train_tokenizer([text], 320)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=320, max_position_embeddings=128, bos_token_id=0,
                         eos_token_id=1, pad_token_id=2)
    model = tf.LlamaForCausalLM(cfg)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    _cli(["quantize", str(root / "model"), "--bits", "4", "--group-size", "32", "--solver", "rtn",
          "--out", str(root / "ckpt")], root)
    _cli(["eval", "ppl", str(root / "ckpt"), "--data", str(root / "text.txt"), "--seqlen", "32",
          "--json", str(root / "ref_ppl.json")], root)


def _cli(argv: list[str], cwd: Path, timeout: float = 300, signal_after: float | None = None,
         sig: int = signal.SIGTERM) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "moequant.cli", "-q", *argv]
    if signal_after is None:
        return subprocess.run(cmd, cwd=cwd, input="y\ny\n", capture_output=True, text=True, timeout=timeout, env=env)
    p = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    time.sleep(signal_after)
    p.send_signal(sig)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _shard(ckpt: Path) -> Path:
    return ckpt / "model.safetensors"


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def _write_header(path: Path, header: dict) -> None:
    """Rewrite a safetensors header in place, keeping the data section (padded to the old length)."""
    old, start = _header(path)
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= start - 8, "edited header longer than the original"
    raw = raw + b" " * (start - 8 - len(raw))
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(raw)


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def _tensor_offset(ckpt: Path, name_end: str) -> int:
    header, start = _header(_shard(ckpt))
    key = next(k for k in header if k.endswith(name_end))
    return start + header[key]["data_offsets"][0]


def _edit_json(path: Path, fn: Callable[[dict], object]) -> None:
    d = json.loads(path.read_text())
    out = fn(d)
    path.write_text(json.dumps(d if out is None else out))


def _ppl_args(target: str, d: Path) -> list[str]:
    return ["eval", "ppl", target, "--data", str(d / "text.txt"), "--seqlen", "32", "--json", str(d / "out.json")]


def _quant_args(model: str, d: Path, *extra: str) -> list[str]:
    solver = [] if "--solver" in extra else ["--solver", "rtn"]  # RTN: these cases are about the inputs
    return ["quantize", model, "--bits", "4", "--group-size", "32", *solver, "--out", str(d / "out"), *extra]


def _model_with(d: Path, fn: Callable[[dict], None]) -> str:
    """A copy of the fixture model whose weights are edited by ``fn(state_dict)``."""
    from safetensors.torch import load_file, save_file

    m = d / "model2"
    shutil.copytree(d / "model", m)
    sd = load_file(str(m / "model.safetensors"))
    fn(sd)
    save_file(sd, str(m / "model.safetensors"), metadata={"format": "pt"})
    return str(m)


def _remote_code_model(d: Path) -> str:
    m = d / "model2"
    shutil.copytree(d / "model", m)
    (m / "evil.py").write_text(f"open({str(d / 'PWNED')!r}, 'w').write('ran')\n"
                               "from transformers import LlamaConfig as EvilConfig\n")
    _edit_json(m / "config.json", lambda c: c.update(auto_map={"AutoConfig": "evil.EvilConfig"}))
    return str(m)


def cases() -> list[Case]:
    c: list[Case] = []
    add = lambda *a, **k: c.append(Case(*a, **k))  # noqa: E731
    # --- checkpoint integrity: scored with eval ppl, compared with the intact checkpoint's result
    for frac in (0.1, 0.5, 0.99):
        add(f"truncated shard {frac:.0%}", "integrity", lambda d, f=frac: (
            os.truncate(_shard(d / "ckpt"), int(_shard(d / "ckpt").stat().st_size * f)), _ppl_args(str(d / "ckpt"), d))[1])
    for off in (0, 3, 9, 40):
        add(f"header byte {off} flipped", "integrity", lambda d, o=off: (_flip(_shard(d / "ckpt"), o),
                                                                         _ppl_args(str(d / "ckpt"), d))[1])
    for t in ("q_proj.weight_codes", "q_proj.weight_scale", "q_proj.weight_zero", "down_proj.weight_codes",
              "input_layernorm.weight", "embed_tokens.weight"):
        add(f"data byte of {t} flipped", "integrity", lambda d, t=t: (
            _flip(_shard(d / "ckpt"), _tensor_offset(d / "ckpt", t) + 1), _ppl_args(str(d / "ckpt"), d))[1])

    def header_edit(fn: Callable[[dict], None]) -> Callable[[Path], list[str]]:
        """Edit the shard's safetensors header in place with ``fn(header)``, then score the checkpoint."""
        def prep(d: Path) -> list[str]:
            h, _ = _header(_shard(d / "ckpt"))
            fn(h)
            _write_header(_shard(d / "ckpt"), h)
            return _ppl_args(str(d / "ckpt"), d)
        return prep

    def key(h: dict, end: str) -> str:
        return next(k for k in h if k.endswith(end))

    def swap(h: dict) -> None:
        a, b = key(h, "layers.0.self_attn.q_proj.weight_codes"), key(h, "layers.0.self_attn.o_proj.weight_codes")
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
    scale = "layers.0.self_attn.q_proj.weight_scale"
    add("two tensors' offsets swapped", "integrity", header_edit(swap))
    add("scale stored with transposed shape", "integrity",
        header_edit(lambda h: h[key(h, scale)].update(shape=h[key(h, scale)]["shape"][::-1])))
    add("scale stored as bf16", "integrity", header_edit(lambda h: h[key(h, scale)].update(dtype="BF16")))

    def qcfg(fn: Callable[[dict], None]) -> Callable[[Path], list[str]]:
        def prep(d: Path) -> list[str]:
            _edit_json(d / "ckpt" / "config.json", lambda cfg: fn(cfg["quantization_config"]))
            return _ppl_args(str(d / "ckpt"), d)
        return prep
    first = lambda q: next(iter(q["tensors"].values()))  # noqa: E731
    add("meta shape negative", "integrity", qcfg(lambda q: first(q).update(shape=[-64, 64])))
    add("meta shape wrong", "integrity", qcfg(lambda q: first(q).update(shape=[64, 96])))
    add("meta bits changed", "integrity", qcfg(lambda q: first(q).update(bits=3)))
    add("meta group size changed", "integrity", qcfg(lambda q: first(q).update(group_size=16)))
    add("meta format unknown", "integrity", qcfg(lambda q: first(q).update(format="nope")))
    add("quantization_config removed", "integrity", lambda d: (
        _edit_json(d / "ckpt" / "config.json", lambda cfg: cfg.pop("quantization_config")), _ppl_args(str(d / "ckpt"), d))[1])
    add("config.json is a list", "integrity", lambda d: (
        (d / "ckpt" / "config.json").write_text("[1, 2]"), _ppl_args(str(d / "ckpt"), d))[1])
    add("config.json not JSON", "integrity", lambda d: (
        (d / "ckpt" / "config.json").write_text("{oops"), _ppl_args(str(d / "ckpt"), d))[1])
    index = lambda d: d / "ckpt" / "model.safetensors.index.json"  # noqa: E731

    def index_edit(fn: Callable[[dict], None]) -> Callable[[Path], list[str]]:
        def prep(d: Path) -> list[str]:
            _edit_json(index(d), fn)
            return _ppl_args(str(d / "ckpt"), d)
        return prep
    wm_first = lambda i: next(iter(i["weight_map"]))  # noqa: E731
    add("index entry ../outside", "integrity", index_edit(lambda i: i["weight_map"].update({wm_first(i): "../x.safetensors"})))
    add("index entry absolute path", "integrity", index_edit(lambda i: i["weight_map"].update({wm_first(i): "/etc/passwd"})))
    add("index entry removed", "integrity", index_edit(lambda i: i["weight_map"].pop(wm_first(i))))
    add("index is a list", "integrity", lambda d: (index(d).write_text("[]"), _ppl_args(str(d / "ckpt"), d))[1])
    add("index digest edited", "integrity", index_edit(lambda i: _edit_digest(i)))
    add("shard replaced by an empty file", "integrity", lambda d: (
        _shard(d / "ckpt").write_bytes(b""), _ppl_args(str(d / "ckpt"), d))[1])
    add("inspect of a truncated shard", "integrity", lambda d: (
        os.truncate(_shard(d / "ckpt"), 1000), ["inspect", str(d / "ckpt")])[1])
    # --- never run foreign code
    for cmd in ("quantize", "inspect", "eval ppl"):
        def prep(d: Path, cmd=cmd) -> list[str]:
            m = _remote_code_model(d)
            return {"quantize": _quant_args(m, d), "inspect": ["inspect", m], "eval ppl": _ppl_args(m, d)}[cmd]
        add(f"auto_map model: {cmd}", "remote code", prep)
    # --- numbers
    for label, val in (("NaN", float("nan")), ("Inf", float("inf")), ("1e30", 1e30)):
        def prep(d: Path, val=val) -> list[str]:
            def edit(sd):
                sd["model.layers.0.self_attn.q_proj.weight"][3, 5] = val
            return _quant_args(_model_with(d, edit), d)
        add(f"{label} weight", "numbers", prep)
    # --- bad model inputs
    add("HF dir missing a weight", "inputs", lambda d: _quant_args(_model_with(
        d, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight")), d))
    add("HF dir with an unexpected weight", "inputs", lambda d: _quant_args(_model_with(
        d, lambda sd: sd.update({"model.layers.0.extra.weight": torch.zeros(2)})), d))
    add("HF dir truncated safetensors", "inputs", lambda d: (
        os.truncate(d / "model" / "model.safetensors", 5000), _quant_args(str(d / "model"), d))[1])
    add("HF config.json is a list", "inputs", lambda d: (
        (d / "model" / "config.json").write_text("[]"), _quant_args(str(d / "model"), d))[1])
    add("HF config.json without model_type", "inputs", lambda d: (
        _edit_json(d / "model" / "config.json", lambda c: c.pop("model_type")), _quant_args(str(d / "model"), d))[1])
    add("truncated .gguf", "inputs", lambda d: ((d / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 20),
                                                _quant_args(str(d / "m.gguf"), d))[1])
    add("garbage .gguf", "inputs", lambda d: ((d / "m.gguf").write_bytes(os.urandom(4096)), _ppl_args(str(d / "m.gguf"), d))[1])
    add("unknown alias", "inputs", lambda d: _quant_args("no-such-model", d))
    add("hub id offline", "inputs", lambda d: _quant_args("someone/some-model", d))
    add("missing directory", "inputs", lambda d: _quant_args(str(d / "nope"), d))
    add("non-UTF-8 text", "inputs", lambda d: ((d / "bad.txt").write_bytes(b"hello \xff\xfe world " * 50),
                                               ["eval", "ppl", str(d / "ckpt"), "--data", str(d / "bad.txt")])[1])
    add("empty text", "inputs", lambda d: ((d / "empty.txt").write_text(""),
                                           ["eval", "ppl", str(d / "ckpt"), "--data", str(d / "empty.txt")])[1])
    add("calibration on an empty text", "inputs", lambda d: ((d / "empty.txt").write_text(""), _quant_args(
        str(d / "model"), d, "--solver", "ldlq", "--calib", str(d / "empty.txt")))[1])
    add("recipe is a list", "inputs", lambda d: ((d / "r.json").write_text("[]"), ["quantize", str(d / "model"),
                                                 "--recipe", str(d / "r.json"), "--out", str(d / "out")])[1])
    add("recipe not JSON", "inputs", lambda d: ((d / "r.json").write_text("{"), ["quantize", str(d / "model"),
                                                "--recipe", str(d / "r.json"), "--out", str(d / "out")])[1])
    add("recipe unknown config type", "inputs", lambda d: ((d / "r.json").write_text(json.dumps(
        {"rules": [{"match": "kind:linear", "config": {"type": "Nope"}}]})), ["quantize", str(d / "model"), "--recipe",
                                                                             str(d / "r.json"), "--out", str(d / "out")])[1])
    # --- option combinations
    for flags in (["--bits", "7"], ["--method", "nf4", "--bits", "2"], ["--method", "nf4", "--asym"],
                  ["--trellis-l", "10"], ["--sym", "--asym"], ["--group-size", "0"],
                  ["--calib-samples", "0", "--solver", "ldlq"], ["--method", "trellis", "--bits", "5"],
                  ["--act-order", "--solver", "rtn"], ["--offload", "--kept-dtype", "float16"]):
        add("flags " + " ".join(flags), "options", lambda d, f=flags: _quant_args(str(d / "model"), d, *f))
    # --- outputs: checked before any work, nothing of the user's deleted
    add("--out under a regular file", "outputs", lambda d: ((d / "afile").write_text("x"), [
        "quantize", str(d / "model"), "--out", str(d / "afile" / "sub")])[1])
    add("--json under a regular file", "outputs", lambda d: ((d / "afile").write_text("x"), [
        *_ppl_args(str(d / "ckpt"), d)[:-1], str(d / "afile" / "p.json")])[1])
    add("--out exists, no --overwrite", "outputs", lambda d: ((d / "out").mkdir(), _quant_args(str(d / "model"), d))[1])
    add("--overwrite of a user directory", "outputs", lambda d: ((d / "out").mkdir(), (d / "out" / "SENTINEL").write_text("x"),
                                                                 _quant_args(str(d / "model"), d, "--overwrite"))[2])
    add("--out . --overwrite", "outputs", lambda d: ["quantize", str(d / "model"), "--out", ".", "--overwrite"])
    add("--out = the model --overwrite", "outputs", lambda d: ["quantize", str(d / "model"), "--out", str(d / "model"),
                                                               "--overwrite"])
    add("--out = an ancestor of the cwd --overwrite", "outputs", lambda d: ["quantize", str(d / "model"), "--out",
                                                                            str(d.parent), "--overwrite"])
    add("--out = the cache --overwrite", "outputs", lambda d: ["quantize", str(d / "model"), "--out",
                                                               os.environ["MOEQUANT_CACHE"], "--overwrite"])
    add("zoo build --overwrite of a user directory", "outputs", lambda d: (
        (d / "out").mkdir(), (d / "out" / "SENTINEL").write_text("x"),
        ["zoo", "build", "tiny-olmoe", "--out", str(d / "out"), "--overwrite"])[2])
    # --- interruption
    add("SIGTERM during quantize", "interruption", lambda d: _quant_args(
        str(d / "model"), d, "--solver", "ldlq", "--calib", str(d / "text.txt"), "--calib-samples", "64",
        "--calib-seqlen", "64"), signal_after=6.0)
    add("SIGKILL during quantize", "interruption", lambda d: _quant_args(
        str(d / "model"), d, "--solver", "ldlq", "--calib", str(d / "text.txt"), "--calib-samples", "64",
        "--calib-seqlen", "64"), signal_after=6.0, sig=signal.SIGKILL)
    return c


def _edit_digest(index: dict) -> None:
    """Change one hex digit of the first tensor digest in the index (``metadata.digests.tensors``)."""
    tensors = index["metadata"]["digests"]["tensors"]
    k = next(iter(tensors))
    tensors[k] = ("0" if tensors[k][0] != "0" else "1") + tensors[k][1:]


def _snapshot(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def judge(case: Case, proc: subprocess.CompletedProcess, d: Path, before: set[str], ref_nll: list[float]) -> dict:
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in err_lines if ln.startswith("moequant: error:")]
    tb = "Traceback (most recent call last)" in proc.stderr
    after = _snapshot(d)
    new = sorted(after - before)
    leftovers = [p for p in new if any(m in Path(p).name for m in LEFTOVER_MARKERS)]
    leftovers += [str(p) for p in Path(tempfile.gettempdir()).glob("moequant-act-*")]
    deleted = sorted(p for p in before - after if "SENTINEL" in p or p.startswith("model/"))
    pwned = (d / "PWNED").exists()
    if case.signal_after is not None:
        verdict = "clean" if proc.returncode in (130, 143, -signal.SIGKILL) and not tb else "traceback"
        if case.sig == signal.SIGKILL:  # --resume finishes the run and cleans what the killed one left
            rerun = _cli(_quant_args(str(d / "model"), d, "--solver", "ldlq", "--calib", str(d / "text.txt"),
                                     "--calib-samples", "64", "--calib-seqlen", "64", "--resume"), d)
            new2 = sorted(_snapshot(d) - before)
            leftovers = [p for p in new2 if any(m in Path(p).name for m in LEFTOVER_MARKERS)]
            verdict = "clean" if rerun.returncode == 0 else "traceback"
    elif pwned:
        verdict = "silent"
    elif tb or proc.returncode not in (0, 2):
        verdict = "traceback"
    elif proc.returncode == 2:
        verdict = "clean" if len(errors) == 1 else "traceback"
    else:
        out = d / "out.json"
        same = out.is_file() and json.loads(out.read_text()).get("nll_per_window") == ref_nll
        verdict = "ok" if (same or not case.corrupt) else "silent"
    return {"case": case.name, "class": case.group, "verdict": verdict, "exit": proc.returncode,
            "error": errors[0] if errors else None, "traceback": tb, "leftovers": leftovers, "deleted": deleted,
            "remote_code_ran": pwned}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True)
    p.add_argument("--only", default=None, help="run only cases whose name contains this")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mq-reliability-"))
    os.environ["MOEQUANT_CACHE"] = str(root / "cache")
    (root / "cache").mkdir()
    base = root / "base"
    base.mkdir()
    build_fixtures(base)
    ref_nll = json.loads((base / "ref_ppl.json").read_text())["nll_per_window"]
    results = []
    t0 = time.time()
    for case in cases():
        if args.only and args.only not in case.name:
            continue
        d = root / f"case{len(results):03d}"
        shutil.copytree(base, d)
        argv = case.prepare(d)
        before = _snapshot(d)
        proc = _cli(argv, d, signal_after=case.signal_after, sig=case.sig)
        r = judge(case, proc, d, before, ref_nll)
        r["argv"] = ["moequant", *argv]
        results.append(r)
        print(f"{r['verdict']:9s} {case.group:12s} {case.name}: {r['error'] or r['exit']}", flush=True)
        shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    count = lambda v: sum(r["verdict"] == v for r in results)  # noqa: E731
    summary = {"inputs_tried": len(results), "clean_errors": count("clean"), "ok": count("ok"),
               "silent_results": count("silent"), "tracebacks": count("traceback"),
               "with_leftovers": sum(bool(r["leftovers"]) for r in results),
               "with_deleted_user_files": sum(bool(r["deleted"]) for r in results), "seconds": round(time.time() - t0)}
    from moequant.runinfo import run_info

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"summary": summary, "cases": results,
                                           **run_info(["benchmarks/reliability.py", *sys.argv[1:]])}, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
