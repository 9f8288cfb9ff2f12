"""Per-tensor output error of GGUF files against the unquantized model, on real Hessians: why two k-quant files
of the same types can rank one way layer by layer and the other way in perplexity.

For each linear of the chosen decoder layers, the relative output error ``tr(ΔHΔᵀ) / tr(WHWᵀ)`` of every given
GGUF file's weights (decoded with ``gguf.quants.dequantize``), under two Hessians captured on the unquantized
model (each layer fed the previous unquantized layers' outputs): **in-sample**, the calibration windows
``moequant quantize`` and ``llama-imatrix`` both used (PTB train, 128 x 512, seed 0), and **held-out**, windows of
PTB test (the split the perplexity is scored on). With ``--source`` the source GGUF's block type of each tensor is
listed too (a zoo model converted from a ``Q4_K_M`` file has most linears on a Q4_K grid already):

    python benchmarks/export/kquant_layer_error.py --model qwen2.5-coder-1.5b --layers 0 1 2 3 \\
        --files ours=runs/.../ours-q4_k.gguf llama.cpp=runs/.../llamacpp-q4_k-imat-llama-imatrix.gguf \\
        --source ~/.cache/moequant/models/qwen2.5-coder-1.5b/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf \\
        --json benchmarks/results/kquant_layer_error_q4k.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from moequant.calib.data import CalibData, calibration_tokens
from moequant.calib.float_pass import float_layer_stats
from moequant.export.gguf_names import arch_for, place, placements
from moequant.models.adapters import adapter_for, iter_targets
from moequant.models.loader import load_model
from moequant.runinfo import run_info
from moequant.solvers.ldlq import proxy_loss

log = logging.getLogger("kquant_layer_error")

def layer_hessians(model, tok, layers: list[int], spec: CalibData) -> dict[str, torch.Tensor]:
    """{linear name: undamped ``H [K, K]``} of ``layers`` over the windows of ``spec``."""
    tokens = calibration_tokens(tok, spec)  # [S, L]
    out = {}
    for i, stats in float_layer_stats(model, tokens, 8, upto=max(layers)):
        if i in layers:
            out.update({name: stat.mean() for name, stat in stats.items()})
            log.info("%s: layer %d captured", spec.split, i)
    return out


def tensors_of(path: Path):
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(path).tensors}


def decoded(t) -> torch.Tensor:
    from gguf.quants import dequantize

    return torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64))  # [N, K]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--layers", type=int, nargs="+", required=True)
    p.add_argument("--files", nargs="+", required=True, metavar="LABEL=GGUF")
    p.add_argument("--source", default=None, help="the GGUF the zoo model was converted from (its block types)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--heldout-samples", type=int, default=128)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    files = dict(f.split("=", 1) for f in args.files)
    model, tok, _ = load_model(args.model)
    model.eval()
    where = {t.name: t for t in iter_targets(model, adapter_for(model))}
    hs = {"in_sample": layer_hessians(model, tok, args.layers, CalibData("ptb", "train", args.calib_samples, 512, 0)),
          "held_out": layer_hessians(model, tok, args.layers, CalibData("ptb", "test", args.heldout_samples, 512, 0))}
    src = tensors_of(Path(args.source).expanduser()) if args.source else None
    readers = {label: tensors_of(Path(f)) for label, f in files.items()}
    # each linear's GGUF tensor as the export names and orders it (llama's Q/K rows interleaved)
    places = {pl.source: pl for pl in placements(arch_for(model.config.model_type), list(hs["in_sample"]),
                                                 model.config.to_dict(), None)}
    rows = []
    for name in hs["in_sample"]:
        t = where[name]
        w = place(places[name], getattr(model.get_submodule(t.module), t.param).detach().to(torch.float64))  # [N, K]
        g = places[name].gguf_name
        row = {"tensor": name, "gguf": g, "source_type": src[g].tensor_type.name if src else None}
        for label, tens in readers.items():
            wq = decoded(tens[g])
            row[label] = {"type": tens[g].tensor_type.name,
                          **{k: proxy_loss(w, wq, h[name].to(torch.float64)) for k, h in hs.items()}}
        rows.append(row)
        log.info("%s %s", name, {k: v for k, v in row.items() if k in files})
    Path(args.json).write_text(json.dumps({"rows": rows, "files": files, "source": args.source,
                                           **run_info([Path(__file__).name, *sys.argv[1:]])}, indent=1))
    labels = list(files)
    print(f"| tensor | source type | {' | '.join(f'{lb} in-sample | {lb} held-out' for lb in labels)} |")
    print("|---|---|" + "---|---|" * len(labels))
    for r in rows:
        cells = " | ".join(f"{r[lb]['in_sample']:.3e} | {r[lb]['held_out']:.3e}" for lb in labels)
        print(f"| {r['gguf']} | {r['source_type']} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
