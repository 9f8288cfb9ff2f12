"""Recipes: ordered rules ``pattern -> method config | keep``; the first rule that matches a
parameter name wins. Patterns match *parameter* names, so fused 3-D expert tensors are addressable
(``model.layers.3.mlp.experts.gate_up_proj``).

A pattern is an exact parameter name, ``re:<regex>`` (``re.fullmatch``), or ``kind:linear`` /
``kind:experts`` (every 2-D linear weight / every fused expert tensor). ``None`` as config means keep
in full precision. Weights no rule matches are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from moequant.codecs.config import MethodConfig, config_from_dict

# Protected by default, whatever the method: routing, norms, embeddings and the output head.
DEFAULT_KEEP: tuple[str, ...] = (
    r"re:.*\.(gate|router)\.weight",  # MoE routers (TopKRouter weight [E, H])
    r"re:.*shared_expert_gate\.weight",
    r"re:.*norm.*",
    r"re:.*embed_tokens.*",
    r"re:(.*\.)?lm_head\.weight",
)


@dataclass(frozen=True)
class Rule:
    pattern: str
    config: MethodConfig | None

    def matches(self, name: str, kind: str) -> bool:
        p = self.pattern
        if p.startswith("re:"):
            return re.fullmatch(p[3:], name) is not None
        if p.startswith("kind:"):
            return p[5:] == kind
        return p == name

    def to_dict(self) -> dict[str, Any]:
        return {"match": self.pattern, "config": None if self.config is None else self.config.to_dict()}


@dataclass(frozen=True)
class Recipe:
    rules: tuple[Rule, ...]

    def __post_init__(self) -> None:
        for r in self.rules:
            if r.pattern.startswith("re:"):
                try:
                    re.compile(r.pattern[3:])
                except re.error as e:
                    raise ValueError(f"recipe rule {r.pattern!r}: bad regex ({e})") from None
            elif r.pattern.startswith("kind:") and r.pattern[5:] not in ("linear", "experts"):
                raise ValueError(f"recipe rule {r.pattern!r}: kind must be 'linear' or 'experts'")

    def match(self, name: str, kind: str) -> tuple[MethodConfig | None, str | None]:
        """(config or None, pattern of the rule that decided, or None when no rule matched)."""
        for r in self.rules:
            if r.matches(name, kind):
                return r.config, r.pattern
        return None, None

    @classmethod
    def uniform(cls, config: MethodConfig, keep: tuple[str, ...] = DEFAULT_KEEP,
                targets: tuple[str, ...] = ("kind:linear", "kind:experts")) -> "Recipe":
        """Keep the protected patterns, quantize every linear and expert tensor with ``config``."""
        return cls(tuple(Rule(p, None) for p in keep) + tuple(Rule(p, config) for p in targets))

    def to_dict(self) -> dict[str, Any]:
        return {"rules": [r.to_dict() for r in self.rules]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        rules = []
        for i, r in enumerate(d.get("rules", [])):
            if "match" not in r:
                raise ValueError(f"recipe rule {i} has no 'match'")
            cfg = r.get("config")
            rules.append(Rule(r["match"], None if cfg is None else config_from_dict(cfg)))
        return cls(tuple(rules))
