"""What checkpoint verification costs: hash throughput of the candidates (one process, one buffer, as
ratios to SHA-256), and ``api.load`` of a real checkpoint with and without the per-tensor SHA-256 check,
alternated, medians of repeated loads.

    python benchmarks/verify_cost.py --checkpoint runs/smol-int4 --json benchmarks/results/verify_cost.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

from moequant.runinfo import run_info


def hash_speeds(mib: int, repeats: int) -> dict[str, float]:
    """MiB/s of each hash over a ``mib`` MiB buffer (best of ``repeats``)."""
    buf = bytes(range(256)) * (mib * 4096)
    algos = {name: (lambda n=name: hashlib.new(n)) for name in ("sha256", "sha1", "blake2b", "sha512", "md5",
                                                                  "blake2s", "sha3_256")}
    try:
        import xxhash

        algos["xxh3_128 (not cryptographic)"] = xxhash.xxh3_128
    except ImportError:
        pass
    out = {}
    for name, make in algos.items():
        best = float("inf")
        for _ in range(repeats):
            h = make()
            t0 = time.perf_counter()
            h.update(buf)
            h.digest()
            best = min(best, time.perf_counter() - t0)
        out[name] = round(mib / best, 1)
    return out


def load_times(path: Path, repeats: int) -> dict[str, list[float]]:
    from moequant import api

    api.load(path)  # warm the page cache
    times: dict[str, list[float]] = {"verify": [], "no_verify": []}
    for _ in range(repeats):
        for key, verify in (("verify", True), ("no_verify", False)):
            t0 = time.perf_counter()
            model = api.load(path, verify=verify)
            times[key].append(round(time.perf_counter() - t0, 4))
            del model
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    speeds = hash_speeds(64, 3)
    times = load_times(Path(args.checkpoint), args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    ckpt_bytes = sum(f.stat().st_size for f in Path(args.checkpoint).iterdir() if f.suffix == ".safetensors")
    result = {"hash_mib_per_s": speeds,
              "hash_time_vs_sha256": {k: round(speeds["sha256"] / v, 2) for k, v in speeds.items()},
              "checkpoint": args.checkpoint, "safetensors_bytes": ckpt_bytes, "load_seconds": times,
              "median_seconds": med, "verify_share_of_verified_load": round(1 - med["no_verify"] / med["verify"], 3),
              **run_info(["benchmarks/verify_cost.py", *sys.argv[1:]])}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("hash_mib_per_s", "median_seconds", "verify_share_of_verified_load")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
