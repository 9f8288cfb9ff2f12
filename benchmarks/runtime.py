"""Issue #10's runtime table: decode and prefill speed of packed checkpoints next to the fp32 model they
replace (and llama.cpp on the same model), CPU, per thread count, every ratio measured side by side.

    python benchmarks/runtime.py --models smollm2-135m tiny-olmoe --threads 1 2 \\
        --json benchmarks/results/runtime.json

1. **Checkpoints** (made once with the CLI, cached under ``--work``, reused): per model, one per ``--formats``
   entry, all **RTN** (no calibration: the solver changes the codes, not the work a kernel does — only a
   rotation does, hence the ``rht-*`` rows): ``int4`` / ``int3`` / ``int2`` (asymmetric, group 128, MSE clip
   search: ``quantize``'s int defaults with ``--solver rtn``), ``nf4`` (block 64), ``trellis2`` (2-bit hyb,
   V=2, tile 16, L = ``--trellis-l``, default 12 instead of the CLI's 16: an L=16 Viterbi encodes ~12x slower
   and the decoder does the same work per weight at either L), ``rht-int4`` / ``rht-int2`` (the same with
   ``--incoherence rht``; ``rht-int4-paley`` / ``rht-int4-hartley`` with ``--rht-transform paley`` (format rht v1's transform) /
   ``hartley``). Embeddings, head, norms and routers stay fp32 (the defaults).
2. **llama.cpp** (optional, ``--llamacpp F16 Q8_0 Q4_0``): when the tools built by
   ``benchmarks/peers/build_llamacpp.sh`` exist under ``--llamacpp-dir``, ``convert_hf_to_gguf.py --outtype
   f16`` on the model's HF directory, then ``llama-quantize`` to each type (its default tensor types unless
   ``--llamacpp-f16-embeddings``); benched when ``llama_cpp`` (llama-cpp-python) imports. Skipped with a
   logged reason otherwise.
3. **Bench**, one worker process per ``--threads`` value (``torch.set_num_threads`` and
   ``OMP_NUM_THREADS``): per model, one *session*: the fp32 model, every missing row, the fp32 model again.
   Rows use ``moequant.bench`` (the code behind ``moequant bench``; ``--tokens``, ``--prompt``, ``--prefill``,
   ``--batch``, ``--repeats`` as there): decode tokens/s at each batch size, prefill tokens/s, resident MiB,
   sampled peak RSS. ``--reference-formats`` (default ``int4``) are benched with the fast kernels
   (``auto``) and with the pure-torch reference. llama.cpp rows: the same prompt ids (the model's HF
   tokenizer), batch-1 greedy decode with ``Llama.eval`` one token at a time, timed the same way, and
   prefill through ``eval`` of the prefill ids.
   **Ratios** (``ratio_vs_fp32``) divide a row's tokens/s by the mean of the fp32 rows of its own session
   (same process, minutes apart), never by a number from another run.

Resumable: rows already in ``--json`` (same model, format, kernels, threads and settings) are skipped; a
rerun with missing rows opens a new session with its own fp32 measurements. The JSON keeps every row's
equivalent ``moequant bench`` command, the quantize commands and reports' bits/weight, the llama.cpp
commands, versions and the machine; a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("runtime")

ROOT = Path(__file__).resolve().parents[1]
LLAMACPP_DIR = ROOT / "runs" / "peers" / "build" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"

RTN = ["--solver", "rtn"]
INT = ["--method", "int", "--group-size", "128", "--asym"]
FORMATS: dict[str, list[str] | None] = {
    "fp32": None,
    "int4": [*INT, "--bits", "4", *RTN],
    "int3": [*INT, "--bits", "3", *RTN],
    "int2": [*INT, "--bits", "2", *RTN],
    "nf4": ["--method", "nf4", *RTN],
    "trellis2": ["--method", "trellis", "--bits", "2", *RTN],  # + --trellis-l
    "rht-int4": [*INT, "--bits", "4", *RTN, "--incoherence", "rht"],
    "rht-int4-paley": [*INT, "--bits", "4", *RTN, "--incoherence", "rht", "--rht-transform", "paley"],
    "rht-int4-hartley": [*INT, "--bits", "4", *RTN, "--incoherence", "rht", "--rht-transform", "hartley"],
    "rht-int2": [*INT, "--bits", "2", *RTN, "--incoherence", "rht"],
}
SETTING_KEYS = ("tokens", "prompt", "prefill", "batch", "repeats", "trellis_l", "llamacpp_f16_embeddings")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "tiny-olmoe"])
    p.add_argument("--formats", nargs="+", default=[f for f in FORMATS if f != "fp32"], choices=list(FORMATS)[1:])
    p.add_argument("--reference-formats", nargs="*", default=["int4"],
                   help="formats also benched with the pure-torch reference kernels (default int4)")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trellis-l", type=int, default=12, help="trellis state bits of the trellis2 checkpoint")
    p.add_argument("--llamacpp", nargs="*", default=["F16", "Q8_0", "Q4_0"],
                   help="llama.cpp types to bench when its tools and llama-cpp-python exist (none: skip)")
    p.add_argument("--llamacpp-dir", default=str(LLAMACPP_DIR), help="llama.cpp source tree with build/bin")
    p.add_argument("--llamacpp-f16-embeddings", action="store_true",
                   help="llama-quantize --token-embedding-type f16 --output-tensor-type f16 (default: its choice)")
    p.add_argument("--work", default="runs/runtime", help="checkpoints and GGUF files go here (reused)")
    p.add_argument("--json", required=True)
    p.add_argument("--worker-threads", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in SETTING_KEYS}


def _load(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    if not path.is_file():
        return {"settings": _settings(args), "rows": [], "checkpoints": {}, "gguf": {}}
    data = json.loads(path.read_text())
    if data.get("settings") != _settings(args):
        raise SystemExit(f"{path} was made with other settings ({data.get('settings')}); pass the same ones to "
                         f"resume it, or choose another --json")
    return data


def _save(path: Path, data: dict[str, Any], argv: list[str]) -> None:
    from moequant.fsutil import atomic_write_json
    from moequant.runinfo import run_info

    _fill_ratios(data["rows"])
    path.parent.mkdir(parents=True, exist_ok=True)
    info = run_info(argv)
    info["command"] = shlex.join(["python", "benchmarks/runtime.py", *argv])
    atomic_write_json(path, {**data, **info})


def _run(cmd: list[str], log_file: Path | None = None, env: dict | None = None) -> float:
    log.info("$ %s", shlex.join(map(str, cmd)))
    t0 = time.time()
    if log_file is None:
        subprocess.run([str(c) for c in cmd], check=True, env=env)
    else:
        with open(log_file, "w") as f:
            r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
        if r.returncode:
            tail = " | ".join(log_file.read_text(errors="replace").splitlines()[-3:])
            raise RuntimeError(f"{Path(str(cmd[0])).name} failed (exit {r.returncode}, {log_file}): {tail}")
    return round(time.time() - t0, 1)


# --------------------------------------------------------------------------------------------- checkpoints

def _quantize_flags(fmt: str, args: argparse.Namespace) -> list[str]:
    flags = list(FORMATS[fmt] or [])
    return flags + (["--trellis-l", str(args.trellis_l)] if fmt == "trellis2" else [])


def make_checkpoints(args: argparse.Namespace, data: dict[str, Any], work: Path) -> None:
    """Every (model, format) checkpoint, made with ``moequant quantize`` when ``report.json`` is missing."""
    from moequant.resume import work_dir_for

    for model in args.models:
        for fmt in args.formats:
            out = work / f"{model}-{fmt}"
            cmd = [sys.executable, "-m", "moequant.cli", "-q", "quantize", model, *_quantize_flags(fmt, args),
                   "--out", str(out)]
            key, shown = f"{model}/{fmt}", shlex.join(["moequant", *cmd[3:]])
            if not (out / "report.json").is_file():
                extra = ["--resume"] if work_dir_for(out).exists() else ["--overwrite"] if out.exists() else []
                data["checkpoints"][key] = {"command": shown, "seconds": _run(cmd + extra)}
            rep = json.loads((out / "report.json").read_text())
            data["checkpoints"].setdefault(key, {"command": shown, "seconds": None})  # made by an earlier run
            data["checkpoints"][key].update({
                "path": str(out), "bits_per_weight": rep["bits_per_weight"],
                "bits_per_weight_model": rep["bits_per_weight_model"], "checkpoint_bytes": rep["checkpoint_bytes"],
                "solver": rep.get("solver"), "recipe_config": rep["config"]["rules"][-1]["config"]})


def make_ggufs(args: argparse.Namespace, data: dict[str, Any], work: Path) -> None:
    """F16 GGUF by llama.cpp's converter, then each ``--llamacpp`` type by ``llama-quantize``; a failure is
    recorded (``error``) and the benchmark goes on."""
    lc = Path(args.llamacpp_dir)
    convert, quant = lc / "convert_hf_to_gguf.py", lc / "build" / "bin" / "llama-quantize"
    if not args.llamacpp:
        return
    if not (convert.is_file() and quant.is_file()):
        log.warning("llama.cpp rows skipped: no %s and %s (build them with benchmarks/peers/build_llamacpp.sh)",
                    convert, quant)
        return
    from moequant.models.loader import resolve_model_spec

    for model in args.models:
        f16 = work / f"{model}-F16.gguf"
        env = {**os.environ, "PYTHONPATH": str(lc / "gguf-py")}
        for qtype in args.llamacpp:
            key = f"{model}/{qtype}"
            path = f16 if qtype == "F16" else work / f"{model}-{qtype}.gguf"
            entry = data["gguf"].setdefault(key, {})
            if path.is_file():
                entry.setdefault("path", str(path))
                continue
            try:
                if not f16.is_file():
                    hf = resolve_model_spec(model).path
                    tmp = f16.with_suffix(".tmp.gguf")
                    cmd = [sys.executable, convert, hf, "--outtype", "f16", "--outfile", tmp]
                    data["gguf"][f"{model}/F16"] = {"command": shlex.join(map(str, cmd)),
                                                    "seconds": _run(cmd, work / f"{model}-convert.log", env)}
                    tmp.replace(f16)
                    data["gguf"][f"{model}/F16"]["path"] = str(f16)
                if qtype != "F16":
                    tmp = path.with_suffix(".tmp.gguf")
                    emb = ["--token-embedding-type", "f16", "--output-tensor-type", "f16"] \
                        if args.llamacpp_f16_embeddings else []
                    cmd = [quant, *emb, f16, tmp, qtype, "2"]
                    entry.update(command=shlex.join(map(str, cmd)),
                                 seconds=_run(cmd, work / f"{model}-quantize-{qtype}.log"))
                    tmp.replace(path)
                    entry["path"] = str(path)
            except (RuntimeError, OSError) as e:
                log.warning("llama.cpp %s %s: %s", model, qtype, e)
                data["gguf"][key] = {"error": str(e)}
        for key, entry in data["gguf"].items():
            if key.startswith(f"{model}/") and entry.get("path") and "accounting" not in entry:
                entry["accounting"] = gguf_accounting(Path(entry["path"]))


def gguf_accounting(path: Path) -> dict[str, Any]:
    """Bits/weight of a GGUF's block tensors (norms excluded), tensor types, file bytes."""
    from collections import Counter

    from gguf import GGUFReader

    q_bytes = q_elems = 0
    types: Counter = Counter()
    for t in GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.") and "norm" not in t.name and len(t.shape) >= 2:
            q_bytes += int(t.n_bytes)
            q_elems += int(t.n_elements)
            types[t.tensor_type.name] += 1
        elif not t.name.startswith("blk."):
            types[f"{t.name}:{t.tensor_type.name}"] += 1
    return {"file_bytes": path.stat().st_size, "bits_per_weight_blocks": 8.0 * q_bytes / q_elems if q_elems else None,
            "tensor_types": dict(types)}


# --------------------------------------------------------------------------------------------- worker

def _key(r: dict[str, Any]) -> tuple:
    return r["model"], r["variant"], r["kernels"], r["threads"]


def _bench_command(spec: str, args: argparse.Namespace, threads: int, kernels: str) -> str:
    return shlex.join(["moequant", "bench", spec, "--tokens", str(args.tokens), "--prompt", str(args.prompt),
                       "--prefill", str(args.prefill), "--batch", *map(str, args.batch), "--repeats",
                       str(args.repeats), "--threads", str(threads), "--kernels", kernels])


def worker(args: argparse.Namespace, argv: list[str]) -> int:
    """One process, one thread count: per model a session fp32 → missing rows → fp32."""
    import torch

    threads = args.worker_threads
    torch.set_num_threads(threads)
    data = _load(Path(args.json), args)
    done = {_key(r) for r in data["rows"]}
    for model in args.models:
        todo = [(fmt, k) for fmt in args.formats for k in (["auto", "reference"] if fmt in args.reference_formats
                                                           else ["auto"])
                if (model, fmt, k, threads) not in done]
        ggufs = [t for t in args.llamacpp if (data["gguf"].get(f"{model}/{t}") or {}).get("path")
                 and (model, f"llama.cpp {t}", "llama.cpp", threads) not in done]
        if ggufs and not _llama_cpp_importable(args):
            ggufs = []
        if not todo and not ggufs:
            continue
        _session(args, argv, data, model, threads, todo, ggufs)
    return 0


def _session(args: argparse.Namespace, argv: list[str], data: dict[str, Any], model: str, threads: int,
             todo: list[tuple[str, str]], ggufs: list[str]) -> None:
    """fp32, then each missing row, then fp32 again, in this process; the JSON is written after every row."""
    from moequant.bench import BenchSettings, bench_spec

    path, work = Path(args.json), Path(args.work)
    session = f"{model}-t{threads}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"

    def add(row: dict[str, Any]) -> None:
        data["rows"].append({**row, "session": session, "threads": threads, "model": model})
        _save(path, data, argv)
        log.info("%s", _row_line(data["rows"][-1]))

    def bench(variant: str, spec: str, kernels: str, role: str) -> None:
        s = BenchSettings(tokens=args.tokens, prompt=args.prompt, prefill=args.prefill,
                          batches=tuple(args.batch), repeats=args.repeats, kernels=kernels)
        res = bench_spec(spec, s, label=variant)
        res["spec"] = res.pop("model")  # the row's "model" is the zoo model; spec: what was loaded
        add({"variant": variant, "role": role, "kernels": kernels, "engine": "moequant",
             "command": _bench_command(spec, args, threads, kernels), **res})

    bench("fp32", model, "auto", "baseline (session start)")
    for fmt, kernels in todo:
        bench(fmt, str(work / f"{model}-{fmt}"), kernels, "measured")
    for t in ggufs:
        add(llama_row(model, t, Path(data["gguf"][f"{model}/{t}"]["path"]), args, threads))
    bench("fp32", model, "auto", "baseline (session end)")


def _llama_cpp_importable(args: argparse.Namespace) -> bool:
    lib = Path(args.llamacpp_dir) / "build" / "bin"
    if lib.is_dir():
        os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(lib))  # the libllama built without AMX/native flags
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # a missing package or a library that fails to load: no llama.cpp rows
        log.warning("llama.cpp rows skipped: llama_cpp does not import (%s)", e)
        return False
    return True


def _llama_decode(llm: Any, prompt: list[int], steps: int) -> tuple[list[int], float]:
    """Like ``moequant.bench.decode_run`` at batch 1: all but the last prompt token untimed, then ``steps``
    timed single-token ``eval`` calls, each followed by the greedy pick."""
    import numpy as np

    llm.reset()
    if len(prompt) > 1:
        llm.eval(prompt[:-1])
    nxt, out = prompt[-1], []
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.eval([nxt])
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
    return out, time.perf_counter() - t0


def _llama_prefill(llm: Any, ids: list[int]) -> float:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - t0


def open_llama(gguf: Path | str, args: argparse.Namespace, threads: int) -> Any:
    """A llama-cpp-python model sized for ``args`` (a prompt + ``--tokens`` decode, one ``--prefill`` eval)."""
    import llama_cpp

    n_ctx = max(args.prompt + args.tokens, args.prefill) + 8
    n_batch = max(args.prefill, args.prompt, 32)
    return llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                           n_threads_batch=threads, logits_all=False, verbose=False)


def llama_row(model: str, qtype: str, gguf: Path, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """Batch-1 greedy decode (and prefill) of a GGUF through llama-cpp-python with our prompt ids."""
    import importlib.metadata as md


    from moequant.bench import prompt_batch
    from moequant.models.loader import load_tokenizer, resolve_model_spec

    tok = load_tokenizer(resolve_model_spec(model))
    llm = open_llama(gguf, args, threads)
    vocab = llm.n_vocab()
    prompt = [int(i) for i in prompt_batch(tok, vocab, 1, args.prompt)[0][0]]

    _llama_decode(llm, prompt, args.tokens)  # warm-up
    runs = [_llama_decode(llm, prompt, args.tokens) for _ in range(args.repeats)]
    secs = statistics.median(s for _, s in runs)
    row: dict[str, Any] = {
        "variant": f"llama.cpp {qtype}", "role": "peer", "kernels": "llama.cpp", "engine": "llama.cpp",
        "gguf": str(gguf), "peer_version": md.version("llama_cpp_python"), "prompt_ids": prompt,
        "decode": [{"batch": 1, "sequences": 1, "new_tokens_per_sequence": len(runs[0][0]),
                    "seconds": secs, "seconds_all": [round(s, 6) for _, s in runs],
                    "tokens_per_s": args.tokens / secs, "generated_ids": runs[0][0]}],
        "prefill": None, "memory": None,
        "command": f"llama_cpp.Llama({gguf}, n_threads={threads}, logits_all=False).eval: one token per step"}
    if args.prefill:
        ids = [int(i) for i in prompt_batch(tok, vocab, 1, args.prefill)[0][0]]
        _llama_prefill(llm, ids)  # warm-up
        ps = [_llama_prefill(llm, ids) for _ in range(args.repeats)]
        row["prefill"] = {"tokens": len(ids), "seconds": statistics.median(ps), "seconds_all": [round(s, 6) for s in ps],
                          "tokens_per_s": len(ids) / statistics.median(ps)}
    getattr(llm, "close", lambda: None)()
    return row


# --------------------------------------------------------------------------------------------- table

def _fill_ratios(rows: list[dict[str, Any]]) -> None:
    """``ratio_vs_fp32`` of every non-fp32 row: its tokens/s over the mean of its session's fp32 rows."""
    for r in rows:
        if r["variant"] == "fp32":
            continue
        base = [b for b in rows if b["session"] == r["session"] and b["variant"] == "fp32"]
        if not base:
            continue
        out: dict[str, Any] = {"decode": {}, "baseline_rows": len(base)}
        for d in r["decode"]:
            fp = [x["tokens_per_s"] for b in base for x in b["decode"] if x["batch"] == d["batch"]]
            if fp:
                out["decode"][str(d["batch"])] = d["tokens_per_s"] / statistics.mean(fp)
        fp = [b["prefill"]["tokens_per_s"] for b in base if b.get("prefill")]
        if r.get("prefill") and fp:
            out["prefill"] = r["prefill"]["tokens_per_s"] / statistics.mean(fp)
        r["ratio_vs_fp32"] = out


def _row_line(r: dict[str, Any]) -> str:
    dec = ", ".join(f"b{d['batch']} {d['tokens_per_s']:.2f}" for d in r["decode"])
    pre = f", prefill {r['prefill']['tokens_per_s']:.1f}" if r.get("prefill") else ""
    return f"{r['model']} t{r['threads']} {r['variant']} [{r['kernels']}]: decode tok/s {dec}{pre}"


def table(data: dict[str, Any]) -> str:
    batches = data["settings"]["batch"]
    head = ["model", "threads", "variant", "kernels", "bits/w", "resident MiB",
            *[c for b in batches for c in (f"decode b{b} tok/s", "x fp32")], "prefill tok/s", "x fp32",
            "peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in data["rows"]:
        ck = data["checkpoints"].get(f"{r['model']}/{r['variant']}") or {}
        if r["engine"] == "llama.cpp":
            acct = (data["gguf"].get(f"{r['model']}/{r['variant'].split()[-1]}") or {}).get("accounting") or {}
            bits = f"{acct['bits_per_weight_blocks']:.2f}" if acct.get("bits_per_weight_blocks") else "-"
            mib = f"{acct['file_bytes'] / 2**20:.1f} (file)" if acct.get("file_bytes") else "-"
        else:
            bits = f"{ck['bits_per_weight']:.3f}" if ck.get("bits_per_weight") else ("32" if r["variant"] == "fp32"
                                                                                    else "-")
            mib = f"{r['memory']['resident_mib']:.1f}"
        rv = r.get("ratio_vs_fp32") or {}
        dec = {d["batch"]: d for d in r["decode"]}
        cells = []
        for b in batches:
            d = dec.get(b)
            cells += [f"{d['tokens_per_s']:.2f}" if d else "-",
                      f"{rv['decode'][str(b)]:.2f}" if str(b) in rv.get("decode", {}) else "-"]
        pre = f"{r['prefill']['tokens_per_s']:.1f}" if r.get("prefill") else "-"
        prx = f"{rv['prefill']:.2f}" if "prefill" in rv else "-"
        rss = f"{r['peak_rss_sampled_bytes'] / 2**20:.0f}" if r.get("peak_rss_sampled_bytes") else "-"
        lines.append(f"| {r['model']} | {r['threads']} | {r['variant']} | {r['kernels']} | {bits} | {mib} | "
                     + " | ".join(cells) + f" | {pre} | {prx} | {rss} |")
    return "\n".join(lines)


def main() -> int:
    argv = sys.argv[1:]
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.worker_threads is not None:
        return worker(args, argv[:argv.index("--worker-threads")])  # main() appends it last
    for name in ("tokens", "prompt", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1")
    if args.prefill < 0 or any(b < 1 for b in args.batch) or any(t < 1 for t in args.threads):
        raise SystemExit("--prefill must be >= 0, --batch and --threads values >= 1")
    path, work = Path(args.json), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = _load(path, args)
    make_checkpoints(args, data, work)
    make_ggufs(args, data, work)
    _save(path, data, argv)
    for n in args.threads:  # one process per thread count, one after the other
        env = {**os.environ, "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}
        _run([sys.executable, __file__, *argv, "--worker-threads", str(n)], env=env)
    data = json.loads(path.read_text())
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
