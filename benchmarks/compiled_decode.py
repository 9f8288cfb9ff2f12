"""Greedy decode of packed checkpoints and their fp32 base, eager and under ``torch.compile``, side by side.

Each model generates ``--tokens`` tokens after a ``--prompt``-token prompt with transformers' static cache; the
compiled variant is ``torch.compile(model.forward)`` (inductor, static shapes), the packed linears calling the C++
kernels as dispatcher ops (``kernels/cpp_ops.py``). After a warm-up per model (the prefill graph's compile) and a
dropped warm-up round (the decode step's), ``--rounds`` rounds each time every model eager then compiled; ratios are
per round against fp32 eager and fp32 compiled of that round.

    python benchmarks/compiled_decode.py --specs smollm2-135m runs/runtime/smollm2-135m-int4 ... --threads 1 \
        --json benchmarks/results/compiled_decode_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _cli_runs import write_json


def _load(spec: str):
    from moequant import api
    from moequant.models.loader import load_model

    if Path(spec).is_dir() and (Path(spec) / "report.json").is_file():
        return api.load(spec)
    res = load_model(spec)
    return res[0] if isinstance(res, tuple) else res


def _decode(model, prompt: torch.Tensor, tokens: int) -> tuple[float, list[int]]:
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return tokens / (time.perf_counter() - t0), out[0, prompt.shape[1]:].tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", nargs="+", required=True, help="the fp32 base first, then packed runs")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from moequant.kernels import cpp_ops

    cpp_ops.prepare()
    # every model shares LlamaForCausalLM.forward's code object: each instance and each shape (prefill, decode)
    # is one more compiled entry of it; past the default limit of 8 dynamo silently runs the rest eagerly
    torch._dynamo.config.recompile_limit = 64
    models: dict[str, Any] = {}
    for spec in args.specs:
        m = _load(spec).eval()
        m.generation_config.cache_implementation = "static"
        eager = m.forward
        compiled = torch.compile(m.forward, dynamic=False)
        models[spec] = (m, eager, compiled)
    vocab = models[args.specs[0]][0].config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    rows: dict[str, dict[str, Any]] = {s: {"eager": [], "compiled": []} for s in args.specs}
    for spec, (m, eager, compiled) in models.items():
        t0 = time.perf_counter()
        m.forward = compiled
        _, ids_c = _decode(m, prompt, args.tokens)
        rows[spec]["compile_s"] = time.perf_counter() - t0
        m.forward = eager
        _, ids_e = _decode(m, prompt, args.tokens)
        rows[spec]["same_tokens"] = ids_c == ids_e
        print(f"{spec}: compiled in {rows[spec]['compile_s']:.0f} s, same tokens as eager: {ids_c == ids_e}", flush=True)
    for r in range(-1, args.rounds):  # round -1: a second warm-up (the decode-step graph is compiled in it), dropped
        for spec, (m, eager, compiled) in models.items():
            for mode, fwd in (("eager", eager), ("compiled", compiled)):
                m.forward = fwd
                tps = _decode(m, prompt, args.tokens)[0]
                if r >= 0:
                    rows[spec][mode].append(tps)
        if r < 0:
            continue
        print(f"round {r + 1}: " + ", ".join(f"{s.split('/')[-1]} {rows[s]['eager'][-1]:.1f}/{rows[s]['compiled'][-1]:.1f}"
                                             for s in args.specs), flush=True)
    base = rows[args.specs[0]]
    for spec, row in rows.items():
        for mode in ("eager", "compiled"):
            row[f"{mode}_median"] = statistics.median(row[mode])
            row[f"{mode}_x_fp32_eager"] = statistics.median([a / b for a, b in zip(row[mode], base["eager"])])
            row[f"{mode}_x_fp32_same_mode"] = statistics.median([a / b for a, b in zip(row[mode], base[mode])])
        print(f"{spec}: eager {row['eager_median']:.1f} tok/s (x{row['eager_x_fp32_eager']:.2f} fp32 eager), compiled "
              f"{row['compiled_median']:.1f} (x{row['compiled_x_fp32_eager']:.2f} fp32 eager, "
              f"x{row['compiled_x_fp32_same_mode']:.2f} fp32 compiled)")
    write_json(Path(args.json), {"settings": {k: getattr(args, k) for k in ("specs", "tokens", "prompt", "rounds",
                                                                           "threads")}, "rows": rows},
               "benchmarks/compiled_decode.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
