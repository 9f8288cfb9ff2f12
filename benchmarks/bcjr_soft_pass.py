"""Time BCJR-QAT's soft pass (``finetune.bcjr.soft_codeword``, forward and backward) on one SmolLM2-sized matrix.

One 576 x 1536 matrix at 2-bit HYB, L = 16, V = 2, tail-biting: 3,456 tiles of 128 steps (and the sub-trellis
Viterbi, ``hard_path``, that refreshes BCJR's reference walk before each training step). The tiles sit near their
codewords as a PTQ weight does (``x = values[ref] + 0.3·N(0, 1)`` in code units, ``ref`` a random walk of the
stored code); the sub-trellis has ``2^F`` states (``--soft-bits``, the CLI's ``F``), at the temperatures given
(the default schedule anneals 0.3 -> 0.05). Per setting: seconds of the forward, of the backward (an upstream
gradient of N(0, 1)) and of ``hard_path``, and SHA-256 digests of y, ∂x, ∂LUT and the walks, so two trees can be
shown to compute the same floats. ``--kernels reference`` runs the torch loops instead of the C++ recursions
(``kernels.bcjr``); ``--kernels auto reference`` times both, one after the other, per setting.

    python benchmarks/bcjr_soft_pass.py --kernels auto reference --json benchmarks/results/bcjr_soft_pass.json
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _cli_runs import write_json


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def measure(soft_bits: int, tau: float, tiles: int, seed: int, mode: str) -> dict[str, Any]:
    from moequant.codecs.config import TrellisConfig
    from moequant.codecs.trellis import code_values, hyb_lut_init
    from moequant.finetune.bcjr import hard_path, soft_codeword, soft_geometry, soft_overlap
    from moequant.kernels.select import kernels

    cfg = TrellisConfig(bits=2, L=16, V=2, tile=16, code="hyb", tail_biting=True)
    g = torch.Generator().manual_seed(seed)
    lut = hyb_lut_init(cfg.Q).requires_grad_(True)  # [512, 2]
    table = code_values(cfg, lut)  # [2^16, 2]
    steps = cfg.tile * cfg.tile // cfg.V
    ref = torch.randint(0, 1 << cfg.L, (tiles, steps), generator=g)  # [B, S]
    x = (table.detach()[ref] + 0.3 * torch.randn(tiles, steps, cfg.V, generator=g)).requires_grad_(True)  # [B, S, V]
    geom = soft_geometry(cfg.L, cfg.bits * cfg.V, soft_bits)
    overlap = soft_overlap(ref, geom)
    upstream = torch.randn(tiles, steps, cfg.V, generator=g)
    with kernels(mode):
        t0 = time.perf_counter()
        y = soft_codeword(x, table, tau, geom, ref, overlap)
        t1 = time.perf_counter()
        (y * upstream).sum().backward()
        t2 = time.perf_counter()
        walks = hard_path(x.detach(), table.detach(), geom, ref, overlap)  # [B, S]: the reference refresh
        t3 = time.perf_counter()
    return {"kernels": mode, "soft_bits": soft_bits, "F": geom.F, "tau": tau, "tiles": tiles,
            "forward_s": round(t1 - t0, 3), "backward_s": round(t2 - t1, 3), "hard_path_s": round(t3 - t2, 3),
            "y_sha": _digest(y), "grad_x_sha": _digest(x.grad), "grad_lut_sha": _digest(lut.grad),
            "walks_sha": _digest(walks)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--soft-bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--tau", type=float, nargs="+", default=[0.3, 0.05])
    ap.add_argument("--tiles", type=int, default=3456, help="576 x 1536 / 256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernels", nargs="+", default=["auto"], choices=["auto", "reference"])
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from moequant.kernels import bcjr as bcjr_kernels

    bcjr_kernels.extension()  # built (or loaded) before the first timing
    rows = []
    for bits in args.soft_bits:
        for tau in args.tau:
            for mode in args.kernels:
                r = measure(bits, tau, args.tiles, seed=0, mode=mode)
                rows.append(r)
                print(f"{mode:9s} F={r['F']} tau={tau}: forward {r['forward_s']:.2f} s, "
                      f"backward {r['backward_s']:.2f} s, hard_path {r['hard_path_s']:.2f} s, "
                      f"y {r['y_sha']} dx {r['grad_x_sha']} dlut {r['grad_lut_sha']} walks {r['walks_sha']}",
                      flush=True)
    write_json(Path(args.json), {"settings": {"soft_bits": args.soft_bits, "tau": args.tau, "tiles": args.tiles,
                                              "threads": args.threads, "kernels": args.kernels}, "rows": rows},
               "benchmarks/bcjr_soft_pass.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
