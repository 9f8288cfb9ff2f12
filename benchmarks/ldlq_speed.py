"""LDLQ's factorisation and whole solver, this tree against another tree's, on the zoo's real shapes.

    python benchmarks/ldlq_speed.py --baseline-src <copy of an older tree>/src --json benchmarks/results/ldlq_speed.json

Per shape ``R x K`` (SmolLM2-135M's down_proj 576 x 1536, Qwen2.5-0.5B's 896 x 4864, Qwen2.5-1.5B's gate/up
8960 x 1536 and down_proj 1536 x 8960): a damped Hessian ``diag(d) + V Vᵀ`` (``d`` lognormal, ``V [K, 256]``
N(0, 1/256): correlated inputs with uneven scales, 1% damping) and a weight N(0, 0.02²). Timed, one after the
other in this process (median of ``--repeats``): GPTQ's factor (``U`` with ``H⁻¹ = UᵀU``: a Cholesky
factorisation, ``cholesky_inverse``, a second factorisation — what ``ldlq`` used before the LDL form),
``ldl_feedback`` (one factorisation of the reversed matrix, block 1 and 16), and the whole ``ldlq`` of both trees
with the CLI's default codec (int4 asym g128 + clip search) — its proxy loss and how many codes agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

from _cli_runs import write_json


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["576x1536", "896x4864", "8960x1536", "1536x8960"])
    p.add_argument("--baseline-src", default=None, help="src/ of another tree: its ldlq is timed beside this one's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    import torch

    from moequant.codecs.config import UniformConfig
    from moequant.formats.methods import column_quantizer
    from moequant.solvers.ldlq import ldl_feedback, ldlq

    torch.set_num_threads(args.threads)
    base = None
    if args.baseline_src:
        spec = importlib.util.spec_from_file_location("ldlq_baseline", Path(args.baseline_src) / "moequant/solvers/ldlq.py")
        base = sys.modules["ldlq_baseline"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)

    def timed(fn):
        times, out = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    def gptq_factor(h):
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    cfg = UniformConfig(bits=4, group_size=128, symmetric=False)
    rows = []
    for shape in args.shapes:
        r, k = (int(v) for v in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        v = torch.randn(k, 256, generator=g, dtype=torch.float64) / 16  # [K, 256]
        h = v @ v.T  # [K, K]
        h.diagonal().add_(torch.randn(k, generator=g, dtype=torch.float64).exp())
        h.diagonal().add_(0.01 * h.diagonal().mean())
        w = torch.randn(r, k, generator=g) * 0.02  # [R, K]
        row = {"shape": shape, "R": r, "K": k}
        row["gptq_factor_s"], _ = timed(lambda h=h: gptq_factor(h))
        row["ldl_feedback_s"], _ = timed(lambda h=h: ldl_feedback(h, 1))
        row["ldl_feedback_block16_s"], _ = timed(lambda h=h: ldl_feedback(h, 16))
        row["ldlq_s"], new = timed(lambda w=w, h=h: (q := column_quantizer(cfg, w), ldlq(w, h, q), q.codes.clone()))
        row["ldlq_proxy"] = new[1].proxy
        if base is not None:
            row["baseline_ldlq_s"], old = timed(
                lambda w=w, h=h: (q := column_quantizer(cfg, w), base.ldlq(w, h, q), q.codes.clone()))
            row["baseline_ldlq_proxy"] = old[1].proxy
            row["codes_equal_fraction"] = float((old[2] == new[2]).float().mean())
            row["ldlq_speedup"] = row["baseline_ldlq_s"] / row["ldlq_s"]
        rows.append(row)
        print(row, flush=True)
    write_json(Path(args.json), {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
                                 "baseline_src": args.baseline_src, "codec": cfg.to_dict(), "rows": rows},
               "benchmarks/ldlq_speed.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
