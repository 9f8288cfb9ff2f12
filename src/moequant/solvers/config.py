"""``SolverConfig``: how rounding errors are handled (RTN or GPTQ/BlockLDLQ) and whether the weights are
made incoherent first (random Hadamard transform)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

SOLVERS = ("rtn", "ldlq")
INCOHERENCE = ("none", "rht")
RHT_TRANSFORMS = ("paley-outer", "paley", "hartley")  # codecs.hadamard.RULES: the H_n of --incoherence rht


@dataclass(frozen=True)
class SolverConfig:
    """solver: ``rtn`` (round each weight, no Hessian) or ``ldlq`` (GPTQ/BlockLDLQ error feedback; needs
    calibration Hessians). damp: ``λ`` in ``H + λ·mean(diag H)·I``. lazy: columns per lazy-update batch.
    act_order: process columns by decreasing ``diag(H)`` (scalar codecs only). incoherence: ``rht``
    applies a random Hadamard transform with random signs on both sides before quantizing; seed: the
    base seed of the sign vectors (each tensor derives its own from it and its name). rht_transform: the
    ``H_n`` of the transform (``codecs.hadamard``): ``paley-outer`` (default since version 2: the Paley block
    outside the power-of-two part, faster at run time), ``paley`` (version 1's: the same factors, block inside)
    or ``hartley`` (only the odd part outside: fastest, entries up to √2/√n)."""

    solver: str = "rtn"
    damp: float = 0.01
    lazy: int = 128
    act_order: bool = False
    incoherence: str = "none"
    seed: int = 0
    rht_transform: str = "paley-outer"

    VERSION: ClassVar[int] = 2  # v2: rht_transform (v1 runs used "paley")

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"--solver {self.solver!r} is not one of {SOLVERS}")
        if self.incoherence not in INCOHERENCE:
            raise ValueError(f"--incoherence {self.incoherence!r} is not one of {INCOHERENCE}")
        if self.rht_transform not in RHT_TRANSFORMS:
            raise ValueError(f"--rht-transform {self.rht_transform!r} is not one of {RHT_TRANSFORMS}")
        if not self.damp >= 0:
            raise ValueError(f"--damp must be >= 0, got {self.damp}")
        if self.lazy < 1:
            raise ValueError(f"lazy batch must be >= 1, got {self.lazy}")
        if self.act_order and self.solver != "ldlq":
            raise ValueError("--act-order needs --solver ldlq")

    @property
    def needs_hessian(self) -> bool:
        return self.solver == "ldlq"

    def to_dict(self) -> dict[str, Any]:
        return {"type": "SolverConfig", "version": self.VERSION, "solver": self.solver, "damp": self.damp,
                "lazy": self.lazy, "act_order": self.act_order, "incoherence": self.incoherence, "seed": self.seed,
                "rht_transform": self.rht_transform}

    @property
    def short_name(self) -> str:
        s = self.solver + ("+act" if self.act_order else "")
        return s + ("+rht" if self.incoherence == "rht" else "")
