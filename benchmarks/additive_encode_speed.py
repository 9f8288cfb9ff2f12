"""The additive encoder's C++ kernels (``kernels.additive_encode``: ``assign`` and the beam search) against the torch
code, and the whole encoder (``codecs.additive_search.quantize``) with each, on SmolLM2-135M's matrix shapes.

Synthetic but shaped like the real case: w ~ N(0, 0.02²) ``[N, K]``, a Hessian of 4,096 inputs with uneven column
scales, damped by 1% of its mean diagonal; 2x8 codebooks, groups of 8, beam 8 (the defaults). Per shape: one
``assign`` of every group to a 2^8 codebook under its position's Hessian block (what k-means, OA-EM's E-steps and
PV's V-steps call; seconds, share of codes equal), one beam search from a k-means start with each path (seconds,
output error, share of codes equal), then the whole encoder with each (``--init``, default oa-em; seconds, error)
and once with the beam kernel but the torch ``assign`` (``encode_beam_only_*``).
Same process, one after the other.

    python benchmarks/additive_encode_speed.py --json benchmarks/results/additive_encode_speed.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _cli_runs import write_json

SHAPES = ((576, 1536), (1536, 576), (576, 576))  # (N, K): down_proj, gate/up_proj, q/o_proj


def _problem(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02  # [N, K]
    x = torch.randn(4096, k, generator=g) * (0.2 + 2 * torch.rand(k, generator=g))  # [T, K]
    h = x.T @ x / 4096  # [K, K]
    return w, h + 0.01 * h.diagonal().mean() * torch.eye(k)


def _error(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, cb: torch.Tensor, scale: torch.Tensor) -> float:
    from moequant.codecs.additive import output_error, reconstruct

    return float(output_error(w[None], reconstruct(codes[None], cb, scale[None]), h[None]).sum())


def measure(n: int, k: int, init: str) -> dict[str, Any]:
    import moequant.formats.additive  # noqa: F401  (installs the kernel)
    from moequant.codecs.additive import assign
    from moequant.codecs.additive_search import beam_search, initialise, quantize
    from moequant.codecs.config import AdditiveConfig
    from moequant.kernels.select import kernels

    w, h = _problem(n, k, seed=n + k)
    codes, cb, scale = initialise(w[None], h[None], AdditiveConfig(init="kmeans"))
    row: dict[str, Any] = {"N": n, "K": k, "start_error": _error(w, h, codes[0], cb, scale[0])}
    g = cb.shape[-1]
    groups = (w / scale[0][:, None]).reshape(n, k // g, g).transpose(0, 1)[None]  # [1, G, N, g]
    blocks = torch.stack([h[j:j + g, j:j + g] for j in range(0, k, g)])[None]  # [1, G, g, g]
    picked = {}
    for mode in ("auto", "reference"):
        with kernels(mode):
            t0 = time.perf_counter()
            picked[mode] = assign(groups, blocks, cb[0])
            row[f"assign_{mode}_s"] = round(time.perf_counter() - t0, 3)
    row["assign_codes_equal"] = float((picked["auto"] == picked["reference"]).double().mean())
    found = {}
    for mode in ("auto", "reference"):
        with kernels(mode):
            t0 = time.perf_counter()
            found[mode] = beam_search(w, h, cb, codes[0], scale[0], 8)
            row[f"beam_{mode}_s"] = round(time.perf_counter() - t0, 3)
        row[f"beam_{mode}_error"] = _error(w, h, found[mode], cb, scale[0])
    row["beam_codes_equal"] = float((found["auto"] == found["reference"]).double().mean())
    cfg = AdditiveConfig(init=init)
    for mode in ("auto", "reference"):
        with kernels(mode):
            t0 = time.perf_counter()
            q_codes, q_cb, q_scale = quantize(w, h, cfg)
            row[f"encode_{mode}_s"] = round(time.perf_counter() - t0, 3)
        row[f"encode_{mode}_error"] = _error(w, h, q_codes, q_cb.float(), q_scale.float())
    from moequant.codecs import additive
    from moequant.kernels import additive_encode

    additive.set_assign_fast_path(None)  # the beam kernel alone: what the assign kernel adds
    try:
        t0 = time.perf_counter()
        q_codes, q_cb, q_scale = quantize(w, h, cfg)
        row["encode_beam_only_s"] = round(time.perf_counter() - t0, 3)
    finally:
        additive.set_assign_fast_path(additive_encode.fast_assign)
    row["encode_beam_only_error"] = _error(w, h, q_codes, q_cb.float(), q_scale.float())
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", default="oa-em", choices=["kmeans", "oa-em"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from moequant.kernels import additive_encode

    additive_encode.extension()  # built (or loaded) before the first timing
    rows = []
    for n, k in SHAPES:
        r = measure(n, k, args.init)
        rows.append(r)
        print(f"{n}x{k}: assign C++ {r['assign_auto_s']:.3f} s / torch {r['assign_reference_s']:.3f} s, codes equal "
              f"{r['assign_codes_equal']:.4f}; beam C++ {r['beam_auto_s']:.2f} s / torch {r['beam_reference_s']:.2f} s, error ratio "
              f"{r['beam_auto_error'] / r['beam_reference_error']:.5f}, codes equal {r['beam_codes_equal']:.4f}; "
              f"encoder C++ {r['encode_auto_s']:.2f} s / torch {r['encode_reference_s']:.2f} s, error ratio "
              f"{r['encode_auto_error'] / r['encode_reference_error']:.5f}; beam kernel alone {r['encode_beam_only_s']:.2f} s",
              flush=True)
    write_json(Path(args.json), {"settings": {"init": args.init, "threads": args.threads}, "rows": rows},
               "benchmarks/additive_encode_speed.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
