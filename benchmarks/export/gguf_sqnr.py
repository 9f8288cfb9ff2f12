"""SQNR of moequant's GGUF block-type search against llama.cpp's own quantizer (ggml-quants.c, compiled by
gguf_sqnr_build.sh) on the same Gaussian weights, with and without an importance vector (lognormal; llama.cpp
gets it as its imatrix). Both decoded by gguf-py. Issue #12.

    bash benchmarks/export/gguf_sqnr_build.sh
    python benchmarks/export/gguf_sqnr.py --rows 128 --json benchmarks/results/gguf_sqnr.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from moequant.codecs import kquant as kq
from moequant.codecs.kquant_pack import pack_blocks
from moequant.runinfo import run_info

ROOT = Path(__file__).resolve().parents[2]
TYPES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "q5_0", "q5_1", "q8_0", "iq4_nl"]


def ggml_quant(lib, name: str, w: np.ndarray, imp: np.ndarray | None = None) -> np.ndarray:
    fn = getattr(lib, "quantize_" + (name if not name.endswith("_k") else name[:-2] + "_K"))
    fn.restype = ctypes.c_size_t
    n, k = w.shape
    t = kq.TYPES[name]
    out = np.zeros((n, k // t.block * t.block_bytes), np.uint8)
    src = np.ascontiguousarray(w, np.float32)
    qw = None if imp is None else np.ascontiguousarray(imp, np.float32).ctypes.data_as(ctypes.c_void_p)
    fn(src.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(n), ctypes.c_int64(k), qw)
    return out


def sqnr(w: np.ndarray, wh: np.ndarray, h: np.ndarray | None = None) -> float:
    h = np.ones(w.shape[-1]) if h is None else h
    return float(10 * np.log10((h * w * w).sum() / (h * (w - wh) ** 2).sum()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16, help="our search's candidate scales (the CLI default is 8)")
    p.add_argument("--lib", default=str(ROOT / "runs/peers/kq/libq.so"))
    p.add_argument("--json", required=True)
    a = p.parse_args()
    lib = ctypes.CDLL(a.lib)
    torch.manual_seed(0)
    w = torch.randn(a.rows, a.cols)  # [N, K]
    h = torch.exp(torch.randn(a.cols))  # [K] lognormal importance
    W, H = w.numpy(), h.numpy()
    rows = []
    for name in TYPES:
        t = kq.TYPES[name]
        t0 = time.time()
        codes, prm = kq.quantize(t, w, steps=a.steps)
        secs = time.time() - t0
        ours = gguf.quants.dequantize(pack_blocks(t, codes, prm).numpy(), T[name.upper()])
        assert np.array_equal(ours, kq.dequantize(t, codes, prm).numpy())  # our decode is gguf-py's
        ref = gguf.quants.dequantize(ggml_quant(lib, name, W), T[name.upper()])
        codes2, prm2 = kq.quantize(t, w, importance=h, steps=a.steps)
        ours_i = kq.dequantize(t, codes2, prm2).numpy()
        ref_i = gguf.quants.dequantize(ggml_quant(lib, name, W, H), T[name.upper()])
        r = {"type": name, "ours_db": sqnr(W, ours), "llamacpp_db": sqnr(W, ref),
             "ours_weighted_db": sqnr(W, ours_i, H), "llamacpp_imatrix_weighted_db": sqnr(W, ref_i, H),
             "ours_seconds": round(secs, 3)}
        rows.append(r)
        print(f"| {name} | {r['ours_db']:.2f} | {r['llamacpp_db']:.2f} | {r['ours_weighted_db']:.2f} | "
              f"{r['llamacpp_imatrix_weighted_db']:.2f} |")
    Path(a.json).write_text(json.dumps({"rows": rows, "shape": [a.rows, a.cols], "steps": a.steps,
                                        **run_info(["benchmarks/export/gguf_sqnr.py", *sys.argv[1:]])}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
