"""The model keys of a GGUF file (``<arch>.*`` and ``general.file_type``) from a transformers config, as
llama.cpp's converter writes them for the architectures of ``gguf_names.ARCHS``; and the llama-3 RoPE
frequency factors it stores as a tensor (``rope_freqs.weight``).

Keys, in the converter's order: block_count, context_length, embedding_length, feed_forward_length,
attention.head_count(_kv), rope scaling (linear / yarn), rope.freq_base (and Gemma 3's freq_base_swa),
attention.layer_norm_rms_epsilon, expert_count, expert_used_count, attention.key_length /
value_length (when the config states head_dim), general.file_type; then per architecture: llama's
vocab_size and rope.dimension_count, Qwen-MoE's expert_feed_forward_length and
expert_shared_feed_forward_length, Gemma 3's defaults, final_logit_softcapping and sliding_window.
"""

from __future__ import annotations

import math
from typing import Any

import gguf
import torch

from moequant.errors import MoequantError
from moequant.export.gguf_names import GgufArch


def rope_params(hp: dict[str, Any]) -> dict[str, Any]:
    """The RoPE parameters of full attention: ``rope_parameters`` (transformers 5; Gemma 3 nests them per
    attention kind) or ``rope_scaling``, with a top-level ``rope_theta`` filled in."""
    params = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    if "rope_theta" not in params and hp.get("rope_theta") is not None:
        params["rope_theta"] = hp["rope_theta"]
    return params


def _swa_theta(hp: dict[str, Any]) -> float | None:
    nested = (hp.get("rope_parameters") or {}).get("sliding_attention") or {}
    theta = nested.get("rope_theta", hp.get("rope_local_base_freq"))
    return None if theta is None else float(theta)


def add_model_keys(w: gguf.GGUFWriter, arch: GgufArch, hp: dict[str, Any], file_type: int) -> None:
    """Write the ``<arch>.*`` keys and ``general.file_type`` of config ``hp`` (see the module docstring)."""
    gemma = arch.arch == gguf.MODEL_ARCH.GEMMA3
    w.add_block_count(int(hp["num_hidden_layers"]))
    ctx = hp.get("max_position_embeddings", 131072 if gemma else None)
    if ctx is not None:
        w.add_context_length(int(ctx))
    w.add_embedding_length(int(hp["hidden_size"]))
    if hp.get("intermediate_size") is not None:
        w.add_feed_forward_length(int(hp["intermediate_size"]))
    n_head = hp.get("num_attention_heads", 8 if gemma else None)
    if n_head is not None:
        w.add_head_count(int(n_head))
    n_kv = hp.get("num_key_value_heads", 4 if gemma else None)
    if n_kv is not None:
        w.add_head_count_kv(int(n_kv))
    rope = rope_params(hp)
    _add_rope_scaling(w, rope, arch)
    theta = rope.get("rope_theta", 1_000_000.0 if gemma else None)
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    if gemma and (swa := _swa_theta(hp)) is not None:
        w.add_rope_freq_base_swa(swa)
    eps = hp.get("rms_norm_eps", 1e-6 if gemma else None)
    if eps is not None:
        w.add_layer_norm_rms_eps(float(eps))
    n_exp = hp.get("num_local_experts", hp.get("num_experts"))
    if n_exp is not None:
        w.add_expert_count(int(n_exp))
    if hp.get("num_experts_per_tok") is not None:
        w.add_expert_used_count(int(hp["num_experts_per_tok"]))
    head_dim = hp.get("head_dim", 256 if gemma else None)
    if head_dim is not None:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    w.add_file_type(int(file_type))
    if arch.arch == gguf.MODEL_ARCH.LLAMA:
        w.add_vocab_size(int(hp["vocab_size"]))
        w.add_rope_dimension_count(int(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]))
    if arch.arch in (gguf.MODEL_ARCH.QWEN2MOE, gguf.MODEL_ARCH.QWEN3MOE):
        if hp.get("moe_intermediate_size") is not None:
            w.add_expert_feed_forward_length(int(hp["moe_intermediate_size"]))
        if hp.get("shared_expert_intermediate_size") is not None:
            w.add_expert_shared_feed_forward_length(int(hp["shared_expert_intermediate_size"]))
    if gemma:
        if hp.get("attn_logit_softcapping") is not None:
            raise MoequantError("GGUF export: Gemma 3 with attn_logit_softcapping has no llama.cpp equivalent")
        if hp.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(hp["final_logit_softcapping"]))
        pattern = hp.get("sliding_window_pattern", hp.get("_sliding_window_pattern"))
        if pattern != 1 and hp.get("sliding_window") is not None:
            w.add_sliding_window(int(hp["sliding_window"]))


def _add_rope_scaling(w: gguf.GGUFWriter, rope: dict[str, Any], arch: GgufArch) -> None:
    kind = rope.get("rope_type")
    factor = rope.get("factor")
    if kind in (None, "default"):
        return
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))
    elif kind == "llama3" and arch.arch == gguf.MODEL_ARCH.LLAMA:
        return  # no metadata key: llama.cpp reads llama3 scaling from the tensor rope_freqs.weight (gguf.py writes it)
    else:
        raise MoequantError(f"GGUF export: RoPE type {kind!r} (factor {factor}) is not written by moequant's GGUF "
                            f"export for {arch.name} (supported: default, linear, yarn, llama3)")


def llama3_rope_factors(hp: dict[str, Any]) -> torch.Tensor | None:
    """Llama 3's frequency-dependent RoPE scaling as the per-frequency divisors llama.cpp reads from
    ``rope_freqs.weight`` ``[head_dim / 2]`` float32; None unless the config's RoPE type is ``llama3``.
    A frequency whose wavelength is below ``original_ctx / high_freq_factor`` keeps 1, one above
    ``original_ctx / low_freq_factor`` gets ``factor``, in between they are blended smoothly."""
    rope = rope_params(hp)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = float(rope.get("rope_theta", 10000.0))
    dim = int(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # [dim / 2]
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)  # [dim / 2]


# ggml type of the bulk of the weights -> general.file_type (the uniform "_S" variant of the k-quants)
FILE_TYPES: dict[gguf.GGMLQuantizationType, gguf.LlamaFileType] = {
    gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    gguf.GGMLQuantizationType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    gguf.GGMLQuantizationType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    gguf.GGMLQuantizationType.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
    gguf.GGMLQuantizationType.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S,
    gguf.GGMLQuantizationType.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
    gguf.GGMLQuantizationType.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S,
    gguf.GGMLQuantizationType.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
    gguf.GGMLQuantizationType.IQ4_NL: gguf.LlamaFileType.MOSTLY_IQ4_NL,
}
