"""Router-fit variants on single layers of a dense model, for the routing collapse of issue #11's
``qwen2.5-coder-0.5b-moe`` (two experts took >= 95% of the routed tokens in 9 of its 24 layers).

For each chosen layer the dense model's MLP inputs ``x`` and outputs ``y`` are captured on the calibration
windows (the dense layers before it, not carved ones: a probe, not a build); the neurons are split as the build
splits them (``carve.build.carve_neurons``, same seed), and each variant fits a fresh block with
``carve.fit.fit_block`` on the first windows and is measured on the held-out last quarter: relative MLP error,
the top-k experts' share of the routed slots (``carve.build.top_k_share``), the normalised balance entropy and the
Switch load-balancing loss.

    python benchmarks/carve_router_probe.py --model qwen2.5-coder-0.5b --layers 5 15 \\
        --variants oracle-ls oracle-ls:0.05 oracle-ls:0.2 oracle-ls:1.0 --json probe.json

A variant is ``INIT[:BALANCE]``: the router init (``oracle-ls``, or ``zero`` for uniform weights) and the
``--router-balance`` weight of ``zoo build moe``. (The first probe's JSONs also hold ``oracle-ls-centred``, an
init since removed: it fitted each expert's deviation from its mean score and collapsed layer 5 completely.)
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moequant.calib.data import CalibData, calibration_tokens
from moequant.models.loader import load_model
from moequant.runinfo import run_info
from moequant.zoo.carve.build import CarveSpec, carve_neurons, split_sizes, top_k_share
from moequant.zoo.carve.fit import FitSettings, balance_loss, fit_block, relative_error, routing_matrix
from moequant.zoo.carve.targets import TARGETS, moe_config, source_attention, write_block


def capture(dense: torch.nn.Module, tokens: torch.Tensor, layers: list[int], batch: int = 8
            ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (MLP inputs [T, H], dense MLP outputs [T, H])} over ``tokens [S, L]``; runs only up to the last layer."""
    got: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {i: ([], []) for i in layers}
    hooks = []
    for i in layers:
        def hook(_m, inp, out, i=i):
            got[i][0].append(inp[0].reshape(-1, inp[0].shape[-1]).detach().clone())
            got[i][1].append(out.reshape(-1, out.shape[-1]).detach().clone())
        hooks.append(dense.model.layers[i].mlp.register_forward_hook(hook))
    full = dense.model.layers
    dense.model.layers = full[: max(layers) + 1]
    try:
        with torch.no_grad():
            for s in range(0, tokens.shape[0], batch):
                dense.model(tokens[s:s + batch], use_cache=False)
    finally:
        dense.model.layers = full
        for h in hooks:
            h.remove()
    return {i: (torch.cat(xs), torch.cat(ys)) for i, (xs, ys) in got.items()}


def block_class(model_type: str) -> type:
    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return next(getattr(mod, n) for n in dir(mod) if n.endswith("SparseMoeBlock"))


def routing_figures(block: torch.nn.Module, x: torch.Tensor, experts: int, top_k: int) -> dict[str, Any]:
    with torch.no_grad():
        counts = (routing_matrix(block, x, experts) > 0).float().sum(0)
        share = (counts / counts.sum()).tolist()
        ent = -sum(p * math.log(p) for p in share if p > 0) / math.log(experts)
        return {"share": [round(p, 4) for p in share], "top_k_share": top_k_share(share, top_k),
                "balance_entropy": ent, "switch_loss": float(balance_loss(block.gate(x)[0], top_k))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--layers", type=int, nargs="+", default=[5, 15])
    ap.add_argument("--variants", nargs="+", default=["oracle-ls", "oracle-ls:0.05", "oracle-ls:0.2", "oracle-ls:1.0"])
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    spec = CarveSpec(arch="qwen2_moe", experts=8, top_k=2, shared_fraction=0.25,
                     calib=CalibData(samples=args.calib_samples, seqlen=512))
    dense, tok, _ = load_model(args.model)
    tokens = calibration_tokens(tok, spec.calib)  # [S, L]
    held = max(1, tokens.shape[0] // 4)
    fit_tokens = (tokens.shape[0] - held) * tokens.shape[1]
    t0 = time.perf_counter()
    caps = capture(dense, tokens, args.layers)
    print(f"captured layers {args.layers} on {tokens.shape[0]} windows in {time.perf_counter() - t0:.0f} s", flush=True)
    target = TARGETS[spec.arch]
    inter = dense.model.layers[0].mlp.gate_proj.weight.shape[0]
    n_shared, per = split_sizes(inter, spec.experts, spec.shared_fraction)
    cfg = moe_config(dense.config, target, experts=spec.experts, top_k=spec.top_k, expert_size=per,
                     shared_size=n_shared, src=source_attention(dense))
    cls = block_class(cfg.model_type)
    rows = []
    for i in args.layers:
        x, y = caps[i]
        xf, yf, xt, yt = x[:fit_tokens], y[:fit_tokens], x[fit_tokens:], y[fit_tokens:]
        dm = dense.model.layers[i].mlp
        carved, _ = carve_neurons(xf, dm.gate_proj.weight.detach(), dm.up_proj.weight.detach(),
                                   dm.down_proj.weight.detach(), dm.act_fn, n_shared, spec.experts,
                                   n_shared + spec.top_k * per, spec.marker_tokens, spec.seed + i)
        for v in args.variants:
            init, _, bal = v.partition(":")
            settings = FitSettings(router_init=init, balance=float(bal or 0.0))
            torch.manual_seed(spec.seed)
            block = cls(cfg).float().eval()
            with torch.no_grad():
                write_block(block, carved, target, spec.top_k)
            t1 = time.perf_counter()
            errors = fit_block(block, carved, target, dm.act_fn, xf, yf, settings)
            row = {"layer": i, "variant": v, "router_init": init, "balance": settings.balance,
                   "fit_errors": errors, "held_out_error": relative_error(block, xt, yt),
                   **routing_figures(block, xt, spec.experts, spec.top_k),
                   "seconds": round(time.perf_counter() - t1, 1)}
            rows.append(row)
            print(f"layer {i:2d} {v:24s} held-out error {row['held_out_error']:.4f}  top-{spec.top_k} share "
                  f"{row['top_k_share']:.3f}  balance entropy {row['balance_entropy']:.3f}  "
                  f"({row['seconds']:.0f} s)", flush=True)
    if args.json:
        out = {"model": args.model, "spec": spec.to_dict(), "fit_tokens": fit_tokens,
               "held_out_tokens": held * tokens.shape[1], "rows": rows, **run_info([*sys.argv])}
        args.json.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
