"""How soft is BCJR-QAT's soft pass on a real checkpoint? The soft codeword against the hard walk it softens.

For each trellis tensor of the chosen decoder layers of a packed run, opened as ``moequant finetune --method bcjr``
opens it (``TrellisBCJR``, in the RHT-rotated code domain), the latent ``x`` is the PTQ codes' values plus
``sigma·N(0, 1)`` (code units; ``sigma`` 0 is the start of training, where the latent sits on its codeword; larger
``sigma`` stands for a latent that Adam has moved off it). The reference walk is the best walk of the sub-trellis
for ``x`` (``hard_path``, BCJR's refresh), ``hard`` its decoded values, ``soft`` the soft codeword of ``x`` at
temperature ``tau`` over the same sub-trellis (``2^F`` states, ``--soft-bits``). Per (tensor, soft_bits, sigma,
tau) it writes ``rel_rms = ‖soft − hard‖ / ‖hard‖``: 0 is a one-hot posterior (BCJR computes what a hard walk
computes: KD-like training of scales and LUT with a latent that moves codes only at refreshes); a value near
``‖x − hard‖ / ‖hard‖`` (also written, ``rel_rms_latent``) is a posterior spread as wide as the quantization error.

    python benchmarks/bcjr_softness.py RUN --layers 0 --json runs/bcjr_softness.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _cli_runs import write_json


def _rms(t: torch.Tensor) -> float:
    return float(t.double().square().mean().sqrt())


def measure(t: Any, sigma: float, taus: list[float], seed: int) -> list[dict[str, Any]]:
    """Rows for one ``TrellisBCJR`` ``t`` (at its ``opts.soft_bits``)."""
    from moequant.finetune.bcjr import hard_path, soft_codeword

    g = torch.Generator().manual_seed(seed)
    tables = t._tables(train=False)
    x = t.latent.detach() + sigma * torch.randn(t.latent.shape, generator=g)  # [E, N, K], code units
    geom = t.geometry()
    ref = t.states.reshape(-1, t.steps)  # [E·B, S]: the PTQ walks
    walks = hard_path(t._tiles(x), tables, geom, ref, t._overlap(ref, geom), t._group(), t.opts.soft_bytes)
    hard = t._decode(walks.reshape(t.states.shape), tables)  # [E, N, K]
    rows = []
    for tau in taus:
        soft = t._untile(soft_codeword(t._tiles(x), tables, tau, geom, walks, t._overlap(walks, geom), t._group(),
                                       t.opts.soft_bytes))  # [E, N, K]
        rows.append({"soft_bits": t.opts.soft_bits, "F": geom.F, "sigma": sigma, "tau": tau,
                     "rel_rms": _rms(soft - hard) / _rms(hard), "rel_rms_latent": _rms(x - hard) / _rms(hard)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a packed moequant run with trellis tensors")
    ap.add_argument("--layers", type=int, nargs="+", default=[0], help="decoder layers (default: 0)")
    ap.add_argument("--soft-bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--sigma", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    ap.add_argument("--tau", type=float, nargs="+", default=[3.0, 1.0, 0.3, 0.1, 0.05])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    from moequant.errors import MoequantError
    from moequant.finetune.packed_trainables import Rotated
    from moequant.finetune.trainable import open_tensor
    from moequant.finetune.trellis_trainable import TrellisBCJR, TrellisTrainOptions
    from moequant.formats.checkpoint import ShardReader, read_packed

    cfg_path = args.run / "config.json"
    if not cfg_path.is_file():
        sys.exit(f"bcjr_softness: {cfg_path} not found (RUN must be a packed moequant run)")
    tensors = json.loads(cfg_path.read_text())["quantization_config"]["tensors"]
    layer = re.compile(r"\.layers\.(\d+)\.")
    names = [n for n in tensors if (m := layer.search(n)) and int(m.group(1)) in args.layers]
    reader = ShardReader(args.run)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for name in names:
        qt = read_packed(reader, name, tensors[name])
        for sb in args.soft_bits:
            try:
                opened = open_tensor("bcjr", name, qt, TrellisTrainOptions(soft_bits=sb))
            except MoequantError:  # not a trellis tensor
                break
            inner = opened.inner if isinstance(opened, Rotated) else opened
            assert isinstance(inner, TrellisBCJR)
            for sigma in args.sigma:
                for r in measure(inner, sigma, args.tau, args.seed):
                    rows.append({"tensor": name, **r})
                    print(f"{name} soft_bits {sb} sigma {sigma} tau {r['tau']}: rel_rms {r['rel_rms']:.5f} "
                          f"(latent {r['rel_rms_latent']:.5f})", flush=True)
    if not rows:
        sys.exit(f"bcjr_softness: no trellis tensor in layers {args.layers} of {args.run}")
    write_json(args.json, {"run": str(args.run), "layers": args.layers, "seed": args.seed,
                           "seconds": round(time.perf_counter() - t0, 1), "rows": rows}, "benchmarks/bcjr_softness.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
