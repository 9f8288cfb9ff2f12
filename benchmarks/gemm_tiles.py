"""Packed linears at many rows of x (the eval's and a prefill's case) against ``F.linear`` on their float32 decode.

At more than ``GEMV_MAX_ROWS`` rows the CPU kernels of the uniform, GGUF-block and additive formats decode a tile
of rows of W to fp32 and multiply it by BLAS into its columns of y; the tile's height (``common.h``'s
``gemm_tile_rows``) decides how well BLAS runs. This times, per format and shape, the packed tensor's ``linear``
and ``F.linear`` with its decoded weight, alternating, ``--rounds`` times, and records fp32 time / kernel time
per round (side by side, so a noisy machine moves both). Run it against two trees (``PYTHONPATH=tree/src``) to
compare tile rules: the ratio to fp32 in each run is what is compared.

Shapes: Qwen2.5-Coder-1.5B's MLP (1536 -> 8960 and 8960 -> 1536, the widest input of the zoo's dense models) and
SmolLM2-135M's (576 -> 1536, 1536 -> 576). Formats: int4 asym g128 (``uniform-asym-packed``, encoded from a
Gaussian matrix), Q4_K (GGUF blocks, encoded), additive 2x8 g8 (random codes and codebooks: the speed does not
depend on their values). Rows: 2052 (one eval batch: 4 windows of 513 positions) and 512.

    python benchmarks/gemm_tiles.py --json benchmarks/results/gemm_tiles.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from _cli_runs import write_json

SHAPES = ((8960, 1536), (1536, 8960), (1536, 576), (576, 1536))  # (N, K)


def _tensor(fmt: str, n: int, k: int, g: torch.Generator):
    from moequant.codecs.config import AdditiveConfig, GgufConfig, UniformConfig
    from moequant.formats.additive import AdditiveTensor
    from moequant.formats.kquant import GGUF_CLASSES
    from moequant.formats.uniform import UniformAsymTensor

    if fmt == "additive-2x8":
        cfg = AdditiveConfig(M=2, B=8, g=8)
        parts = {"codes": torch.randint(0, 256, (n, k // 8, 2), generator=g),
                 "codebooks": torch.randn(2, 256, 8, generator=g) * 0.01, "scale": torch.ones(n)}
        return AdditiveTensor.from_parts((n, k), parts, cfg)
    w = torch.randn(n, k, generator=g) * 0.02  # [N, K]
    if fmt == "int4-g128":
        return UniformAsymTensor.encode(w, UniformConfig(bits=4, group_size=128, symmetric=False))
    if fmt == "q4_k":
        return GGUF_CLASSES["q4_k"].encode(w, GgufConfig(qtype="q4_k"))
    raise ValueError(fmt)


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(qt, rows: int, rounds: int, g: torch.Generator) -> dict[str, Any]:
    w = qt.dequantize(torch.float32)  # [N, K]
    x = torch.randn(rows, qt.shape[-1], generator=g)  # [M, K]
    y, want = qt.linear(x), F.linear(x, w)  # warm-up, and the check that both compute the same product
    err = float(((y - want).abs() / (x.abs() @ w.abs().T + 1e-30)).max())
    fp, kern = [], []
    for _ in range(rounds):
        fp.append(_time(lambda: F.linear(x, w)))
        kern.append(_time(lambda: qt.linear(x)))
    ratios = [a / b for a, b in zip(fp, kern)]
    return {"fp32_ms": [1e3 * t for t in fp], "kernel_ms": [1e3 * t for t in kern], "ratios": ratios,
            "ratio_median": statistics.median(ratios), "max_rel_err": err}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", nargs="+", default=["int4-g128", "q4_k", "additive-2x8"])
    ap.add_argument("--rows", type=int, nargs="+", default=[2052, 512])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    results: list[dict[str, Any]] = []
    for fmt in args.formats:
        for n, k in SHAPES:
            qt = _tensor(fmt, n, k, g)
            for m in args.rows:
                r = measure(qt, m, args.rounds, g)
                results.append({"format": fmt, "N": n, "K": k, "M": m, **r})
                print(f"{fmt:13s} {k:5d}->{n:<5d} M={m}: fp32 {statistics.median(r['fp32_ms']):7.1f} ms, "
                      f"packed {statistics.median(r['kernel_ms']):7.1f} ms, fp32/packed x{r['ratio_median']:.3f} "
                      f"[{min(r['ratios']):.3f}, {max(r['ratios']):.3f}]", flush=True)
    write_json(Path(args.json), {"settings": {"formats": args.formats, "rows": args.rows, "rounds": args.rounds,
                                              "threads": args.threads}, "results": results},
               "benchmarks/gemm_tiles.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
