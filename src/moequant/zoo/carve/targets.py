"""The four MoE architectures a dense model can be carved into, as transformers v5 builds them.

For each target: the config derived from the dense one, which dense attention layouts it can hold
exactly, and how the carved MLP is written into its ``SparseMoeBlock`` (``gate.weight [E, H]``,
``experts.gate_up_proj [E, 2I_e, H]`` gate rows first, ``experts.down_proj [E, H, I_e]``, and for
Qwen2-MoE ``shared_expert`` + ``shared_expert_gate``).

Attention. Llama/Mistral (no biases, or all four with ``attention_bias``), Qwen2 (q/k/v biases) and Qwen3
(per-head q/k RMSNorm) attention is copied weight for weight where the target has the same structure.
OLMoE normalises q and k over all heads and Qwen3-MoE per head; a source without those norms cannot be
held exactly, so their weights are set to the calibration RMS of q and k (``q_norm(q) ≈ q`` when a
token's RMS is near the mean) and the build warns: the MLP carving is still exact, the attention is an
approximation that ``--recover-steps`` trains.

Routing weights. Every target is written with top-k renormalisation (``norm_topk_prob=True``; Mixtral
always renormalises): the selected experts' weights sum to 1, so a neuron replicated in every expert
contributes exactly once, and each routed expert's down projection is scaled by ``k`` so that equal
weights ``1/k`` reproduce the dense partial sums (exact at ``top-k = E`` with a zero router).
Qwen2-MoE's shared expert is multiplied by ``sigmoid(shared_expert_gate(x))``; the gate starts at zero
(``0.5``) and the shared down projection is doubled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moequant.errors import MoequantError

SOURCE_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class TargetArch:
    """How one MoE ``model_type`` is laid out. ``qk_norm``: None, ``"full"`` (over all heads, OLMoE) or
    ``"head"`` (per head, Qwen3-MoE). ``bias``: which attention projections may carry a bias —
    ``"qkv"`` (Qwen2-MoE's ``qkv_bias``), ``"all"`` (``attention_bias``: q, k, v and o) or ``"none"``."""

    model_type: str
    shared_expert: bool
    qk_norm: str | None
    bias: str


TARGETS: dict[str, TargetArch] = {
    "qwen2_moe": TargetArch("qwen2_moe", shared_expert=True, qk_norm=None, bias="qkv"),
    "olmoe": TargetArch("olmoe", shared_expert=False, qk_norm="full", bias="all"),
    "mixtral": TargetArch("mixtral", shared_expert=False, qk_norm=None, bias="none"),
    "qwen3_moe": TargetArch("qwen3_moe", shared_expert=False, qk_norm="head", bias="all"),
}


@dataclass(frozen=True)
class SourceAttention:
    """What the dense attention holds: biases on q/k/v and on o, and per-head q/k norms (Qwen3)."""

    qkv_bias: bool
    o_bias: bool
    qk_norm_head: bool


def source_attention(dense: nn.Module) -> SourceAttention:
    attn = dense.model.layers[0].self_attn
    return SourceAttention(qkv_bias=attn.q_proj.bias is not None, o_bias=attn.o_proj.bias is not None,
                           qk_norm_head=hasattr(attn, "q_norm"))


def check_pair(src_type: str, src: SourceAttention, target: TargetArch) -> bool:
    """Raise where the target cannot hold the source attention at all; True when it holds it exactly,
    False when its q/k norms are an approximation (the caller warns)."""
    where = f"carving {src_type} into {target.model_type}"
    if src.qk_norm_head and target.qk_norm != "head":
        raise MoequantError(f"{where}: the source normalises q and k per head (Qwen3), which "
                            f"{target.model_type} cannot express; use --arch qwen3_moe")
    if src.o_bias and target.bias != "all":
        raise MoequantError(f"{where}: the source has an o_proj bias; {target.model_type} has none "
                            f"(use --arch olmoe or qwen3_moe)")
    if src.qkv_bias and target.bias == "none":
        raise MoequantError(f"{where}: the source has q/k/v biases; {target.model_type} has none "
                            f"(use --arch qwen2_moe)")
    return target.qk_norm is None or (target.qk_norm == "head" and src.qk_norm_head)


def moe_config(dense_cfg: Any, target: TargetArch, *, experts: int, top_k: int, expert_size: int,
               shared_size: int, src: SourceAttention) -> Any:
    """The target's transformers config: attention, norms, vocabulary and positions from ``dense_cfg``;
    ``experts`` routed experts of ``expert_size`` neurons (top ``top_k``, renormalised) and, for
    Qwen2-MoE, a shared expert of ``shared_size``."""
    from transformers import CONFIG_MAPPING

    d = dense_cfg
    head_dim = getattr(d, "head_dim", None) or d.hidden_size // d.num_attention_heads
    common: dict[str, Any] = dict(
        vocab_size=d.vocab_size, hidden_size=d.hidden_size, num_hidden_layers=d.num_hidden_layers,
        num_attention_heads=d.num_attention_heads, num_key_value_heads=d.num_key_value_heads,
        head_dim=head_dim, hidden_act=d.hidden_act, max_position_embeddings=d.max_position_embeddings,
        rms_norm_eps=d.rms_norm_eps, tie_word_embeddings=bool(getattr(d, "tie_word_embeddings", False)),
        bos_token_id=d.bos_token_id, eos_token_id=d.eos_token_id, pad_token_id=getattr(d, "pad_token_id", None),
        attention_dropout=0.0, rope_parameters=dict(d.rope_parameters), num_experts_per_tok=top_k,
        output_router_logits=False,
    )
    t = target.model_type
    if t == "qwen2_moe":
        extra = dict(num_experts=experts, moe_intermediate_size=expert_size, intermediate_size=expert_size,
                     shared_expert_intermediate_size=shared_size, norm_topk_prob=True, qkv_bias=src.qkv_bias,
                     decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False)
    elif t == "qwen3_moe":
        extra = dict(num_experts=experts, moe_intermediate_size=expert_size, intermediate_size=expert_size,
                     norm_topk_prob=True, attention_bias=src.qkv_bias or src.o_bias, decoder_sparse_step=1,
                     mlp_only_layers=[], use_sliding_window=False)
    elif t == "olmoe":
        extra = dict(num_experts=experts, intermediate_size=expert_size, norm_topk_prob=True,
                     attention_bias=src.qkv_bias or src.o_bias, clip_qkv=None)
    elif t == "mixtral":
        extra = dict(num_local_experts=experts, intermediate_size=expert_size, sliding_window=None)
    else:
        raise MoequantError(f"unknown --arch {t!r} (choose from {', '.join(TARGETS)})")
    return CONFIG_MAPPING[t](**common, **extra)


def _copy(dst: nn.Module, src: nn.Module, name: str) -> None:
    for pname in ("weight", "bias"):
        s = getattr(src, pname, None)
        d = getattr(dst, pname, None)
        if s is None and d is None:
            continue
        if d is None:
            raise MoequantError(f"{name}.{pname}: the target has no place for it")
        with torch.no_grad():
            if s is None:
                d.zero_()  # the target has a bias the source lacks
            else:
                if tuple(d.shape) != tuple(s.shape):
                    raise MoequantError(f"{name}.{pname}: shape {tuple(s.shape)} vs target {tuple(d.shape)}")
                d.copy_(s)


def copy_shared_weights(moe: nn.Module, dense: nn.Module) -> None:
    """Embeddings, final norm, head, and every layer's attention and norms (all but the MLP)."""
    _copy(moe.model.embed_tokens, dense.model.embed_tokens, "model.embed_tokens")
    _copy(moe.model.norm, dense.model.norm, "model.norm")
    if not moe.config.tie_word_embeddings:
        _copy(moe.lm_head, dense.lm_head, "lm_head")
    for i, (lm, ld) in enumerate(zip(moe.model.layers, dense.model.layers)):
        p = f"model.layers.{i}"
        _copy(lm.input_layernorm, ld.input_layernorm, f"{p}.input_layernorm")
        _copy(lm.post_attention_layernorm, ld.post_attention_layernorm, f"{p}.post_attention_layernorm")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _copy(getattr(lm.self_attn, proj), getattr(ld.self_attn, proj), f"{p}.self_attn.{proj}")
        if hasattr(ld.self_attn, "q_norm"):
            for norm in ("q_norm", "k_norm"):
                _copy(getattr(lm.self_attn, norm), getattr(ld.self_attn, norm), f"{p}.self_attn.{norm}")


@dataclass
class CarvedMLP:
    """One layer's carving: ``shared [S]`` and per expert ``experts[e] [I_e]`` neuron indices of the
    dense MLP, and the dense weights ``gate``/``up [I, H]``, ``down [H, I]`` they index."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    shared: torch.Tensor
    experts: list[torch.Tensor]


def write_block(block: nn.Module, carved: CarvedMLP, target: TargetArch, top_k: int) -> None:
    """Fill a freshly built ``SparseMoeBlock`` with ``carved`` (router left as it is: the caller sets it).

    Routed neurons' down columns are scaled by ``top_k`` (weights ``1/k``); with a shared expert module
    its down projection is scaled by 2 (``sigmoid(0)``) and its gate zeroed; without one (OLMoE, Mixtral,
    Qwen3-MoE) the shared neurons are replicated in every expert, unscaled (renormalised weights sum to 1)."""
    g, u, dn = carved.gate, carved.up, carved.down
    sh = carved.shared
    with torch.no_grad():
        rows_gu, rows_dn = [], []
        for idx in carved.experts:
            cols = idx if target.shared_expert or sh.numel() == 0 else torch.cat([sh, idx])
            scale = torch.full((cols.numel(),), float(top_k))
            if not target.shared_expert and sh.numel():
                scale[: sh.numel()] = 1.0
            rows_gu.append(torch.cat([g[cols], u[cols]], 0))  # [2I_e, H]
            rows_dn.append(dn[:, cols] * scale[None, :])  # [H, I_e]
        block.experts.gate_up_proj.copy_(torch.stack(rows_gu))
        block.experts.down_proj.copy_(torch.stack(rows_dn))
        if target.shared_expert:
            se = block.shared_expert
            se.gate_proj.weight.copy_(g[sh])
            se.up_proj.weight.copy_(u[sh])
            se.down_proj.weight.copy_(dn[:, sh] * 2.0)
            block.shared_expert_gate.weight.zero_()
        block.gate.weight.zero_()

