"""Recipes: ordered rules ``pattern -> method config | keep``; the first rule that matches a
parameter name wins. Patterns match *parameter* names, so fused 3-D expert tensors are addressable
(``model.layers.3.mlp.experts.gate_up_proj``).

A pattern is an exact parameter name, ``re:<regex>`` (``re.fullmatch``), or ``kind:linear`` /
``kind:experts`` (every 2-D linear weight / every fused expert tensor) / ``kind:embedding`` /
``kind:head`` (the input embedding table / the output head). ``None`` as config means keep in full
precision. Weights no rule matches are kept.

The embeddings and the head are quantized only on request: a rule that assigns them a method must name
them (``kind:embedding``, ``kind:head`` or the exact parameter name); a ``re:`` rule with a method never
applies to them (it may keep them), so a catch-all regex written for the decoder layers does not reach them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from moequant.codecs.config import CONFIG_TYPES, MethodConfig, config_from_dict

# Protected by default, whatever the method: routing, norms, embeddings and the output head.
DEFAULT_KEEP: tuple[str, ...] = (
    r"re:.*\.(gate|router)\.weight",  # MoE routers (TopKRouter weight [E, H])
    r"re:.*shared_expert_gate\.weight",  # Qwen2-MoE's scalar sigmoid gate of the shared expert [1, H]
    r"re:.*norm.*",
    r"re:.*embed_tokens.*",
    r"re:(.*\.)?lm_head\.weight",
)

KINDS: tuple[str, ...] = ("linear", "experts", "embedding", "head")
# Target kinds a rule must name to quantize (opt-in): a ``re:`` rule with a method skips them.
OPT_IN_KINDS: tuple[str, ...] = ("embedding", "head")


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
            if not isinstance(r.pattern, str) or not r.pattern:
                raise ValueError(f"recipe rule {r.pattern!r}: 'match' must be a non-empty string")
            if r.pattern.startswith("re:"):
                try:
                    re.compile(r.pattern[3:])
                except re.error as e:
                    raise ValueError(f"recipe rule {r.pattern!r}: bad regex ({e})") from None
            elif r.pattern.startswith("kind:") and r.pattern[5:] not in KINDS:
                raise ValueError(f"recipe rule {r.pattern!r}: kind must be 'linear', 'experts', 'embedding' or 'head'")

    def match(self, name: str, kind: str) -> tuple[MethodConfig | None, str | None]:
        """(config or None, pattern of the rule that decided, or None when no rule matched)."""
        for r in self.rules:
            if r.matches(name, kind):
                if kind in OPT_IN_KINDS and r.config is not None and r.pattern.startswith("re:"):
                    continue  # embeddings and head are quantized only by a rule that names them
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
    def from_dict(cls, d: Any) -> "Recipe":
        """Inverse of ``to_dict``: ``{"rules": [{"match": PATTERN, "config": {...} | null}, ...]}``.
        Anything else (a list, a missing or unknown key, a rule that is not an object, a config its
        class rejects) is a ``ValueError`` that says which rule."""
        if not isinstance(d, dict):
            raise ValueError(f"a recipe is a JSON object {{\"rules\": [...]}}, not a {type(d).__name__}")
        if set(d) - {"rules"}:
            raise ValueError(f"unknown recipe keys {sorted(set(d) - {'rules'})} (a recipe has only 'rules')")
        if not isinstance(d.get("rules"), list) or not d["rules"]:
            raise ValueError("a recipe needs 'rules': a non-empty list of {\"match\": ..., \"config\": ...}")
        rules = []
        for i, r in enumerate(d["rules"]):
            if not isinstance(r, dict):
                raise ValueError(f"recipe rule {i} is a {type(r).__name__}, not an object with 'match' and 'config'")
            if "match" not in r:
                raise ValueError(f"recipe rule {i} has no 'match'")
            if set(r) - {"match", "config"}:
                raise ValueError(f"recipe rule {i} ({r['match']!r}): unknown keys {sorted(set(r) - {'match', 'config'})}")
            cfg = r.get("config")
            if cfg is not None and not isinstance(cfg, dict):
                raise ValueError(f"recipe rule {i} ({r['match']!r}): 'config' must be an object or null")
            try:
                _check_field_types(cfg)
                config = None if cfg is None else config_from_dict(cfg)
            except (TypeError, ValueError) as e:  # a field of the wrong type fails inside the config class
                raise ValueError(f"recipe rule {i} ({r['match']!r}): {e}") from None
            rules.append(Rule(r["match"], config))
        return cls(tuple(rules))


def _check_field_types(cfg: dict[str, Any] | None) -> None:
    """Each field of a method config in a recipe has the JSON type of its default (an int is accepted for
    a float, a bool is not an int), so ``"bits": "4"`` is named instead of failing inside the codec."""
    if cfg is None or cfg.get("type") not in CONFIG_TYPES:
        return  # config_from_dict names the unknown type
    if "version" in cfg and (not isinstance(cfg["version"], int) or isinstance(cfg["version"], bool)):
        raise TypeError(f"'version' must be an integer, got {cfg['version']!r}")
    for f in dataclasses.fields(CONFIG_TYPES[cfg["type"]]):
        if f.name not in cfg or f.default is dataclasses.MISSING or f.default is None:
            continue
        v, want = cfg[f.name], type(f.default)
        ok = isinstance(v, want) and (want is bool or not isinstance(v, bool))
        ok = ok or (want is float and isinstance(v, int) and not isinstance(v, bool))
        if not ok:
            raise TypeError(f"{cfg['type']}.{f.name} must be {want.__name__}, got {v!r}")
