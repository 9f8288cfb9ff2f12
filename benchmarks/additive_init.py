"""Issue #13, first "done when": on real SmolLM2-135M layers with their calibration Hessians, the output error of
additive codebooks initialised by residual k-means vs by OA-EM, before and after the beam search.

    python benchmarks/additive_init.py --layers 0 15 29 --json benchmarks/results/additive_init_smollm2-135m.json

Calibration as ``moequant quantize`` takes it (PTB train, ``--calib-samples`` windows of 512 tokens, seed 0): the
unquantized model runs layer by layer and every linear's input Hessian ``E[xxᵀ]`` is captured by moequant's own
``LayerCapture``. Each linear is then encoded the way ``solve_tensor`` hands a whole-matrix codec its Hessian
(``damp(H, 0.01)``, no rotation), once per initialisation, with ``AdditiveConfig``'s defaults (2x8, groups of 8,
beam 8) otherwise. Errors are ``tr(ΔHΔᵀ) / tr(WHWᵀ)`` under the undamped Hessian, the report's proxy loss.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from moequant.calib.data import CalibData, calibration_tokens
from moequant.calib.float_pass import float_layer_stats
from moequant.calib.hessian import damp
from moequant.codecs.additive import reconstruct
from moequant.codecs.additive_search import initialise, search
from moequant.codecs.config import AdditiveConfig
from moequant.models.adapters import adapter_for, iter_targets
from moequant.models.loader import load_model
from moequant.runinfo import run_info
from moequant.solvers.ldlq import proxy_loss

log = logging.getLogger("additive_init")


def hessians(model_name: str, layers: list[int], samples: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``({linear name: undamped H [K, K] float64}, {linear name: W [N, K]})`` of the chosen decoder layers,
    captured on the unquantized model (each layer fed the previous unquantized layer's outputs)."""
    model, tok, _ = load_model(model_name)
    model.eval()
    adapter = adapter_for(model)
    where = {t.name: t for t in iter_targets(model, adapter)}
    tokens = calibration_tokens(tok, CalibData(data="ptb", samples=samples, seqlen=512, seed=0))  # [S, 512]
    hs, ws = {}, {}
    for i, stats in float_layer_stats(model, tokens, 8, upto=max(layers)):
        if i not in layers:
            continue
        for name, stat in stats.items():
            hs[name] = stat.mean()
            t = where[name]
            ws[name] = getattr(model.get_submodule(t.module), t.param).detach().float().clone()
        log.info("layer %d: captured %d Hessians", i, len(stats))
    return hs, ws


def encode_both(w: torch.Tensor, h: torch.Tensor, cfg: AdditiveConfig) -> dict[str, dict[str, float]]:
    """Per initialisation: the relative output error after init and after the search, and their seconds."""
    hd = damp(h, 0.01).to(torch.float32)[None]  # [1, K, K]: what the encoder gets
    w3 = w[None]  # [1, N, K]
    out = {}
    for init in ("kmeans", "oa-em"):
        c = AdditiveConfig(**{**cfg.__dict__, "init": init})
        t0 = time.perf_counter()
        codes, books, scale = initialise(w3, hd, c)
        t_init = time.perf_counter() - t0
        before = proxy_loss(w, reconstruct(codes, books, scale)[0], h)
        t0 = time.perf_counter()
        codes, books, scale = search(w3, hd, codes, books, scale, c)
        t_search = time.perf_counter() - t0
        after = proxy_loss(w, reconstruct(codes, books, scale)[0], h)
        out[init] = {"before_search": before, "after_search": after, "seconds_init": round(t_init, 1),
                     "seconds_search": round(t_search, 1)}
        log.info("  %-6s init %.5f -> search %.5f (%.0f + %.0f s)", init, before, after, t_init, t_search)
    return out


def real_layer_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a benchmark on real layers' Hessians: model, layers, calibration windows, JSON path."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--json", required=True)
    return p


def captured(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Logging on, the seed set, and ``hessians`` of ``args``' model and layers."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    return hessians(args.model, args.layers, args.calib_samples)


def main() -> int:
    p = real_layer_parser(__doc__)
    p.add_argument("--tensors", nargs="*", default=[], help="only linears whose name ends with one of these")
    args = p.parse_args()
    hs, ws = captured(args)
    cfg = AdditiveConfig()
    rows = []
    for name in hs:
        if args.tensors and not any(name.endswith(s) or name.endswith(s + ".weight") for s in args.tensors):
            continue
        log.info("%s %s", name, tuple(ws[name].shape))
        res = encode_both(ws[name], hs[name], cfg)
        rows.append({"tensor": name, "shape": list(ws[name].shape), **res,
                     "oaem_over_kmeans_before": res["oa-em"]["before_search"] / res["kmeans"]["before_search"],
                     "oaem_over_kmeans_after": res["oa-em"]["after_search"] / res["kmeans"]["after_search"]})
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": cfg.to_dict(), "calib_samples": args.calib_samples,
                                               "rows": rows, **run_info(["benchmarks/additive_init.py", *sys.argv[1:]])},
                                              indent=1))
    print("| tensor | shape | k-means init | OA-EM init | OA-EM / k-means | k-means + search | OA-EM + search | "
          "OA-EM / k-means |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        k, o = r["kmeans"], r["oa-em"]
        print(f"| {r['tensor']} | {r['shape'][0]}×{r['shape'][1]} | {k['before_search']:.5f} | {o['before_search']:.5f} | "
              f"{r['oaem_over_kmeans_before']:.3f} | {k['after_search']:.5f} | {o['after_search']:.5f} | "
              f"{r['oaem_over_kmeans_after']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
