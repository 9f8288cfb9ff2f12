"""Trellis encoding speed: the C++ Viterbi (``kernels.viterbi``) against the torch loop of ``codecs.trellis``,
on the same matrix in one process, and whether their states are identical.

    python benchmarks/viterbi_speed.py --threads 2 --json benchmarks/results/viterbi_speed.json

Per ``--L``: ``codecs.trellis.quantize_matrix`` (2-bit hyb, V=2, 16x16 tiles, tail-biting: the CLI's trellis
defaults but L) of an i.i.d. N(0, 1) matrix (seed 0; 256x512 at L <= 12, 128x256 above, as L=16 is ~20x
slower) once with the torch loop and twice with the kernel (the faster kernel run counts: the first may
include the extension's load). Weights per second = matrix size / seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _cli_runs import write_json


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--L", nargs="+", type=int, default=[12, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    import torch

    import moequant.formats.trellis  # noqa: F401  (installs the kernel, as quantize does)
    from moequant.codecs import trellis as T
    from moequant.codecs.config import TrellisConfig
    from moequant.kernels import viterbi as KV

    torch.set_num_threads(args.threads)
    rows = []
    for L in args.L:
        cfg = TrellisConfig(bits=2, L=L)
        shape = (256, 512) if L <= 12 else (128, 256)
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        lut = T.initial_lut(cfg)
        runs = {}
        for mode in ("kernel", "torch", "kernel again"):
            T.set_viterbi_fast_path(None if mode == "torch" else KV.fast_chunk)
            t0 = time.perf_counter()
            states, _, _ = T.quantize_matrix(w, cfg, lut)
            runs[mode] = (time.perf_counter() - t0, states)
        T.set_viterbi_fast_path(KV.fast_chunk)
        tk = min(runs["kernel"][0], runs["kernel again"][0])
        tt = runs["torch"][0]
        row = {"L": L, "shape": list(shape), "weights": w.numel(), "torch_seconds": tt, "kernel_seconds": tk,
               "torch_weights_per_s": w.numel() / tt, "kernel_weights_per_s": w.numel() / tk, "speedup": tt / tk,
               "states_identical": bool(torch.equal(runs["kernel"][1], runs["torch"][1]))}
        rows.append(row)
        print(json.dumps(row))
    write_json(Path(args.json), {"threads": args.threads, "rows": rows}, "benchmarks/viterbi_speed.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
