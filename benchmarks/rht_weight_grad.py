"""Time the inverse rotation of an rht weight as fine-tuning runs it: ``Incoherence.weight_inverse`` forward and
backward, once per trained matrix per step (``finetune.packed_trainables.Rotated.weight``).

Two paths side by side, per shape: ``autograd`` — the torch transform (``hadamard_transform`` on both sides,
then the signs) differentiated by autograd, what fine-tuning ran before; ``kernel`` — ``weight_inverse`` now:
the C++ transform (``kernels.hadamard``) on both sides forward and the adjoint transform backward
(``codecs.hadamard._SignedTransform``). Shapes: every matrix of one SmolLM2-135M decoder layer (q, k, v, o,
gate, up, down) and one smollm2-moe layer's experts ([8, 288, 576] gate_up, [8, 576, 144] down); the per-step
figure of a whole model is the layer's sum times 30. Median of ``--repeats`` runs; the largest difference of
the two paths' weights and gradients relative to the weight's scale.

    python benchmarks/rht_weight_grad.py --json benchmarks/results/rht_weight_grad.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from _cli_runs import median_seconds, write_json

SHAPES = {"smollm2-135m": [("q_proj", (576, 576)), ("k_proj", (192, 576)), ("v_proj", (192, 576)),
                           ("o_proj", (576, 576)), ("gate_proj", (1536, 576)), ("up_proj", (1536, 576)),
                           ("down_proj", (576, 1536))],
          "smollm2-moe": [("experts.gate_up_proj", (8, 288, 576)), ("experts.down_proj", (8, 576, 144))]}


def autograd_inverse(inc, w: torch.Tensor) -> torch.Tensor:
    """``weight_inverse``'s torch path (as before the kernel took it), differentiated by autograd."""
    from moequant.codecs.hadamard import _left, _times_signs, hadamard_transform

    a = hadamard_transform(_left(w, True, inc.rule), True, inc.rule)  # H_N^T W~ H_K
    return _times_signs(_times_signs(a, inc.sign_in, -1, "w"), inc.sign_out, -2, "w")


def measure(name: str, shape: tuple[int, ...], repeats: int) -> dict[str, Any]:
    from moequant.codecs.hadamard import Incoherence

    inc = Incoherence.make(shape, seed=0)  # the default rule, shared signs (the CLI's rht)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(*shape, generator=g).requires_grad_(True)
    upstream = torch.randn(*shape, generator=g)
    out: dict[str, Any] = {"tensor": name, "shape": list(shape), "rule": inc.rule}
    grads = {}
    for path, fn in (("autograd", lambda: autograd_inverse(inc, w)), ("kernel", lambda: inc.weight_inverse(w))):
        out[f"{path}_forward_s"] = median_seconds(fn, repeats)[0]

        def both(fn=fn):
            w.grad = None
            fn().backward(upstream)
        out[f"{path}_forward_backward_s"] = median_seconds(both, repeats)[0]
        grads[path] = (fn().detach(), w.grad.clone())
    scale = float(w.detach().abs().max())
    out["max_weight_diff"] = float((grads["kernel"][0] - grads["autograd"][0]).abs().max()) / scale
    out["max_grad_diff"] = float((grads["kernel"][1] - grads["autograd"][1]).abs().max()) / scale
    out["speedup"] = out["autograd_forward_backward_s"] / out["kernel_forward_backward_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from moequant.kernels import hadamard as kh

    if kh.extension() is None:
        sys.exit("rht_weight_grad: the rht C++ extension is not available here (no compiler?): nothing to compare")
    rows = []
    for model, shapes in SHAPES.items():
        for name, shape in shapes:
            r = {"model": model, **measure(name, shape, args.repeats)}
            rows.append(r)
            print(f"{model:13s} {name:22s} {str(tuple(shape)):16s} autograd {r['autograd_forward_backward_s'] * 1e3:7.1f} ms"
                  f"  kernel {r['kernel_forward_backward_s'] * 1e3:6.1f} ms  x{r['speedup']:.1f}"
                  f"  |dW| {r['max_weight_diff']:.1e} |dG| {r['max_grad_diff']:.1e}")
    per_layer = {m: {p: sum(r[f"{p}_forward_backward_s"] for r in rows if r["model"] == m)
                     for p in ("autograd", "kernel")} for m in SHAPES}
    for m, t in per_layer.items():
        print(f"{m}: one layer's matrices forward + backward: autograd {t['autograd']:.3f} s, kernel "
              f"{t['kernel']:.3f} s (x{t['autograd'] / t['kernel']:.1f}); 30 layers: {30 * t['autograd']:.1f} s -> "
              f"{30 * t['kernel']:.1f} s per step")
    write_json(Path(args.json), {"settings": {"repeats": args.repeats, "threads": args.threads}, "rows": rows,
                                 "per_layer_s": per_layer}, "benchmarks/rht_weight_grad.py")


if __name__ == "__main__":
    main()
