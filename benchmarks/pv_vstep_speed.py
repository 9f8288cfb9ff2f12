"""Time PV-tuning's V-step (``finetune.pv.v_step``: coordinate descent, two sweeps over the two codebooks of
nearest-codeword searches, then the capped adoption) and the nearest-codeword search under it
(``codecs.additive.assign`` under the identity metric: the C++ ``additive_assign``), on the shapes PV trains.

Shapes: one SmolLM2-135M ``gate_proj`` [1536, 576] (one set of codebooks) and one smollm2-moe layer's experts
([8, 288, 576] gate_up, [8, 576, 144] down; codebooks per expert); 2x8 codebooks, groups of 8 (the defaults),
random codebooks and codes, and two targets: ``near`` (the decoded weight plus noise of 1% of its standard
deviation: what a V-step of PV-tuning sees, a straight-through target a few small steps away, where almost no
group's nearest codes change) and ``far`` (30%: most groups' codes change and the 1% cap binds). Median of
``--repeats`` runs, and the SHA-256 of the codes each returns, so that a run of another tree can be checked to
choose the same codes:

    PYTHONPATH=<copy of the tree before>/src python benchmarks/pv_vstep_speed.py --json before.json
    python benchmarks/pv_vstep_speed.py --json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

import torch

from _cli_runs import median_seconds, write_json

SHAPES = (("smollm2-135m gate_proj", (1, 1536, 576), False), ("smollm2-moe experts.gate_up_proj", (8, 288, 576), True),
          ("smollm2-moe experts.down_proj", (8, 576, 144), True))


def digest(codes: torch.Tensor) -> str:
    return hashlib.sha256(codes.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


NOISE = {"near": 0.01, "far": 0.3}  # the target's distance from the decoded weight, in its standard deviations


def measure(name: str, shape: tuple[int, int, int], per_expert: bool, target_kind: str, repeats: int
            ) -> dict[str, Any]:
    from moequant.codecs.additive import assign, decode_groups
    from moequant.finetune.pv import v_step

    e, n, k = shape
    m_count, c, g = 2, 256, 8
    gen = torch.Generator().manual_seed(0)
    books = torch.randn(*((e,) if per_expert else ()), m_count, c, g, generator=gen) * 0.5  # [(E,) M, C, g]
    codes = torch.randint(0, c, (e, n, k // g, m_count), generator=gen)  # [E, N, G, M]
    scale = torch.rand(e, n, generator=gen) + 0.5  # [E, N]
    w_hat = decode_groups(codes, books).reshape(e, n, k) * scale[..., None]  # [E, N, K]
    target = w_hat + NOISE[target_kind] * w_hat.std() * torch.randn(e, n, k, generator=gen)  # [E, N, K]
    points = target.reshape(1, 1, -1, g)  # [1, 1, P, g]: every group, one metric
    cb0 = books[0] if per_expert else books  # [M, C, g]
    t_assign, a = median_seconds(lambda: assign(points, torch.eye(g)[None, None], cb0[0]), repeats)
    t_v, (out, frac) = median_seconds(lambda: v_step(target, codes, books, scale, 0.01), repeats)
    return {"tensor": name, "shape": list(shape), "target": target_kind, "groups": points.shape[2], "assign_s": t_assign,
            "assign_codes_sha256": digest(a), "v_step_s": t_v, "v_step_codes_sha256": digest(out),
            "v_step_changed": frac}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from moequant.kernels import additive_encode as KA

    if KA.extension() is None:
        sys.exit("pv_vstep_speed: the additive-encode C++ extension is not available here (no compiler?)")
    rows = []
    for (name, shape, per_expert), kind in ((s, k) for s in SHAPES for k in NOISE):
        r = measure(name, shape, per_expert, kind, args.repeats)
        rows.append(r)
        print(f"{name:34s} {kind:4s} {str(tuple(shape)):16s} assign {r['assign_s'] * 1e3:7.1f} ms ({r['assign_codes_sha256']})"
              f"  v_step {r['v_step_s'] * 1e3:7.1f} ms ({r['v_step_codes_sha256']}, {r['v_step_changed']:.4f} changed)")
    write_json(Path(args.json), {"settings": {"repeats": args.repeats, "threads": args.threads}, "rows": rows},
               "benchmarks/pv_vstep_speed.py")


if __name__ == "__main__":
    main()
