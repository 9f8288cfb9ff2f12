"""``moequant export gguf``: every file is read back with gguf-py's own reader and decoder, never ours.

For tiny models of every architecture (random norms and biases, a real byte-level BPE tokenizer): the
tensor names, shapes and types written out here by hand from llama.cpp's conventions; every tensor's
``gguf.quants.dequantize`` equal bit for bit to the float weight (float export) or to moequant's decode
(repacked checkpoint), after the converter's transforms (gate/up split, llama Q/K row order, Gemma's
``1 + w`` norms) spelled out independently here; the metadata keys against the config; refusals exit 2
with one line and leave no file. The llama Q/K row order is also checked by what it is for: interleaved
RoPE on the stored rows gives the attention scores transformers' rotate-half RoPE gives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ARCHS, MOE_ARCHS, tiny_config, toy_lines, toy_words
from moequant import api
from moequant.alloc.recipe import Recipe, Rule
from moequant.cli import main
from moequant.codecs.config import LutConfig, UniformConfig
from moequant.errors import MoequantError
from moequant.export.gguf import GgufExportJob, export_gguf
from moequant.export.gguf_tokenizer import pre_tokenizer_name
from moequant.formats.uniform import UniformAsymTensor, UniformTensor

pytestmark = pytest.mark.usefixtures("one_thread")

Q = gguf.GGMLQuantizationType
N_TOK = 300  # tokenizer size; the models' vocabulary is 320 (ids 300..319 are padding)
LLAMA_ARCH = ("llama", "mixtral")  # written as llama.cpp's "llama" architecture, Q/K rows reordered
GGUF_ARCH = {"llama": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",
             "olmoe": "olmoe", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}


# ------------------------------------------------------------------------------------------------
# fixtures: tiny models with a tokenizer, saved as HF directories and as moequant checkpoints
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from moequant.zoo.tiny_olmoe import train_tokenizer

    return train_tokenizer([toy_lines(toy_words(2000))], N_TOK)


# what llama.cpp's graphs fix for these architectures (moequant refuses other settings: see the refusal test)
LLAMA_CPP_FIXED = {"qwen3_moe": {"norm_topk_prob": True}, "olmoe": {"num_key_value_heads": 4},
                   "gemma3_text": {"query_pre_attn_scalar": 16}}


def make_model(arch: str, **overrides):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch)
    cfg.vocab_size = 320
    overrides = {**LLAMA_CPP_FIXED.get(arch, {}), **overrides}
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # norms and biases away from 1 / 0, so a missed shift or a swapped vector shows
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_()
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            d = tmp_path_factory.mktemp(f"hf_{arch}")
            make_model(arch).save_pretrained(d)
            tokenizer.save_pretrained(d)
            made[arch] = d
        return made[arch]
    return get


def sym(bits: int, gs: int = 32) -> UniformConfig:
    return UniformConfig(bits=bits, group_size=gs, symmetric=True, scale_dtype="float16", clip_search=False)


def run_recipe(model) -> Recipe:
    """Linears 4-bit, experts 5-bit, the embedding 8-bit (with the head it is tied to): Q4_0 / Q5_0 / Q8_0
    after repacking; an untied head is kept."""
    tied = [Rule("kind:head", sym(8))] if model.config.tie_word_embeddings else []
    return Recipe((Rule("kind:embedding", sym(8)), *tied, *(Rule(p, None) for p in (
        r"re:.*\.(gate|router)\.weight", r"re:.*shared_expert_gate\.weight", r"re:.*norm.*",
        r"re:(.*\.)?lm_head\.weight")), Rule("kind:experts", sym(5)), Rule("kind:linear", sym(4))))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            model = make_model(arch)
            api.quantize(model, run_recipe(model), progress=False)
            made[arch] = api.save(model, tmp_path_factory.mktemp(f"run_{arch}") / "run", tokenizer=tokenizer)
        return made[arch]
    return get


# ------------------------------------------------------------------------------------------------
# the expected file, written out by hand from llama.cpp's conventions
# ------------------------------------------------------------------------------------------------

def expected_tensors(arch: str, cfg) -> dict[str, tuple[str, int | None]]:
    """{GGUF name: (source tensor, gate/up half or None)}."""
    moe = arch in MOE_ARCHS
    out: dict[str, tuple[str, int | None]] = {"token_embd.weight": ("model.embed_tokens.weight", None),
                                              "output_norm.weight": ("model.norm.weight", None)}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = ("lm_head.weight", None)
    elif arch in ("olmoe", "qwen2_moe"):  # llama.cpp requires the head of these: a copy of the tied embedding
        out["output.weight"] = ("model.embed_tokens.weight", None)
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}", f"blk.{i}"
        for hf, g in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
            out[f"{b}.{g}.weight"] = (f"{p}.self_attn.{hf}.weight", None)
        if arch in ("qwen2", "qwen2_moe"):
            for hf, g in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
                out[f"{b}.{g}.bias"] = (f"{p}.self_attn.{hf}.bias", None)
        if arch in ("qwen3", "qwen3_moe", "olmoe", "gemma3_text"):
            out[f"{b}.attn_q_norm.weight"] = (f"{p}.self_attn.q_norm.weight", None)
            out[f"{b}.attn_k_norm.weight"] = (f"{p}.self_attn.k_norm.weight", None)
        out[f"{b}.attn_norm.weight"] = (f"{p}.input_layernorm.weight", None)
        if arch == "gemma3_text":
            out[f"{b}.post_attention_norm.weight"] = (f"{p}.post_attention_layernorm.weight", None)
            out[f"{b}.ffn_norm.weight"] = (f"{p}.pre_feedforward_layernorm.weight", None)
            out[f"{b}.post_ffw_norm.weight"] = (f"{p}.post_feedforward_layernorm.weight", None)
        else:
            out[f"{b}.ffn_norm.weight"] = (f"{p}.post_attention_layernorm.weight", None)
        if not moe:
            for hf, g in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                out[f"{b}.{g}.weight"] = (f"{p}.mlp.{hf}.weight", None)
            continue
        out[f"{b}.ffn_gate_inp.weight"] = (f"{p}.mlp.gate.weight", None)
        out[f"{b}.ffn_gate_exps.weight"] = (f"{p}.mlp.experts.gate_up_proj", 0)
        out[f"{b}.ffn_up_exps.weight"] = (f"{p}.mlp.experts.gate_up_proj", 1)
        out[f"{b}.ffn_down_exps.weight"] = (f"{p}.mlp.experts.down_proj", None)
        if arch == "qwen2_moe":
            for hf, g in (("gate_proj", "ffn_gate_shexp"), ("up_proj", "ffn_up_shexp"), ("down_proj", "ffn_down_shexp")):
                out[f"{b}.{g}.weight"] = (f"{p}.mlp.shared_expert.{hf}.weight", None)
            out[f"{b}.ffn_gate_inp_shexp.weight"] = (f"{p}.mlp.shared_expert_gate.weight", None)
    return out


def llama_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order by index: stored row ``h*d + 2i + j`` is HF row ``h*d + j*d/2 + i``."""
    d = w.shape[0] // n_heads
    idx = [h * d + j * (d // 2) + i for h in range(n_heads) for i in range(d // 2) for j in range(2)]
    return w[idx]


def expected_value(arch: str, cfg, gname: str, src: torch.Tensor, half: int | None) -> torch.Tensor:
    """The float32 values GGUF tensor ``gname`` must decode to, from its source tensor."""
    t = src.to(torch.float32)
    if half is not None:
        n = t.shape[-2] // 2
        t = t[..., half * n:(half + 1) * n, :]
    if arch in LLAMA_ARCH and gname.split(".")[-2] in ("attn_q", "attn_k"):
        t = llama_rows(t, cfg.num_attention_heads if ".attn_q." in gname else cfg.num_key_value_heads)
    if arch == "gemma3_text":
        if gname.endswith("norm.weight"):
            t = t + 1.0
        if gname == "token_embd.weight":
            t = t[:N_TOK]
    return t


def read(path: Path) -> tuple[dict[str, gguf.ReaderTensor], dict]:
    r = gguf.GGUFReader(path)
    return {t.name: t for t in r.tensors}, {k: f.contents() for k, f in r.fields.items()}


def decoded(t: gguf.ReaderTensor) -> torch.Tensor:
    """gguf-py's decode of a stored tensor, in numpy order ``[..., N, K]``."""
    shape = tuple(int(s) for s in reversed(t.shape))
    return torch.from_numpy(np.array(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type))).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


def check_keys(arch: str, cfg, kv: dict, file_type: gguf.LlamaFileType) -> None:
    a = GGUF_ARCH[arch]
    assert kv["general.architecture"] == a and kv["general.file_type"] == file_type
    assert kv[f"{a}.block_count"] == cfg.num_hidden_layers and kv[f"{a}.embedding_length"] == cfg.hidden_size
    assert kv[f"{a}.context_length"] == cfg.max_position_embeddings
    assert kv[f"{a}.attention.head_count"] == cfg.num_attention_heads
    assert kv[f"{a}.attention.head_count_kv"] == cfg.num_key_value_heads
    assert kv[f"{a}.feed_forward_length"] == cfg.intermediate_size
    assert kv[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    assert kv[f"{a}.rope.freq_base"] == rope["rope_theta"]
    if arch in MOE_ARCHS:
        assert kv[f"{a}.expert_count"] == (getattr(cfg, "num_local_experts", None) or cfg.num_experts)
        assert kv[f"{a}.expert_used_count"] == cfg.num_experts_per_tok
    if arch in ("qwen2_moe", "qwen3_moe"):
        assert kv[f"{a}.expert_feed_forward_length"] == cfg.moe_intermediate_size
    if arch == "qwen2_moe":
        assert kv[f"{a}.expert_shared_feed_forward_length"] == cfg.shared_expert_intermediate_size
    if a == "llama":
        assert kv["llama.vocab_size"] == 320 and kv["llama.rope.dimension_count"] == 16
    if arch == "gemma3_text":
        assert kv["gemma3.attention.sliding_window"] == cfg.sliding_window
        assert kv["gemma3.rope.freq_base_swa"] == cfg.rope_parameters["sliding_attention"]["rope_theta"]


def check_vocab(arch: str, kv: dict, tok_dir: Path) -> None:
    """Tokens by id as transformers loads the tokenizer for this architecture (Qwen2's class adds
    ``<|endoftext|>``), padded to the model's 320; special added tokens are control tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    by_id = {i: t for t, i in tok.get_vocab().items()}
    m = max(by_id) + 1
    n = m if arch == "gemma3_text" else 320
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert len(tokens) == len(types) == n and m >= N_TOK
    assert tokens[:m] == [by_id[i] for i in range(m)]
    assert tokens[m:] == [f"[PAD{i}]" for i in range(m, n)] and set(types[m:]) <= {5}
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert {0, 1, 2} <= special and types[:m] == [3 if i in special else 1 for i in range(m)]
    merges = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert len(kv["tokenizer.ggml.merges"]) == len(merges) > 0
    assert kv["tokenizer.ggml.bos_token_id"] == 0 and kv["tokenizer.ggml.eos_token_id"] == 1
    assert kv["tokenizer.ggml.padding_token_id"] == 2


# ------------------------------------------------------------------------------------------------
# float models
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_float_export_f32_is_the_model(arch, hf_dir, tokenizer, tmp_path):
    """--types f32: every tensor where llama.cpp expects it, decoding to the model's weight bit for bit."""
    d = hf_dir(arch)
    out = tmp_path / "m.gguf"
    s = export_gguf(GgufExportJob(str(d), out, types="f32"))
    tensors, kv = read(out)
    model = make_model(arch)
    cfg, state = model.config, model.state_dict()
    want = expected_tensors(arch, cfg)
    assert sorted(tensors) == sorted(want) and s["tensors"] == len(want) and s["repacked"] == 0
    for gname, (src, half) in want.items():
        assert tensors[gname].tensor_type == Q.F32, gname
        assert same_bits(decoded(tensors[gname]), expected_value(arch, cfg, gname, state[src], half)), gname
    check_keys(arch, cfg, kv, gguf.LlamaFileType.ALL_F32)
    check_vocab(arch, kv, d)


@pytest.mark.parametrize("arch,types", [("llama", "q8_0"), ("qwen2_moe", "f16"), ("mixtral", "bf16"),
                                        ("qwen3_moe", "q4_0"), ("olmoe", "q4_1")])
def test_float_export_types_and_fallback(arch, types, tokenizer, tmp_path):
    """--types q8_0/f16/bf16/q4_0/q4_1 on awkward widths (80 and 48 are not whole 32-blocks): weight matrices
    in the asked type, rows of 80/48 in F16 (as llama.cpp's converter falls back), norms, biases and
    routers in F32; values as gguf-py's own encoder rounds them."""
    over = {"intermediate_size": 80} if arch not in MOE_ARCHS else {"moe_intermediate_size": 48} \
        if arch in ("qwen2_moe", "qwen3_moe") else {"intermediate_size": 48}
    model = make_model(arch, **over)
    d = tmp_path / "hf"
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    out = tmp_path / "m.gguf"
    s = export_gguf(GgufExportJob(str(d), out, types=types))
    tensors, kv = read(out)
    cfg, state = model.config, model.state_dict()
    want_type = {"q8_0": Q.Q8_0, "f16": Q.F16, "bf16": Q.BF16, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}[types]
    block = gguf.GGML_QUANT_SIZES[want_type][0]
    n_fallback = 0
    for gname, (src, half) in expected_tensors(arch, cfg).items():
        value = expected_value(arch, cfg, gname, state[src], half)
        t = tensors[gname]
        if value.dim() == 1 or gname.endswith("_norm.weight") or ".ffn_gate_inp" in gname:
            assert t.tensor_type == Q.F32, gname
        elif value.shape[-1] % block:
            assert t.tensor_type == Q.F16, gname
            n_fallback += 1
            value = value.half().float()
        else:
            assert t.tensor_type == want_type, gname
            value = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(value.numpy(), want_type), want_type))
        assert same_bits(decoded(t), value), gname
    assert n_fallback == (cfg.num_hidden_layers if block > 1 else 0) == len(s["fallbacks"])
    assert kv["general.file_type"] == {"q8_0": 7, "f16": 1, "bf16": 32, "q4_0": 2, "q4_1": 3}[types]


def test_llama_qk_rows_give_transformers_attention_under_interleaved_rope(hf_dir, tmp_path):
    """The reordered Q/K rows are right for what llama.cpp does with them: RoPE on adjacent pairs of the
    stored rows gives the same attention scores as transformers' rotate-half RoPE on its own rows."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    out = tmp_path / "m.gguf"
    export_gguf(GgufExportJob(str(hf_dir("llama")), out, types="f32"))
    tensors, _ = read(out)
    model = make_model("llama")
    cfg, attn = model.config, model.model.layers[1].self_attn
    nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, 16
    x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(5)
    inv = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    ang = pos[:, None].float() * inv[None]  # [T, d/2]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()  # [T, d] rotate-half layout
    q = (x @ attn.q_proj.weight.T).view(5, nh, d).transpose(0, 1)[None]  # [1, H, T, d]
    k = (x @ attn.k_proj.weight.T).view(5, nkv, d).transpose(0, 1)[None]
    q, k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    hf_scores = q[0] @ k[0].repeat_interleave(nh // nkv, 0).transpose(1, 2)  # [H, T, T]

    def interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
        y = (x @ w.T).view(5, heads, d // 2, 2)  # adjacent pairs (2i, 2i+1) rotate by angle i
        c, s = ang.cos()[:, None], ang.sin()[:, None]  # [T, 1, d/2]
        rot = torch.stack([y[..., 0] * c - y[..., 1] * s, y[..., 0] * s + y[..., 1] * c], -1)
        return rot.reshape(5, heads, d).transpose(0, 1)  # [H, T, d]

    gq = interleaved(decoded(tensors["blk.1.attn_q.weight"]), nh)
    gk = interleaved(decoded(tensors["blk.1.attn_k.weight"]), nkv)
    gguf_scores = gq @ gk.repeat_interleave(nh // nkv, 0).transpose(1, 2)
    torch.testing.assert_close(gguf_scores, hf_scores, rtol=1e-5, atol=1e-5)
    unpermuted = interleaved(attn.q_proj.weight, nh) @ interleaved(attn.k_proj.weight, nkv).repeat_interleave(
        nh // nkv, 0).transpose(1, 2)
    assert (unpermuted - hf_scores).abs().max() > 1e-2  # the check can fail: HF's own rows give other scores


# ------------------------------------------------------------------------------------------------
# moequant checkpoints: repacked, never rounded again
# ------------------------------------------------------------------------------------------------

def check_repacked(arch: str, run: Path, out: Path) -> dict[str, Q]:
    """Every tensor of the export of ``run`` decodes (gguf-py) to moequant's decode of it (packed) or to the
    stored tensor (kept, F32), bit for bit, after the converter's transforms -> {GGUF name: type} of the
    packed ones."""
    s = export_gguf(GgufExportJob(str(run), out))
    tensors, kv = read(out)
    model = api.load(run)
    packed = {n: qt.dequantize() for n, qt in api.packed_modules(model).items()}
    kept = load_file(run / "model.safetensors")
    cfg = model.config
    want = expected_tensors(arch, cfg)
    assert sorted(tensors) == sorted(want) and s["repacked"] > 0
    types = {}
    for gname, (src, half) in want.items():
        t = tensors[gname]
        if src in packed:
            types[gname] = t.tensor_type
            value = packed[src]
        else:
            assert t.tensor_type == Q.F32, gname
            value = kept[src]
        assert same_bits(decoded(t), expected_value(arch, cfg, gname, value, half)), gname
    assert len(types) == s["repacked"] and kv["general.quantized_by"].startswith("moequant ")
    check_keys(arch, cfg, kv, gguf.LlamaFileType(kv["general.file_type"]))
    check_vocab(arch, kv, run)
    return types


@pytest.mark.parametrize("arch", ARCHS)
def test_run_export_repacks_bit_for_bit(arch, run_dir, tmp_path):
    """Uniform grids repack into the ggml type of their grid: 4-bit linears Q4_0, 5-bit experts Q5_0, the 8-bit
    embedding Q8_0, bit for bit; the file type is the type holding most weights."""
    types = check_repacked(arch, run_dir(arch), tmp_path / "q.gguf")
    for gname, t in types.items():
        kind = "experts" if "_exps." in gname else "embedding" if gname == "token_embd.weight" else "linear"
        assert t == {"experts": Q.Q5_0, "embedding": Q.Q8_0, "linear": Q.Q4_0}[kind], gname
    _, kv = read(tmp_path / "q.gguf")
    assert kv["general.file_type"] == (gguf.LlamaFileType.MOSTLY_Q5_0 if arch in MOE_ARCHS
                                       else gguf.LlamaFileType.MOSTLY_Q4_0)


@pytest.mark.parametrize("arch,qtype,fallback", [("llama", "q4_k", Q.Q5_0), ("qwen3_moe", "q2_k", Q.Q4_0)])
def test_run_export_repacks_kquants(arch, qtype, fallback, tokenizer, tmp_path):
    """GGUF-native k-quant checkpoints (widths of 256 and 512, plus rows of 64 that llama.cpp's fallback type
    stores) repack bit for bit: each tensor in its own type, or the fallback where K is not a multiple of 256."""
    from moequant.codecs.config import GgufConfig

    over = dict(hidden_size=256, intermediate_size=512) if arch == "llama" else \
        dict(hidden_size=256, moe_intermediate_size=256)
    model = make_model(arch, **over)
    api.quantize(model, Recipe.uniform(GgufConfig(qtype=qtype, search_steps=2)), progress=False)
    run = api.save(model, tmp_path / "run", tokenizer=tokenizer)
    types = check_repacked(arch, run, tmp_path / "k.gguf")
    tensors, _ = read(tmp_path / "k.gguf")
    for gname, t in types.items():
        k = int(tensors[gname].shape[0])
        assert t == (Q[qtype.upper()] if k % 256 == 0 else fallback), (gname, k, t)
    assert sum(t == Q[qtype.upper()] for t in types.values()) >= 3  # real super-blocks, not only fallbacks


def test_run_kept_type_and_tied_packed_head(tmp_path, tokenizer):
    """--kept-type f16 writes the kept matrices (the head) in F16 and keeps norms F32; a head tied to a
    packed embedding is not written where llama.cpp reads token_embd for it (Gemma 3) and is the same
    blocks again where its loader requires output.weight (Qwen2-MoE, OLMoE)."""
    model = make_model("llama")
    api.quantize(model, run_recipe(model), progress=False)
    run = api.save(model, tmp_path / "run", tokenizer=tokenizer)
    export_gguf(GgufExportJob(str(run), tmp_path / "a.gguf", kept_type="f16"))
    tensors, _ = read(tmp_path / "a.gguf")
    assert tensors["output.weight"].tensor_type == Q.F16 and tensors["output_norm.weight"].tensor_type == Q.F32
    assert same_bits(decoded(tensors["output.weight"]), model.lm_head.weight.detach().half().float())

    for arch in ("gemma3_text", "qwen2_moe"):
        tied = make_model(arch, tie_word_embeddings=True)
        api.quantize(tied, run_recipe(tied), progress=False)
        run = api.save(tied, tmp_path / f"tied_{arch}", tokenizer=tokenizer)
        assert json.loads((run / "config.json").read_text())["quantization_config"]["tied"]
        check_repacked(arch, run, tmp_path / f"t_{arch}.gguf")
        tensors, _ = read(tmp_path / f"t_{arch}.gguf")
        assert tensors["token_embd.weight"].tensor_type == Q.Q8_0
        if arch == "gemma3_text":  # llama.cpp falls back to token_embd
            assert "output.weight" not in tensors
        else:  # llama.cpp's qwen2moe loader requires output.weight: the same bytes
            assert tensors["output.weight"].tensor_type == Q.Q8_0
            assert np.array_equal(np.asarray(tensors["output.weight"].data), np.asarray(tensors["token_embd.weight"].data))


# ------------------------------------------------------------------------------------------------
# UniformTensor.gguf_blocks on its own
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,qtype,scale_dtype", [(4, Q.Q4_0, "float16"), (5, Q.Q5_0, "bfloat16"),
                                                    (8, Q.Q8_0, "float16")])
def test_uniform_gguf_blocks_bit_exact(bits, qtype, scale_dtype):
    """Experts ``[3, 40, 96]`` (rows of three 32-blocks, full code range): ggml bytes that gguf-py decodes to
    exactly ``dequantize()``; bfloat16 scales are exact in float16 here and accepted."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(3, 40, 96, generator=g) * torch.rand(3, 40, 1, generator=g)
    cfg = UniformConfig(bits=bits, group_size=32, symmetric=True, scale_dtype=scale_dtype, clip_search=False)
    qt = UniformTensor.encode(w, cfg)
    t, blocks = qt.gguf_blocks()
    assert t == qtype and blocks.dtype == torch.uint8
    assert tuple(blocks.shape) == (3, 40, 96 // 32 * gguf.GGML_QUANT_SIZES[qtype][1])
    got = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), qtype))
    assert same_bits(got, qt.dequantize())
    assert len(torch.unique(got)) > 2 ** bits  # not a degenerate tensor


@pytest.mark.parametrize("shape,cfg,why", [
    ((8, 64), UniformConfig(bits=4, group_size=64, symmetric=True), "group size 64"),
    ((8, 80), UniformConfig(bits=4, group_size=32, symmetric=True), "group size 32 over rows of 80"),
    ((8, 64), UniformConfig(bits=3, group_size=32, symmetric=True), "3-bit codes"),
    ((8, 64), UniformConfig(bits=4, group_size=32, symmetric=True, scale_dtype="float32"), "float32 scales"),
])
def test_uniform_gguf_blocks_refusals(shape, cfg, why):
    qt = UniformTensor.encode(torch.randn(*shape, generator=torch.Generator().manual_seed(0)), cfg)
    with pytest.raises(MoequantError, match=why):
        qt.gguf_blocks()
    asym = UniformAsymTensor.encode(torch.randn(8, 64), UniformConfig(bits=4, group_size=32, symmetric=False))
    with pytest.raises(MoequantError, match="uniform-asym-packed .* has no GGUF equivalent: quantize with"):
        asym.gguf_blocks()


# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------

def test_pre_tokenizer_names():
    """llama.cpp pre-tokenizers chosen by what the tokenizer.json does."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    no_digits = {"model": {"vocab": {"a": 0, "1": 1, "Ġb": 2}}, "pre_tokenizer": byte_level}
    digits = {"model": {"vocab": {"a": 0, "Ġ1": 1}}, "pre_tokenizer": byte_level}
    assert pre_tokenizer_name(no_digits, False, "t") == "smollm"  # splitting digits first changes nothing
    assert pre_tokenizer_name(no_digits, True, "t") == "starcoder"
    assert pre_tokenizer_name(digits, True, "t") == "gpt-2"
    assert pre_tokenizer_name(digits, False, "t") == "gpt-2"  # the split decides; cleanup differs (a warning)
    split = {"type": "Split", "behavior": "Isolated", "invert": False, "pattern": {"Regex": (
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
        "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")}}
    seq = {"type": "Sequence", "pretokenizers": [split, {"type": "ByteLevel", "add_prefix_space": False,
                                                          "use_regex": False}]}
    assert pre_tokenizer_name({"model": {"vocab": {}}, "pre_tokenizer": seq}, False, "t") == "qwen2"
    with pytest.raises(MoequantError, match="no llama.cpp equivalent"):
        pre_tokenizer_name({"model": {}, "pre_tokenizer": {"type": "Metaspace"}}, False, "t")


# ------------------------------------------------------------------------------------------------
# the importance matrix
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_imatrix_is_the_hessian_diagonal(arch, hf_dir, tmp_path):
    """``--imatrix-out``: llama.cpp's GGUF imatrix layout (keys, ``W.in_sum2`` ``[n_mat, K]``, ``W.counts``
    ``[n_mat, 1]``, one entry per weight of the model file with its K and expert count); the sums equal
    Σ x² of each linear's input over the calibration windows, taken here by hooks on one plain forward of
    the whole model; per expert, the counts are the routed tokens and the sums add up to top_k Σ x²."""
    from moequant.calib.data import CalibData, calibration_tokens
    from moequant.models.loader import load_model

    text = tmp_path / "calib.txt"
    text.write_text(toy_lines(toy_words(3000)))
    calib = CalibData(data=str(text), samples=6, seqlen=40, seed=1)
    d = hf_dir(arch)
    out, imx = tmp_path / "m.gguf", tmp_path / "m.imatrix.gguf"
    s = export_gguf(GgufExportJob(str(d), out, types="f16", imatrix_out=imx, calib=calib, calib_batch_size=4))
    model_tensors, _ = read(out)
    r = gguf.GGUFReader(imx)
    kv = {k: f.contents() for k, f in r.fields.items()}
    assert kv["general.type"] == "imatrix" and kv["imatrix.datasets"] == [str(text)]
    assert kv["imatrix.chunk_count"] == 6 and kv["imatrix.chunk_size"] == 40
    data = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in r.tensors}
    names = sorted(n[: -len(".in_sum2")] for n in data if n.endswith(".in_sum2"))
    assert len(data) == 2 * len(names) == 2 * s["imatrix"]["entries"]
    want = sorted(n for n in model_tensors if n.startswith("blk.") and not n.endswith("norm.weight")
                  and not n.endswith(".bias") and ".ffn_gate_inp.weight" not in n)
    assert names == want  # every matrix a calibration token reaches (not the router, which is never quantized)
    for n in names:
        shape = [int(x) for x in model_tensors[n].shape]  # ggml order: K, N[, E]
        n_mat = shape[2] if len(shape) == 3 else 1
        assert tuple(data[f"{n}.in_sum2"].shape) == (n_mat, shape[0]) and tuple(data[f"{n}.counts"].shape) == (n_mat, 1)

    model, tok, _ = load_model(str(d))
    tokens = calibration_tokens(tok, calib)  # [6, 40]
    sums: dict[str, torch.Tensor] = {}
    routed: dict[int, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers.1." in name and not name.endswith("mlp.gate"):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: sums.__setitem__(name, sums.get(name, 0) + a[0].reshape(-1, a[0].shape[-1])
                                                          .double().pow(2).sum(0))))
    if arch in MOE_ARCHS:
        experts = model.model.layers[1].mlp.experts

        def hook(m, args, kwargs):
            v = dict(zip(("hidden_states", "top_k_index"), args)) | kwargs
            x = v["hidden_states"].detach().reshape(-1, v["hidden_states"].shape[-1])  # [T, H]
            routed.setdefault(0, []).append((x, v["top_k_index"].reshape(x.shape[0], -1)))  # [T, k]
        hooks.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        for b in tokens.split(4):
            model(input_ids=b, use_cache=False)
    for h in hooks:
        h.remove()
    n_tok = tokens.numel()
    to_gguf = {"self_attn.q_proj": "attn_q", "self_attn.o_proj": "attn_output", "mlp.down_proj": "ffn_down",
               "mlp.gate_proj": "ffn_gate", "mlp.shared_expert.down_proj": "ffn_down_shexp",
               "mlp.shared_expert.up_proj": "ffn_up_shexp"}
    checked = 0
    for hf, g in to_gguf.items():
        name = f"model.layers.1.{hf}"
        if name not in sums:
            continue
        got = data[f"blk.1.{g}.weight.in_sum2"][0].double()
        torch.testing.assert_close(got, sums[name], rtol=2e-5, atol=0)
        assert data[f"blk.1.{g}.weight.counts"].flatten().tolist() == [n_tok]
        checked += 1
    assert checked == 4
    if arch in MOE_ARCHS:
        xs = torch.cat([x for x, _ in routed[0]])  # [T, H]
        idx = torch.cat([i for _, i in routed[0]])  # [T, k]
        counts = torch.bincount(idx.flatten(), minlength=4).float()
        assert torch.equal(data["blk.1.ffn_gate_exps.weight.counts"].flatten(), counts) and counts.sum() == 2 * n_tok
        gate = data["blk.1.ffn_gate_exps.weight.in_sum2"]
        assert torch.equal(gate, data["blk.1.ffn_up_exps.weight.in_sum2"])
        per_expert = torch.stack([xs[(idx == e).any(-1)].double().pow(2).sum(0) for e in range(4)])
        torch.testing.assert_close(gate.double(), per_expert, rtol=2e-5, atol=0)


# ------------------------------------------------------------------------------------------------
# the command line: refusals, overwrite safety, atomic writes
# ------------------------------------------------------------------------------------------------

def _cli(capsys, *argv):
    rc = main(["-q", "export", "gguf", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_error(se: str) -> str:
    lines = [ln for ln in se.strip().splitlines() if ln.startswith("moequant: error:")]
    assert len(lines) == 1, se
    return lines[0]


def test_cli_export_and_refusals(run_dir, hf_dir, tmp_path, capsys, tokenizer):
    run = run_dir("llama")
    out = tmp_path / "q.gguf"
    rc, so, se = _cli(capsys, run, "--out", out)
    assert rc == 0 and "15 repacked" in so and "Q4_0 x14" in so, se
    rc, _, se = _cli(capsys, run, "--out", out)
    assert rc == 2 and "already exists" in _one_error(se)
    rc, _, se = _cli(capsys, run, "--out", out, "--overwrite")
    assert rc == 0
    notours = tmp_path / "notes.txt"
    notours.write_text("keep me")
    rc, _, se = _cli(capsys, run, "--out", notours, "--overwrite")
    assert rc == 2 and "is not a GGUF file" in _one_error(se) and notours.read_text() == "keep me"
    rc, _, se = _cli(capsys, run, "--out", tmp_path / "x.gguf", "--types", "q8_0")
    assert rc == 2 and "is a moequant checkpoint" in _one_error(se)
    rc, _, se = _cli(capsys, hf_dir("llama"), "--out", tmp_path / "x.gguf", "--kept-type", "f16")
    assert rc == 2 and "--kept-type applies to moequant checkpoints" in _one_error(se)
    rc, _, se = _cli(capsys, run, "--out", tmp_path / "nodir" / "sub" / "x.gguf")
    assert rc == 0  # missing parents are created
    rc, _, se = _cli(capsys, run, "--out", tmp_path)
    assert rc == 2 and "is a directory" in _one_error(se)
    rc, _, se = _cli(capsys, run, "--out", tmp_path / "x.gguf", "--imatrix-out", tmp_path / "x.imatrix")
    assert rc == 2 and "keeps no Hessians" in _one_error(se)
    rc, _, se = _cli(capsys, hf_dir("llama"), "--out", tmp_path / "x.gguf", "--calib", "ptb")
    assert rc == 2 and "--calib applies with --imatrix-out" in _one_error(se)
    rc, _, se = _cli(capsys, out, "--out", tmp_path / "x.gguf")
    assert rc == 2 and "is a GGUF file already" in _one_error(se)

    bad = {"asym": Recipe.uniform(UniformConfig(bits=4, group_size=32, symmetric=False, clip_search=False)),
           "nf4": Recipe.uniform(LutConfig(lut="nf4", block_size=32)),
           "g64": Recipe.uniform(sym(4, 64))}
    for name, recipe in bad.items():
        model = make_model("llama")
        api.quantize(model, recipe, progress=False)
        r = api.save(model, tmp_path / f"run_{name}", tokenizer=tokenizer)
        rc, _, se = _cli(capsys, r, "--out", tmp_path / f"{name}.gguf")
        line = _one_error(se)
        assert rc == 2 and "tensor 'model.layers.0." in line and "quantize with" in line, line
        assert not (tmp_path / f"{name}.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf") == ["q.gguf"]
    assert not [p for p in tmp_path.rglob("*") if "moequant" in p.name and "tmp" in p.name]


def test_unmappable_tensor_and_failed_write_leave_nothing(tmp_path, tokenizer, monkeypatch):
    """A dense MLP layer inside Qwen2-MoE has no place in llama.cpp's qwen2moe (its converter fails too);
    a failure while writing removes the temp file and leaves no output."""
    model = make_model("qwen2_moe", mlp_only_layers=[1])
    d = tmp_path / "hf"
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    with pytest.raises(MoequantError, match=r"'model\.layers\.1\.mlp\.(down|gate|up)_proj\.weight' has no place in llama.cpp's"):
        export_gguf(GgufExportJob(str(d), tmp_path / "x.gguf", types="f16"))

    import moequant.export.gguf as mod

    real = mod.encode_float
    calls = []

    def failing(t, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(t, qtype)

    monkeypatch.setattr(mod, "encode_float", failing)
    good = make_model("llama")
    good.save_pretrained(tmp_path / "hf2")
    tokenizer.save_pretrained(tmp_path / "hf2")
    with pytest.raises(OSError, match="disk full"):
        export_gguf(GgufExportJob(str(tmp_path / "hf2"), tmp_path / "y.gguf", types="f16"))
    assert len(calls) == 5 and sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf2"]


@pytest.mark.parametrize("arch,over,why", [
    ("qwen2_moe", {"norm_topk_prob": True}, "never renormalises the top-k routing weights"),
    ("qwen3_moe", {"norm_topk_prob": False}, "always renormalises the top-k routing weights"),
    ("olmoe", {"num_key_value_heads": 2}, "only as many KV heads as query heads"),
    ("gemma3_text", {"query_pre_attn_scalar": 256}, "scales queries by 1/sqrt"),
])
def test_refuses_what_llama_cpp_would_run_differently(arch, over, why, tmp_path, tokenizer):
    """Configs llama.cpp's graph cannot express (it would load the file and run another model) are refused."""
    d = tmp_path / "hf"
    make_model(arch, **over).save_pretrained(d)
    tokenizer.save_pretrained(d)
    with pytest.raises(MoequantError, match=why):
        export_gguf(GgufExportJob(str(d), tmp_path / "x.gguf", types="f16"))
    assert not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------------------------------------------
# a real model, and llama.cpp's own converter (slow)
# ------------------------------------------------------------------------------------------------

def test_zoo_tiny_olmoe_q8_0(tmp_path):
    """The trained tiny OLMoE of the zoo (when cached): Q8_0 matrices decoding as gguf-py rounds them."""
    from moequant.zoo.fetch import cache_root

    d = cache_root() / "models" / "tiny-olmoe"
    if not (d / "model.safetensors").is_file():
        pytest.skip("tiny-olmoe is not built here (moequant zoo build tiny-olmoe)")
    s = export_gguf(GgufExportJob(str(d), tmp_path / "o.gguf", types="q8_0"))
    tensors, kv = read(tmp_path / "o.gguf")
    state = load_file(d / "model.safetensors")  # per-expert names on disk
    e3 = state["model.layers.3.mlp.experts.5.up_proj.weight"].float()
    want = gguf.quants.dequantize(gguf.quants.quantize(e3.numpy(), Q.Q8_0), Q.Q8_0)
    assert same_bits(decoded(tensors["blk.3.ffn_up_exps.weight"])[5], torch.from_numpy(want))
    assert kv["general.architecture"] == "olmoe" and s["types"]["Q8_0"] > 0 and not s["fallbacks"]


LLAMA_CPP = os.environ.get("MOEQUANT_LLAMA_CPP")  # a llama.cpp source tree (convert_hf_to_gguf.py)


@pytest.mark.slow
@pytest.mark.skipif(not LLAMA_CPP, reason="set MOEQUANT_LLAMA_CPP to a llama.cpp tree to compare with its converter")
@pytest.mark.parametrize("alias,types", [("smollm2-135m", "f32"), ("qwen2.5-coder-0.5b", "q8_0")])
def test_same_bytes_as_llama_cpp_converter(alias, types, tmp_path):
    """Our float export and ``convert_hf_to_gguf.py`` (run with MOEQUANT_CONVERTER_PYTHONPATH on its path,
    e.g. for sentencepiece) write the same tensors byte for byte and the same keys, except SmolLM2's
    ``add_bos_token = false`` that the converter writes for any llama model of 49152 tokens (llama.cpp's
    default for its pre-tokenizer is the same)."""
    from moequant.models.loader import resolve_model_spec

    src = resolve_model_spec(alias).path
    ref = tmp_path / "ref.gguf"
    env = {**os.environ, "PYTHONPATH": os.environ.get("MOEQUANT_CONVERTER_PYTHONPATH", "")}
    subprocess.run([sys.executable, str(Path(LLAMA_CPP) / "convert_hf_to_gguf.py"), src, "--outtype", types,
                    "--outfile", str(ref)], check=True, env=env, capture_output=True)
    export_gguf(GgufExportJob(alias, tmp_path / "ours.gguf", types=types))
    ta, ka = read(ref)
    tb, kb = read(tmp_path / "ours.gguf")
    ka = {k: v for k, v in ka.items() if not k.startswith("GGUF.")}
    kb = {k: v for k, v in kb.items() if not k.startswith("GGUF.")}
    if alias == "smollm2-135m":
        assert ka.pop("tokenizer.ggml.add_bos_token") is False
    assert ka == kb
    assert sorted(ta) == sorted(tb)
    for n, t in ta.items():
        assert t.tensor_type == tb[n].tensor_type and np.array_equal(np.asarray(t.data).view(np.uint8),
                                                                     np.asarray(tb[n].data).view(np.uint8)), n
