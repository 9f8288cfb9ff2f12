"""A real K-quant output head multiplied from its GGUF blocks (``kernels.gguf``) against the same head as float32.

The model's own file: Qwen2.5-Coder-1.5B-Instruct Q4_K_M (the zoo's ``qwen2.5-coder-1.5b``), whose ``output.weight``
is Q6_K 151,936 x 1,536 and ``token_embd.weight`` Q4_K. For each table: the blocks as ``quantize`` stores them
(``gguf-q6_k`` / ``gguf-q4_k``), their float32 decode (what a kept float head holds), then per round, alternating,
``F.linear(x, W_fp32)`` and the packed tensor's ``linear`` at M = 1 (a decoded token) and M = 8, and one M = 512
prefill chunk per round, at 1 and 2 threads. Ratios are per round (fp32 time / kernel time), side by side.

    python benchmarks/gguf_head.py --json benchmarks/results/gguf_head_qwen2.5-coder-1.5b.json
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


def _tables(alias: str) -> dict[str, Any]:
    """{tensor name: packed GgufTensor} from the cached GGUF of a zoo alias."""
    from gguf import GGUFReader

    from moequant.codecs.kquant import TYPES
    from moequant.formats.kquant import GGUF_CLASSES
    from moequant.zoo.models import GGUF_MODELS, cached_gguf_path

    path = cached_gguf_path(GGUF_MODELS[alias])
    if not path.is_file():
        sys.exit(f"gguf_head.py: {path} is not in the cache; run: moequant zoo fetch {alias}")
    by_id = {t.type_id: t.name for t in TYPES.values()}
    out = {}
    for t in GGUFReader(str(path)).tensors:
        if t.name in ("output.weight", "token_embd.weight"):
            qtype = by_id[int(t.tensor_type)]
            k, n = (int(d) for d in t.shape)
            blocks = torch.from_numpy(t.data.copy()).reshape(n, -1)  # [N, row bytes]
            out[t.name] = GGUF_CLASSES[qtype]((n, k), {"blocks": blocks}, {"qtype": qtype})
    return out


def _time(fn, repeats: int) -> float:
    """Best of ``repeats`` calls, seconds (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(qt, rounds: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    w = qt.dequantize(torch.float32)  # [N, K]: the float head
    k = qt.shape[-1]
    g = torch.Generator().manual_seed(0)
    res: dict[str, Any] = {}
    for m, repeats in ((1, 5), (8, 3), (512, 1)):
        x = torch.randn(m, k, generator=g)
        fp, kern = [], []
        for _ in range(rounds):
            fp.append(_time(lambda x=x: F.linear(x, w), repeats))
            kern.append(_time(lambda x=x: qt.linear(x), repeats))
        ratios = [a / b for a, b in zip(fp, kern)]
        y, want = qt.linear(x), F.linear(x, w)
        err = float(((y - want).abs() / (x.abs() @ w.abs().T)).max())
        res[f"M={m}"] = {"fp32_ms": [1e3 * t for t in fp], "kernel_ms": [1e3 * t for t in kern], "ratios": ratios,
                         "ratio_median": statistics.median(ratios), "max_rel_err": err,
                         "top1_equal": int((y.argmax(-1) == want.argmax(-1)).sum()), "rows": m}
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    tables = _tables(args.model)
    results: dict[str, Any] = {}
    for name, qt in tables.items():
        entry = {"format": qt.format_id, "shape": list(qt.shape), "blocks_mib": qt.nbytes() / 2**20,
                 "fp32_mib": qt.numel * 4 / 2**20, "threads": {}}
        for n in args.threads:
            entry["threads"][str(n)] = measure(qt, args.rounds, n)
            for mk, r in entry["threads"][str(n)].items():
                print(f"{name} {qt.format_id} threads={n} {mk}: fp32 {statistics.median(r['fp32_ms']):.1f} ms, "
                      f"blocks {statistics.median(r['kernel_ms']):.1f} ms, x{r['ratio_median']:.2f} "
                      f"[{min(r['ratios']):.2f}, {max(r['ratios']):.2f}], max rel err {r['max_rel_err']:.1e}",
                      flush=True)
        results[name] = entry
    write_json(Path(args.json), {"settings": {"model": args.model, "rounds": args.rounds, "threads": args.threads},
                                 "tables": results}, "benchmarks/gguf_head.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
