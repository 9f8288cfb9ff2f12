"""Issue #13: what int8 codebooks (``--codebook-bits 8``: one float16 step per codebook) cost in output error
against float16 ones, on real SmolLM2-135M layers with their calibration Hessians, and what they save in counted
bits per weight.

    python benchmarks/additive_codebook_bits.py --layers 0 15 29 --json benchmarks/results/additive_codebook_bits.json

Hessians as ``benchmarks/additive_init.py`` captures them (the unquantized model run layer by layer, PTB train,
``--calib-samples`` windows of 512 tokens, seed 0); each linear is encoded as ``solve_tensor`` hands a
whole-matrix codec its Hessian (``damp(H, 0.01)``, no rotation) with ``AdditiveConfig``'s defaults (2x8, groups of
8, beam 8, OA-EM) once per codebook width. Error = ``tr(ΔHΔᵀ) / tr(WHWᵀ)`` under the undamped Hessian.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from additive_init import captured, real_layer_parser

from moequant.calib.hessian import damp
from moequant.codecs.config import AdditiveConfig
from moequant.formats.additive import AdditiveTensor
from moequant.runinfo import run_info
from moequant.solvers.ldlq import proxy_loss

log = logging.getLogger("additive_codebook_bits")


def encode_widths(w: torch.Tensor, h: torch.Tensor, widths: tuple[int, ...]) -> dict[int, dict[str, float]]:
    """Per codebook width: the relative output error, the tensor's counted bits per weight and the seconds."""
    hd = damp(h, 0.01).to(torch.float32)
    out = {}
    for bits in widths:
        t0 = time.perf_counter()
        qt = AdditiveTensor.encode(w, AdditiveConfig(codebook_bits=bits), hd)
        secs = time.perf_counter() - t0
        out[bits] = {"error": proxy_loss(w, qt.dequantize(), h), "bits_per_weight": qt.bits_per_weight(),
                     "seconds": round(secs, 1)}
        log.info("  codebooks %2d-bit: error %.5f, %.4f b/w (%.0f s)", bits, out[bits]["error"],
                 out[bits]["bits_per_weight"], secs)
    return out


def main() -> int:
    args = real_layer_parser(__doc__).parse_args()
    hs, ws = captured(args)
    rows = []
    for name in hs:
        log.info("%s %s", name, tuple(ws[name].shape))
        res = encode_widths(ws[name], hs[name], (16, 8))
        rows.append({"tensor": name, "shape": list(ws[name].shape), "fp16": res[16], "int8": res[8],
                     "error_ratio": res[8]["error"] / res[16]["error"]})
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": AdditiveConfig().to_dict(), "calib_samples": args.calib_samples,
                                               "rows": rows, **run_info(["benchmarks/additive_codebook_bits.py",
                                                                         *sys.argv[1:]])}, indent=1))
    print("| tensor | shape | error, fp16 codebooks | error, int8 codebooks | int8 / fp16 | b/w fp16 | b/w int8 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tensor']} | {r['shape'][0]}×{r['shape'][1]} | {r['fp16']['error']:.5f} | {r['int8']['error']:.5f} | "
              f"{r['error_ratio']:.4f} | {r['fp16']['bits_per_weight']:.4f} | {r['int8']['bits_per_weight']:.4f} |")
    ratios = [r["error_ratio"] for r in rows]
    weights = [math.prod(r["shape"]) for r in rows]
    for key in ("fp16", "int8"):
        bpw = sum(r[key]["bits_per_weight"] * n for r, n in zip(rows, weights)) / sum(weights)
        print(f"{key} codebooks: {bpw:.4f} counted b/w over these tensors")
    print(f"int8 / fp16 error: geometric mean {math.exp(sum(map(math.log, ratios)) / len(ratios)):.4f}, "
          f"range {min(ratios):.4f}-{max(ratios):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
