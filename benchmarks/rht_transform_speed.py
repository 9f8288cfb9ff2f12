"""Issue #10: the run-time Hadamard transforms of the three rules side by side — ``rht_apply`` (rule ``paley``,
``H_p ⊗ B_m``, the block inside) and ``rht_apply_outer`` (rule ``paley-outer``, ``B_m ⊗ H_p``, and rule
``hartley``, ``C_o ⊗ H_p``: the block outside) — on the activation shapes of a prefill (``--rows`` rows,
default 512) for the widths of the zoo models, one thread.

    python benchmarks/rht_transform_speed.py --json benchmarks/results/rht_transform_speed.json

Each cell is the best of ``--repeats`` timings of ``--calls`` calls, the rules one after another per width.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from moequant.codecs.hadamard import hadamard_factors
from moequant.kernels import hadamard as kh

WIDTHS = (192, 576, 896, 1536, 4864, 8960)  # SmolLM2 kv/hidden, Qwen2.5-0.5B hidden, SmolLM2 MLP, 0.5B MLP, 1.5B MLP


def _best(fn, calls: int, repeats: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS),
                   help="activation widths (456 912: qwen2.5-coder-0.5b-moe's expert down input and gate_up output)")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    ext = kh.extension()
    if ext is None:
        raise SystemExit("the rht extension is not built (python -m moequant.kernels.cpp_build)")
    rows = []
    for n in args.widths:
        x = torch.randn(args.rows, n, generator=torch.Generator().manual_seed(n))
        s = torch.ones(n)
        row = {"n": n}
        for rule, name in (("paley", "rht_apply"), ("paley-outer", "rht_apply_outer"), ("hartley", "rht_apply_outer")):
            call = (getattr(ext, name), x, s, kh._NONE, kh.block_for(n, rule), False)
            ms = 1e3 * _best(lambda c=call: c[0](*c[1:]), args.calls, args.repeats)
            row[rule] = {"factors": list(hadamard_factors(n, rule)), "ms": ms}
        row["speedup"] = {r: row["paley"]["ms"] / row[r]["ms"] for r in ("paley-outer", "hartley")}  # vs paley
        rows.append(row)
        print(f"n={n:5d}  " + "   ".join(f"{r} {row[r]['factors']} {row[r]['ms']:.3f} ms" for r in
                                         ("paley", "paley-outer", "hartley"))
              + "   speed-up " + ", ".join(f"{r} x{v:.2f}" for r, v in row["speedup"].items()))
    out = {"rows": rows, "settings": vars(args), "torch": torch.__version__, "machine": platform.processor() or
           platform.machine(), "threads": 1}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
