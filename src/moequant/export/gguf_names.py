"""Where each tensor of a transformers causal LM goes in a GGUF file, as llama.cpp's ``convert_hf_to_gguf.py``
places it: names through gguf-py's ``TensorNameMap`` of the llama.cpp architecture, the fused expert tensor
``gate_up_proj [E, 2I, H]`` split into ``ffn_gate_exps`` / ``ffn_up_exps`` ``[E, I, H]`` (one 3-D tensor
per projection), the Q/K row order of llama-architecture models (the converter stores the two rotary
halves of every head interleaved), Gemma 3's RMSNorm weights as ``1 + w`` and its embedding rows cut
to the tokenizer's.

Source names are the in-memory parameter names (``model.layers.0.mlp.experts.gate_up_proj``), the same
for a float model loaded by transformers and for a moequant checkpoint. The transforms are pure
functions of a tensor whose first dim (after the expert dim) is the output rows, so they apply alike to
float weights ``[N, K]``, biases ``[N]`` and ggml block rows ``[N, row_bytes]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import gguf
import torch

from moequant.errors import MoequantError

T = gguf.MODEL_TENSOR


@dataclass(frozen=True)
class GgufArch:
    """One transformers ``model_type`` as llama.cpp's converter writes it.

    arch: llama.cpp architecture; permute_qk: Q/K rows reordered (the converter's ``LlamaModel``);
    norm_shift: added to RMSNorm weights (Gemma 3 stores ``1 + w``); trim_vocab: embedding rows cut to
    the tokenizer's token count (Gemma 3); needs_output: llama.cpp's loader requires ``output.weight``
    (no fallback to ``token_embd``), so a tied head is written as a copy of the embedding (the converter
    writes none, and llama.cpp then refuses the file: "missing tensor 'output.weight'"); topk_norm: whether
    llama.cpp's MoE graph renormalises the top-k routing weights (fixed per architecture; None: dense, or
    the model always does); mha_only: llama.cpp's graph assumes as many KV heads as query heads."""

    model_type: str
    arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    norm_shift: float = 0.0
    trim_vocab: bool = False
    needs_output: bool = False
    topk_norm: bool | None = None
    mha_only: bool = False

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


ARCHS: dict[str, GgufArch] = {a.model_type: a for a in (
    GgufArch("llama", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    GgufArch("mistral", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    GgufArch("mixtral", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    GgufArch("qwen2", gguf.MODEL_ARCH.QWEN2),
    GgufArch("qwen3", gguf.MODEL_ARCH.QWEN3),
    GgufArch("gemma3_text", gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0, trim_vocab=True),
    GgufArch("olmoe", gguf.MODEL_ARCH.OLMOE, needs_output=True, topk_norm=False, mha_only=True),
    GgufArch("qwen2_moe", gguf.MODEL_ARCH.QWEN2MOE, needs_output=True, topk_norm=False),
    GgufArch("qwen3_moe", gguf.MODEL_ARCH.QWEN3MOE, topk_norm=True),
)}


def arch_for(model_type: str) -> GgufArch:
    try:
        return ARCHS[model_type]
    except KeyError:
        raise MoequantError(f"GGUF export: architecture {model_type!r} is not supported (supported: "
                            f"{', '.join(sorted(ARCHS))})") from None


def check_llama_cpp(arch: GgufArch, hp: dict[str, Any]) -> None:
    """Refuse a config that llama.cpp's graph for ``arch`` would compute differently: it would load the file
    and silently run another model. The routing weights' top-k renormalisation is fixed per architecture;
    OLMoE's Q/K norms span all heads (no grouped-query attention); Gemma 3 scales queries by
    ``1/sqrt(head_dim)`` (by ``1/sqrt(hidden/heads)`` for its 62-layer 27B)."""
    where = f"GGUF export: {arch.model_type}"
    if arch.topk_norm is not None and bool(hp.get("norm_topk_prob", False)) != arch.topk_norm:
        raise MoequantError(f"{where} with norm_topk_prob={bool(hp.get('norm_topk_prob', False))}: llama.cpp's "
                            f"{arch.name} {'always renormalises' if arch.topk_norm else 'never renormalises'} the "
                            f"top-k routing weights, so it would run another model")
    heads, kv = hp.get("num_attention_heads"), hp.get("num_key_value_heads")
    if arch.mha_only and kv is not None and kv != heads:
        raise MoequantError(f"{where} with {kv} KV heads for {heads} query heads: llama.cpp's {arch.name} supports "
                            f"only as many KV heads as query heads")
    if arch.arch == gguf.MODEL_ARCH.GEMMA3 and hp.get("query_pre_attn_scalar") is not None:
        scalar, head_dim = hp["query_pre_attn_scalar"], hp.get("head_dim", 256)
        big = hp.get("num_hidden_layers") == 62 and scalar == hp["hidden_size"] // heads
        if scalar != head_dim and not big:
            raise MoequantError(f"{where} with query_pre_attn_scalar={scalar} and head_dim={head_dim}: llama.cpp "
                                f"scales queries by 1/sqrt(head_dim), so it would run another model")


# Tensors the converter always writes as F32 whatever the requested type (besides 1-D tensors and norms).
F32_KINDS = (T.FFN_GATE_INP, T.FFN_GATE_INP_SHEXP)


@dataclass(frozen=True)
class Placement:
    """One GGUF tensor made from (part of) one source tensor.

    source: in-memory name; gguf_name: GGUF tensor name; kind: its ``MODEL_TENSOR``; half: for a fused
    ``gate_up_proj``, 0 (gate rows) or 1 (up rows); qk_heads: heads whose rows are reordered (llama
    Q/K), else None; shift: added to the values (Gemma 3 norms); rows: keep only the first ``rows``
    rows (Gemma 3 embedding), else None."""

    source: str
    gguf_name: str
    kind: T
    half: int | None = None
    qk_heads: int | None = None
    shift: float = 0.0
    rows: int | None = None

    @property
    def always_f32(self) -> bool:
        """F32 regardless of the requested type: norms, routers, biases (the converter's rule)."""
        return (self.kind in F32_KINDS or self.gguf_name.endswith("_norm.weight")
                or not self.gguf_name.endswith(".weight"))


_EXPERTS = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<param>gate_up_proj|down_proj)$")


def placements(arch: GgufArch, names: list[str], hparams: dict[str, Any], n_vocab: int | None) -> list[Placement]:
    """The GGUF tensors of the source tensors ``names`` (tied duplicates already left out), in order.
    ``n_vocab``: the token count written (Gemma 3's embedding is cut to it). A name the converter could
    not map either is an error naming it."""
    n_layers = int(hparams["num_hidden_layers"])
    tmap = gguf.get_tensor_name_map(arch.arch, n_layers)
    n_head = int(hparams["num_attention_heads"])
    n_kv = int(hparams.get("num_key_value_heads") or n_head)
    out: list[Placement] = []
    for name in names:
        m = _EXPERTS.match(name)
        if m:  # fused experts: the converter's merged per-projection names
            projs = ("gate_proj", "up_proj") if m["param"] == "gate_up_proj" else ("down_proj",)
            for half, proj in enumerate(projs):
                kind, gname = _map(tmap, f"{m['prefix']}.{proj}.weight", name, arch)
                out.append(Placement(name, gname, kind, half=half if len(projs) == 2 else None))
            continue
        kind, gname = _map(tmap, name, name, arch)
        heads = None
        if arch.permute_qk and kind in (T.ATTN_Q, T.ATTN_K):
            heads = n_head if kind == T.ATTN_Q else n_kv
        shift = arch.norm_shift if name.endswith("norm.weight") else 0.0
        rows = n_vocab if arch.trim_vocab and kind == T.TOKEN_EMBD else None
        out.append(Placement(name, gname, kind, qk_heads=heads, shift=shift, rows=rows))
    if arch.needs_output and not any(p.kind == T.OUTPUT for p in out):
        emb = next((p for p in out if p.kind == T.TOKEN_EMBD), None)
        if emb is not None:  # a tied head: llama.cpp reads this architecture's head only from output.weight
            out.append(Placement(emb.source, "output.weight", T.OUTPUT))
    return out


def _map(tmap: gguf.TensorNameMap, key: str, source: str, arch: GgufArch) -> tuple[T, str]:
    found = tmap.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise MoequantError(f"GGUF export: tensor {source!r} has no place in llama.cpp's {arch.name!r} "
                            f"architecture (llama.cpp's converter cannot map it either)")
    return found


# ------------------------------------------------------------------------------------------------ math

def interleave_qk_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``t [N, ...]`` with ``N = n_heads * d`` (HF order: per head, the first rotary half then the second)
    -> the rows llama.cpp's llama architecture expects: per head ``0, d/2, 1, d/2 + 1, ...``. Row
    ``h*d + 2i + j`` of the result is row ``h*d + j*d/2 + i`` of ``t``."""
    n = t.shape[0]
    if n % (2 * n_heads):
        raise ValueError(f"{n} rows do not split into {n_heads} heads of an even size")
    return t.reshape(n_heads, 2, n // n_heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def place(p: Placement, t: torch.Tensor) -> torch.Tensor:
    """Source tensor ``t`` (float weights, or ggml block rows ``[..., N, row_bytes]``) -> the rows of
    GGUF tensor ``p``: the gate/up half of a fused expert tensor ``[E, 2I, ·] -> [E, I, ·]``, llama's Q/K
    row order, Gemma's embedding rows. The value shift is the caller's (floats only)."""
    if p.half is not None:
        rows = t.shape[-2] // 2
        t = t[..., p.half * rows:(p.half + 1) * rows, :]  # [E, I, ·]
    if p.qk_heads is not None:
        t = interleave_qk_rows(t, p.qk_heads)
    if p.rows is not None:
        t = t[: p.rows]
    return t
