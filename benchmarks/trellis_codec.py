"""Issue #4: the trellis codec on i.i.d. N(0,1) data — MSE per weight (HYB / 1MAD / 3INST, K = 2/3/4,
tail-biting vs free start, the tile length's effect on the tail-biting cost) and encode throughput
(weights per second at L = 12 / 14 / 16, K = 2), plus the exactness of decode from packed words.

    python benchmarks/trellis_codec.py --json benchmarks/results/trellis_codec.json

Every MSE row encodes the same seeded sample (``--weights`` values, default 2^16 = 256 tiles of 16x16)
scaled to the code's RMS (as the quantizer's row scales do; MSE is reported in the data's units), with
the initial LUT: the codec alone. Free start stores L - K·V bits more per
tile than tail-biting, so it is not a same-rate comparison; the ``tile`` rows show the gap shrinking as
the tile (and so the bits those extra bits are spread over) grows. Throughput is measured on one
process with whatever threads torch gets (``torch.get_num_threads()`` is recorded): run it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from moequant.codecs.config import TrellisConfig
from moequant.codecs.trellis import code_rms, code_values, encode_tiles, initial_lut, mse_per_weight
from moequant.formats.trellis_bits import decode_tiles, pack_tile_bits
from moequant.runinfo import run_info

log = logging.getLogger("trellis_codec")


def _sample(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g)  # [n]


def measure(cfg: TrellisConfig, x: torch.Tensor) -> dict:
    """Encode ``x`` (flattened into tiles of ``cfg.tile²``) -> MSE, seconds, weights/s, exact decode."""
    t = cfg.tile * cfg.tile
    tiles = x[: (x.numel() // t) * t].reshape(-1, t)  # [B, T]
    lut = initial_lut(cfg)
    values = code_values(cfg, lut)  # [2^L, V]
    # as the quantizer does with its row scales: bring the data to the code's RMS, then measure the
    # error back in the data's units
    s = code_rms(values)
    t0 = time.perf_counter()
    states = encode_tiles(tiles * s, cfg, lut)
    words = pack_tile_bits(states, cfg)
    secs = time.perf_counter() - t0
    rec = values[states].reshape(tiles.shape)  # the encoder's reconstruction [B, T], at the code's scale
    dec = decode_tiles(words, cfg, lut)  # [B, T] from the packed words alone
    return {"config": cfg.to_dict(), "name": cfg.short_name, "tile_weights": t, "tiles": tiles.shape[0],
            "code_rms": s, "weights": tiles.numel(), "mse": mse_per_weight(tiles, rec / s), "seconds": secs,
            "weights_per_s": tiles.numel() / secs, "decode_exact": bool(torch.equal(rec, dec)),
            "stored_bits_per_tile": int(words.shape[-1]) * 16}


def plan(quick: bool) -> list[tuple[str, TrellisConfig]]:
    rows: list[tuple[str, TrellisConfig]] = []
    for k in (2, 3, 4):
        for tb in (True, False):
            rows.append(("mse", TrellisConfig(bits=k, L=16, V=2, code="hyb", tail_biting=tb)))
    for code in ("1mad", "3inst"):
        for tb in (True, False):
            rows.append(("mse", TrellisConfig(bits=2, L=16, V=1, code=code, tail_biting=tb)))
    for tile in (32, 64):  # T = 1024, 4096 weights per tile
        for tb in (True, False):
            rows.append(("tile", TrellisConfig(bits=2, L=16, V=2, code="hyb", tile=tile, tail_biting=tb)))
    for L in (12, 14, 16):
        rows.append(("speed", TrellisConfig(bits=2, L=L, V=2, code="hyb")))
    if quick:
        rows = [(k, dataclasses.replace(c, L=min(c.L, 10))) for k, c in rows[:4]]
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=int, default=1 << 16, help="N(0,1) values per MSE row (default 65536)")
    p.add_argument("--speed-weights", type=int, default=1 << 15, help="values per throughput row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="4 rows at L<=10 (a smoke run)")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for kind, cfg in plan(args.quick):
        x = _sample(args.speed_weights if kind == "speed" else args.weights, args.seed)
        r = {"kind": kind, **measure(cfg, x)}
        log.info("%-5s %-22s tile %2d tail-biting %-5s mse %.5f  %8.0f w/s  exact %s", kind, cfg.short_name,
                 cfg.tile, cfg.tail_biting, r["mse"], r["weights_per_s"], r["decode_exact"])
        rows.append(r)
    # tail-biting cost: TB mse / free-start mse for each (code, K, tile) pair
    cost = []
    for r in rows:
        c = r["config"]
        if not c["tail_biting"] or r["kind"] == "speed":
            continue
        for f in rows:
            fc = f["config"]
            if f["kind"] != "speed" and not fc["tail_biting"] and {**fc, "tail_biting": True} == c:
                cost.append({"name": r["name"], "tile_weights": r["tile_weights"],
                             "tb_over_free": r["mse"] / f["mse"],
                             # the information free start has on top (its words also carry padding)
                             "extra_free_bits_per_weight": (c["L"] - c["bits"] * c["V"]) / r["tile_weights"]})
    out = {"rows": rows, "tail_biting_cost": cost, "seed": args.seed, "threads": torch.get_num_threads(),
           "load_average_1_5_15": list(os.getloadavg()),
           **run_info(["benchmarks/trellis_codec.py", *sys.argv[1:]])}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    for c in cost:
        log.info("tail-biting cost %-22s T=%4d  x%.4f  (free start stores %.4f more bits/weight)", c["name"],
                 c["tile_weights"], c["tb_over_free"], c["extra_free_bits_per_weight"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
