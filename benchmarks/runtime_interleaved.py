"""Issue #10's speed ratios, measured interleaved: batch-1 greedy decode and a prefill of every packed checkpoint
and of the fp32 model it replaces, all loaded in one process and timed round-robin, so that a ratio is taken
between runs seconds apart rather than minutes apart.

    python benchmarks/runtime_interleaved.py --models smollm2-135m --formats int4 int3 int2 nf4 trellis2 \\
        rht-int4 --threads 1 2 --rounds 7 --json benchmarks/results/runtime_interleaved_smollm2-135m.json

Why: ``runtime.py`` benches one row after another (fp32, every packed row with its repeats, fp32 again). On
this shared 2-core machine the speed of the same run drifts by 15-30% within minutes, and that drift lands in
its ratios (its int4 row read 1.82x fp32 while a hand A/B gave 2.24x). Here one *round* runs fp32, then each
variant once, and the next round starts with fp32 again; a variant's ratio in round ``r`` is its tokens/s over
the mean of the fp32 runs that enclose it. The table gives the median of the per-round ratios and their range,
for decode and for prefill.

Protocol per thread count (one worker process, ``torch.set_num_threads`` and ``OMP_NUM_THREADS``): the same
random prompt of ``--prompt`` ids (seed 0) for every model; one untimed warm-up decode per model; then
``--rounds`` rounds of ``--tokens`` timed single-token steps each (``moequant.bench.decode_run``: the KV cache,
argmax of the last logits, what ``moequant bench`` times), then one prefill of ``--prefill`` random ids
(``moequant.bench.prefill_run``: one forward with the cache on, last-position logits; 0 skips it). Checkpoints are ``runtime.py``'s (RTN, made with the
CLI under ``--work`` when missing, reused otherwise). Every run's generated ids are compared across rounds
(``repeats_identical``).

``--llamacpp Q4_0 Q8_0 F16`` adds llama.cpp on the same model to every round (GGUFs made as ``runtime.py`` makes
them: llama.cpp's converter, then ``llama-quantize``; the tools from ``benchmarks/peers/build_llamacpp.sh``),
timed through llama-cpp-python with the same prompt ids (``runtime._llama_decode`` / ``_llama_prefill``: one
``eval`` per token, greedy pick from its logits; prefill one ``eval`` of the prefill ids). Its ratios are against
the same fp32 runs as ours.
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
import tempfile
from pathlib import Path
from typing import Any

from _cli_runs import write_json
from runtime import (FORMATS, LLAMACPP_DIR, _llama_cpp_importable, _llama_decode, _llama_prefill, make_checkpoints,
                     make_ggufs, open_llama)

log = logging.getLogger("runtime_interleaved")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m"])
    p.add_argument("--formats", nargs="+", default=["int4", "int3", "int2", "nf4", "trellis2", "rht-int4"],
                   choices=list(FORMATS)[1:])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--prefill", type=int, default=512, help="prefill tokens timed per round (0: no prefill)")
    p.add_argument("--trellis-l", type=int, default=12, help="trellis state bits of the trellis2 checkpoint")
    p.add_argument("--llamacpp", nargs="*", default=[],
                   help="llama.cpp types timed in the same rounds (e.g. Q4_0 Q8_0 F16; default none)")
    p.add_argument("--llamacpp-dir", default=str(LLAMACPP_DIR), help="llama.cpp source tree with build/bin")
    p.add_argument("--llamacpp-f16-embeddings", action="store_true",
                   help="llama-quantize --token-embedding-type f16 --output-tensor-type f16 (default: its choice)")
    p.add_argument("--work", default="runs/runtime", help="checkpoints and GGUFs (runtime.py's; made when missing)")
    p.add_argument("--json", required=True)
    p.add_argument("--make-only", action="store_true", help="make the missing checkpoints, time nothing")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p


def round_ratios(fp: list[float], variant: list[float]) -> list[float]:
    """Per-round ratio of ``variant``'s tokens/s [R] to the mean of the fp32 runs before and after it
    (``fp`` [R + 1]: fp32 opens every round and closes the last one)."""
    if len(fp) != len(variant) + 1:
        raise ValueError(f"{len(fp)} fp32 runs for {len(variant)} rounds: expected one more")
    return [v / (0.5 * (a + b)) for v, a, b in zip(variant, fp[:-1], fp[1:])]


def summarize(tps: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """``tps``: label -> tokens/s per run (fp32 [R + 1], each variant [R]) -> per-label median tokens/s and,
    for variants, the per-round ratios, their median, min and max."""
    out: dict[str, dict[str, Any]] = {"fp32": {"tokens_per_s": tps["fp32"], "median": statistics.median(tps["fp32"])}}
    for label, runs in tps.items():
        if label == "fp32":
            continue
        r = round_ratios(tps["fp32"], runs)
        out[label] = {"tokens_per_s": runs, "median": statistics.median(runs), "ratios": r,
                      "ratio_median": statistics.median(r), "ratio_min": min(r), "ratio_max": max(r)}
    return out


def _moequant_decode(model: Any, prompt: Any, tokens: int) -> tuple[list[int], float]:
    from moequant.bench import decode_run

    new, secs = decode_run(model, prompt, tokens)
    return new[0].tolist(), secs


def measure_model(model: str, args: argparse.Namespace, threads: int, ggufs: dict[str, str]) -> dict[str, Any]:
    """The rounds of one model: every checkpoint (and GGUF: ``ggufs`` type -> path) loaded at once, timed
    round-robin (see the module doc)."""
    import torch

    from moequant.bench import prefill_run
    from moequant.models.loader import load_model

    specs = {"fp32": model, **{f: str(Path(args.work) / f"{model}-{f}") for f in args.formats}}
    loaded = {label: load_model(spec, verify=False)[0] for label, spec in specs.items()}
    vocab = loaded["fp32"].config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=gen)  # [1, P]
    long_ids = torch.randint(0, vocab, (1, max(args.prefill, 1)), generator=gen)  # [1, prefill]

    # label -> (decode: () -> (generated ids, seconds), prefill: () -> seconds)
    runners = {label: (lambda m=m: _moequant_decode(m, prompt, args.tokens), lambda m=m: prefill_run(m, long_ids))
               for label, m in loaded.items()}
    for qtype, gguf in ggufs.items():
        llm = open_llama(gguf, args, threads)
        specs[f"llama.cpp {qtype}"] = gguf
        runners[f"llama.cpp {qtype}"] = (lambda llm=llm: _llama_decode(llm, prompt[0].tolist(), args.tokens),
                                         lambda llm=llm: _llama_prefill(llm, long_ids[0].tolist()))
    for dec, pf in runners.values():
        dec()  # warm-up: kernel builds, repacking, allocator
        if args.prefill:
            pf()
    tps: dict[str, list[float]] = {label: [] for label in specs}
    pre: dict[str, list[float]] = {label: [] for label in specs}
    ids: dict[str, list[list[int]]] = {label: [] for label in specs}
    order = [*specs] * args.rounds + ["fp32"]
    for i, label in enumerate(order):
        dec, pf = runners[label]
        new, secs = dec()
        tps[label].append(args.tokens / secs)
        ids[label].append(new)
        if args.prefill:
            pre[label].append(args.prefill / pf())
        if label == "fp32" and i:
            log.info("%s, %d thread(s): round %d/%d done", model, threads, len(tps["fp32"]) - 1, args.rounds)
    summary = {"decode": summarize(tps), **({"prefill": summarize(pre)} if args.prefill else {})}
    for label in specs:
        summary["decode"][label].update(spec=specs[label], generated_ids=ids[label][0],
                                        repeats_identical=all(x == ids[label][0] for x in ids[label]))
    return summary


def worker(args: argparse.Namespace) -> int:
    import torch

    threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)
    ggufs = json.loads(os.environ.get("RUNTIME_INTERLEAVED_GGUFS", "{}"))  # model -> {type: path}
    if any(ggufs.values()) and not _llama_cpp_importable(args):
        ggufs = {}
    result = {"threads": threads,
              "models": {m: measure_model(m, args, threads, ggufs.get(m, {})) for m in args.models}}
    Path(args.worker_out).write_text(json.dumps(result))
    return 0


def table(results: list[dict[str, Any]], formats: list[str]) -> str:
    lines = ["| model | threads | variant | decode b1 tok/s | × fp32 (median of rounds) | range | prefill tok/s | "
             "× fp32 | range |", "|---|---|---|---|---|---|---|---|---|"]

    def cells(part: dict[str, Any] | None, label: str) -> str:
        if part is None:
            return "- | - | -"
        v = part[label]
        if label == "fp32":
            return f"{v['median']:.2f} | - | -"
        return f"{v['median']:.2f} | **{v['ratio_median']:.2f}** | {v['ratio_min']:.2f}-{v['ratio_max']:.2f}"

    for res in results:
        for model, s in res["models"].items():
            for label in ("fp32", *formats):
                if label not in s["decode"]:
                    continue  # a llama.cpp type whose GGUF could not be made or loaded
                lines.append(f"| {model} | {res['threads']} | {label} | {cells(s['decode'], label)} | "
                             f"{cells(s.get('prefill'), label)} |")
    return "\n".join(lines)


def main() -> int:
    argv = sys.argv[1:]
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.worker_out is not None:
        return worker(args)
    data: dict[str, Any] = {"checkpoints": {}, "gguf": {}}
    make_checkpoints(args, data, Path(args.work))
    make_ggufs(args, data, Path(args.work))
    if args.make_only:
        return 0
    ggufs = {m: {t: data["gguf"][f"{m}/{t}"]["path"] for t in args.llamacpp
                 if data["gguf"].get(f"{m}/{t}", {}).get("path")} for m in args.models}
    labels = [*args.formats, *(f"llama.cpp {t}" for t in args.llamacpp)]
    results = []
    for n in args.threads:
        env = {**os.environ, "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n),
               "RUNTIME_INTERLEAVED_GGUFS": json.dumps(ggufs)}
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "worker.json"
            cmd = [sys.executable, __file__, *argv, "--worker-out", str(out)]
            log.info("$ %s  (OMP_NUM_THREADS=%d)", shlex.join(cmd), n)
            subprocess.run(cmd, check=True, env=env)
            results.append(json.loads(out.read_text()))
    settings = {k: getattr(args, k) for k in ("rounds", "tokens", "prompt", "prefill", "trellis_l")}
    write_json(Path(args.json), {"settings": settings, "checkpoints": data["checkpoints"], "gguf": data["gguf"],
                                 "results": results}, "benchmarks/runtime_interleaved.py")
    print(table(results, labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
