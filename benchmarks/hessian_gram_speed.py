"""Hessian accumulation speed: the blocked symmetric Gram product (``calib.hessian._add_gram``) against one
``c.T @ c`` GEMM, on the same chunk in one process, and whether their values are identical.

    python benchmarks/hessian_gram_speed.py --threads 2 --json benchmarks/results/hessian_gram_speed.json

Per input width K (the zoo's linear input widths: SmolLM2 576 / 1536, Qwen2.5-0.5B 896 / 4864, 1.5B 1536 /
8960): a chunk of ``_CHUNK_TOKENS`` (2048) N(0, 1) tokens, each variant added into a float64 ``[K, K]``
accumulator; median of 5 timed runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _cli_runs import write_json


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", nargs="+", type=int, default=[576, 896, 1536, 4864, 8960])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    import torch

    from moequant.calib.hessian import _CHUNK_TOKENS, _add_gram, _gram_blocks

    torch.set_num_threads(args.threads)

    def median_seconds(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    rows = []
    for k in args.widths:
        c = torch.randn(_CHUNK_TOKENS, k, generator=torch.Generator().manual_seed(k))  # [t, K]
        acc = torch.zeros(k, k, dtype=torch.float64)
        full = median_seconds(lambda acc=acc, c=c: acc.add_((c.T @ c).to(torch.float64)))
        blocked = median_seconds(lambda acc=acc, c=c: _add_gram(acc, c))
        a, b = torch.zeros_like(acc), torch.zeros_like(acc)
        a.add_((c.T @ c).to(torch.float64))
        _add_gram(b, c)
        row = {"K": k, "blocks": len(_gram_blocks(k)), "full_seconds": full, "blocked_seconds": blocked,
               "time_ratio": blocked / full, "identical": bool(torch.equal(a, b))}
        rows.append(row)
        print(json.dumps(row))
    write_json(Path(args.json), {"threads": args.threads, "tokens": _CHUNK_TOKENS, "rows": rows}, "benchmarks/hessian_gram_speed.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
