"""Zoo aliases made by carving a dense zoo model (``moequant zoo build ALIAS``): the MoE test bed.

- ``smollm2-moe``: SmolLM2-135M -> Qwen2-MoE, a shared expert of 1/4 of the MLP neurons plus 8 routed
  experts, top-2 (44% of the MLP active per token), then 225 steps (4 x 256 tokens) of KL distillation of
  routers, norms and experts on 900 of 1,024 fresh PTB-train windows, each seen once, cosine decay (inside the
  issue's 30 minutes on 2 cores: 250 steps took 32).
- ``smollm2-moe-starved``: 16 routed experts, top-1, no shared expert (Mixtral layout), no recovery: some
  experts receive fewer than 128 of the calibration tokens — the starved-expert case on real weights.
- ``qwen2.5-coder-0.5b-moe``: Qwen2.5-Coder-0.5B -> Qwen2-MoE, same split as ``smollm2-moe``, with a load-balancing
  term of weight 0.2 in the router fit (``--router-balance 0.2``: without it the first build's routing collapsed onto
  two experts in 9 of its 24 layers; ``benchmarks/carve_router_probe.py`` chose the weight); 100 steps (2 x 256
  tokens) of routers and norms on 512 fresh windows, cosine decay. Figures in BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from moequant.calib.data import CalibData
from moequant.zoo.carve.build import CarveSpec
from moequant.zoo.carve.fit import FitSettings
from moequant.zoo.carve.recover import RecoverSettings


@dataclass(frozen=True)
class CarvePreset:
    alias: str
    source: str
    spec: CarveSpec
    description: str


CARVE_PRESETS: dict[str, CarvePreset] = {p.alias: p for p in (
    CarvePreset("smollm2-moe", "smollm2-135m",
                CarveSpec(arch="qwen2_moe", experts=8, top_k=2, shared_fraction=0.25,
                          calib=CalibData(samples=64, seqlen=512),
                          recover=RecoverSettings(steps=225, batch=4, seqlen=256,
                                                  params=("routers", "norms", "experts"), samples=1024,
                                                  schedule="cosine", experts_lr=4e-5)),
                "SmolLM2-135M carved into Qwen2-MoE: shared expert + 8 routed experts, top-2 (44% of the MLP active)"),
    CarvePreset("smollm2-moe-starved", "smollm2-135m",
                CarveSpec(arch="mixtral", experts=16, top_k=1, shared_fraction=0.0,
                          calib=CalibData(samples=64, seqlen=512)),
                "SmolLM2-135M carved into Mixtral: 16 experts, top-1, no shared expert (starved experts)"),
    CarvePreset("qwen2.5-coder-0.5b-moe", "qwen2.5-coder-0.5b",
                CarveSpec(arch="qwen2_moe", experts=8, top_k=2, shared_fraction=0.25,
                          calib=CalibData(samples=32, seqlen=512), fit=FitSettings(balance=0.2),
                          recover=RecoverSettings(steps=100, batch=2, seqlen=256, samples=512, schedule="cosine")),
                "Qwen2.5-Coder-0.5B carved into Qwen2-MoE: shared expert + 8 routed experts, top-2"),
)}
