"""compressed-tensors parity on real checkpoints (issue #12): decompress an export with the INSTALLED
compressed-tensors' own dequantizer and compare every linear with moequant's dequantized weight, bit for bit.

    moequant quantize smollm2-135m --bits 4 --group-size 64 --solver rtn --out runs/ct/s4
    moequant export compressed-tensors runs/ct/s4 --out runs/ct/s4_ct17
    python benchmarks/export/ct_parity.py runs/ct/s4 runs/ct/s4_ct17 --json benchmarks/results/ct_parity.json

Run it once per compressed-tensors version (the version vLLM pins, 0.17.0, in a side environment: see
tests/export/test_compressed_tensors_export.py's slow test); rows are appended to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import compressed_tensors as ct
import torch
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
from safetensors.torch import load_file

from moequant import api
from moequant.models.adapters import adapter_for
from moequant.runinfo import run_info


def expected_linears(run: Path) -> dict[str, torch.Tensor]:
    """hub linear name -> moequant's fp16 dequantized weight (fused experts split per expert)."""
    model = api.load(run)
    g, u, d = adapter_for(model.config.model_type).disk_expert_names
    out: dict[str, torch.Tensor] = {}
    for name, qt in api.packed_modules(model).items():
        w = qt.dequantize(torch.float16)
        if w.dim() == 2:
            out[name[: -len(".weight")]] = w
            continue
        base = name.rpartition(".")[0]
        for e in range(w.shape[0]):
            if name.endswith("gate_up_proj"):
                h = w.shape[1] // 2
                out[f"{base}.{e}.{g}"], out[f"{base}.{e}.{u}"] = w[e, :h], w[e, h:]
            else:
                out[f"{base}.{e}.{d}"] = w[e]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("export")
    p.add_argument("--json", required=True)
    a = p.parse_args()
    run, out = Path(a.run), Path(a.export)
    t0 = time.time()
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(set(idx["weight_map"].values())):
        tensors.update(load_file(str(out / f)))
    got = CompressedTensorsDequantizer(str(out), dtype=torch.float16).process(dict(tensors))
    want = expected_linears(run)
    bad = [m for m, w in want.items() if not (got[f"{m}.weight"].dtype == torch.float16
                                              and torch.equal(got[f"{m}.weight"], w))]
    rep = json.loads((run / "report.json").read_text())
    row = {"run": str(run), "export": str(out), "compressed_tensors": ct.__version__, "linears": len(want),
           "bit_exact": len(want) - len(bad), "mismatched": bad[:20], "bits_per_weight": rep["bits_per_weight"],
           "seconds": round(time.time() - t0, 1)}
    print(f"compressed-tensors {ct.__version__}: {out.name}: {row['bit_exact']}/{len(want)} linears bit-exact")
    path = Path(a.json)
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows.append(row)
    path.write_text(json.dumps({"rows": rows, **run_info(["benchmarks/export/ct_parity.py", *sys.argv[1:]])}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
