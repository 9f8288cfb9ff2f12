"""What ``moequant quantize MODEL --bits B`` does when no other flag is given: the best-known recipe at
each width, and the warnings given *before* a run whose settings are known to collapse models.

The rules are data measured on the zoo (BENCHMARKS.md, "Defaults"): on SmolLM2-135M (whole PTB test, PPL
ratio to the unquantized model) int4 asymmetric g128 round-to-nearest loses ×1.51 (symmetric ×1.69),
int3 RTN collapses (×3.3 on 16k tokens) while LDLQ + RHT keeps int3 near ×1.2; int2 even with LDLQ + RHT
loses ×2.9 and the 2-bit trellis ×2.2.

- solver ``auto``: LDLQ error feedback with calibration Hessians for int at 4 bits and fewer and for
  the trellis; round to nearest at 5+ bits and for the NF4/FP4 LUTs (no column quantizer benefit
  measured there yet);
- GGUF block types (``--method q4_k`` ...): LDLQ with calibration Hessians straight onto the block grid (round
  to nearest for ``q8_0``), and never the Hadamard transform: a GGUF file cannot store a rotated tensor, and
  being exportable to llama.cpp is why one picks these types;
- additive codebooks (``--method additive``): calibration Hessians, which the encoder's beam search and
  codebook updates use whole (no LDLQ column feedback: ``solvers.solve``), and no Hadamard transform;
- incoherence ``auto``: the random Hadamard transform whenever the solver is LDLQ (except for GGUF types
  and additive codebooks);
- the int grid is asymmetric (an integer zero point per group) unless ``--sym`` is given.
"""

from __future__ import annotations

from collections.abc import Iterable

from moequant.codecs.config import AdditiveConfig, GgufConfig, MethodConfig, TrellisConfig, UniformConfig

AUTO = "auto"


def auto_solver(config: MethodConfig) -> str:
    """``rtn`` or ``ldlq`` for ``--solver auto`` (``ldlq`` for additive codebooks: calibrate, and hand the
    encoder the Hessian)."""
    if isinstance(config, (TrellisConfig, AdditiveConfig)):
        return "ldlq"
    if isinstance(config, GgufConfig):
        return "rtn" if config.qtype == "q8_0" else "ldlq"
    if isinstance(config, UniformConfig) and config.bits <= 4:
        return "ldlq"
    return "rtn"


def auto_incoherence(solver: str, configs: Iterable[MethodConfig] = ()) -> str:
    """``rht`` or ``none`` for ``--incoherence auto``: the transform is worth its cost only with LDLQ, and
    never where a GGUF block type is among the recipe's ``configs`` (GGUF cannot store the rotation) or
    additive codebooks (not measured to help; shared codebooks cannot follow per-expert rotations)."""
    if any(isinstance(c, (GgufConfig, AdditiveConfig)) for c in configs):
        return "none"
    return "rht" if solver == "ldlq" else "none"


def collapse_warning(config: MethodConfig, solver: str) -> str | None:
    """One line saying why a run will likely lose most of the model's quality and what to use instead,
    or None when the settings are the best known at their width."""
    if isinstance(config, UniformConfig):
        if config.bits <= 2:
            return ("int2 loses most of a model's quality even with LDLQ + RHT (SmolLM2-135M: PPL x2.9); "
                    "--method trellis --bits 2 keeps more (x2.2) at fewer bits/weight")
        if config.bits == 3 and solver == "rtn":
            return ("int3 with round-to-nearest collapses small models (SmolLM2-135M: PPL x3.3); "
                    "drop --solver rtn to get LDLQ + RHT with calibration (x1.2)")
        if config.bits == 4 and solver == "rtn":
            return ("int4 with round-to-nearest loses more than it must (SmolLM2-135M: PPL x1.5 at group 128); "
                    "drop --solver rtn to get LDLQ + RHT with calibration")
    if isinstance(config, TrellisConfig) and solver == "rtn":
        return "the trellis without LDLQ error feedback loses much more than with it; drop --solver rtn"
    if isinstance(config, AdditiveConfig) and solver == "rtn":
        return ("additive codebooks without a calibration Hessian fit the weights, not the layer's output; "
                "drop --solver rtn")
    return None


def describe(config: MethodConfig, solver: str, incoherence: str, calib: str | None) -> str:
    """A one-line human description of a recipe, e.g. ``int3a-g128-clip, LDLQ + RHT, calibrated on ptb``."""
    parts = [config.short_name, "round-to-nearest" if solver == "rtn" else "LDLQ"]
    if isinstance(config, AdditiveConfig):
        parts[-1] = "beam search (weights' squared error)" if solver == "rtn" else "beam search under the Hessian"
    if incoherence == "rht":
        parts[-1] += " + RHT"
    if calib:
        parts.append(f"calibrated on {calib}")
    return ", ".join(parts)


# ``--embeddings`` / ``--head``: what each choice quantizes with (always round to nearest, as llama.cpp
# does for its output tensors: no Hessian reaches the table). int8 is llama.cpp's Q8_0 at a group of 64:
# symmetric absmax, 8.25 bits/weight; int6 (Q6_K's width) symmetric with clip search, 6.25; int4 asymmetric
# at a group of 32 with clip search, 4.625 (embeddings and head are more sensitive than the decoder layers,
# hence the smaller group).
EMBED_HEAD_CHOICES: dict[str, UniformConfig | None] = {
    "keep": None,
    "int8": UniformConfig(bits=8, group_size=64, symmetric=True, clip_search=False),
    "int6": UniformConfig(bits=6, group_size=64, symmetric=True, clip_search=True),
    "int4": UniformConfig(bits=4, group_size=32, symmetric=False, clip_search=True),
}
# The recipe patterns ``--embeddings`` / ``--head`` write (first, so they win over the default keep rules).
EMBED_PATTERN, HEAD_PATTERN = "kind:embedding", "kind:head"


def embed_head_rules(embeddings: str | None, head: str | None) -> tuple[tuple[str, UniformConfig | None], ...]:
    """``(pattern, config)`` rules for ``--embeddings`` / ``--head`` (None: no rule; ``keep``: a rule with no
    method, which keeps the table in float32 as loaded, even where its values would pack exactly:
    ``embed_head.with_exact_grids``)."""
    rules = []
    for pattern, choice in ((EMBED_PATTERN, embeddings), (HEAD_PATTERN, head)):
        if choice is None:
            continue
        if choice not in EMBED_HEAD_CHOICES:
            raise ValueError(f"{choice!r} is not one of {', '.join(EMBED_HEAD_CHOICES)}")
        rules.append((pattern, EMBED_HEAD_CHOICES[choice]))
    return tuple(rules)
