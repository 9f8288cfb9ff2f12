"""The tiny OLMoE fixtures: ``moequant zoo build tiny-olmoe`` / ``tiny-olmoe-collapsed``.

No MoE weights exist in any package registry, so the project trains its own small
``transformers.OlmoeForCausalLM`` on real text (PTB train + Shakespeare train) on the CPU:

- a byte-level BPE tokenizer trained here (``tokenizers``), with ``<|bos|>``, ``<|eos|>``, ``<|pad|>``;
  it adds no special tokens by itself: every training sequence is ``[BOS] + seq_len-1`` text tokens,
  so an evaluator should prepend ``bos_token_id`` to every window the same way;
- ``tiny-olmoe`` trains with a load-balancing loss, ``tiny-olmoe-collapsed`` without one (its routing
  collapses: experts that receive no tokens, the test case for starved-expert handling).

The balance loss is the Switch / OLMoE one computed **per layer** and averaged over layers. We do not
use transformers' ``load_balancing_loss_func`` for training: it pools the assignment fractions and
router probabilities of all layers before multiplying, so each layer can be unbalanced as long as the
pool is balanced. Its value is still logged (``aux_loss_transformers``). The saved ``config.json`` has
``output_router_logits=False`` so that a loss computed from the reloaded model is the plain LM loss.

Everything is deterministic given the seed (same machine, same torch thread count).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from moequant.errors import MoequantError
from moequant.fsutil import AtomicDir, atomic_write_json, is_empty_dir, read_json_object
from moequant.zoo.manifest import write_manifest

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


@dataclass(frozen=True)
class TinyOlmoeConfig:
    """Architecture and training hyperparameters of one tiny OLMoE variant."""

    # architecture
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 512  # per expert
    num_layers: int = 4
    num_experts: int = 8
    top_k: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 1024
    # training
    seq_len: int = 256  # BOS + 255 text tokens
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int = 20
    weight_decay: float = 0.1  # matrices only, not norms
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    # bf16 autocast of the training forward: ~1.4x faster on CPUs with native bf16 (AVX512-BF16/AMX), but
    # 15x *slower* on AVX2-only CPUs (emulated: 33 s vs 2.2 s per step measured on a 2-core EPYC), and it
    # makes the build depend on the CPU. Off: the fixture trains in fp32 everywhere.
    bf16_autocast: bool = False
    router_aux_loss_coef: float = 0.01  # 0.0: no balance loss (the collapsed variant)
    seed: int = 0
    max_steps: int = 240  # a fixed number of steps, never a time budget: the build must not depend on machine load
    log_every: int = 10
    # data (test splits are refused)
    train_corpora: tuple[tuple[str, str], ...] = (("ptb", "train"), ("shakespeare", "train"))
    valid_corpus: tuple[str, str] = ("ptb", "valid")
    max_train_chars: int | None = None  # cap per training corpus (tests)
    max_valid_chars: int | None = None
    count_seqs: int = 32  # per-expert counts over count_seqs x seq_len tokens of the validation text

    def __post_init__(self) -> None:
        where = "TinyOlmoeConfig"
        if self.hidden_size % self.num_heads:
            raise MoequantError(f"{where}: hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if not 1 <= self.top_k <= self.num_experts:
            raise MoequantError(f"{where}: top_k {self.top_k} must be in [1, num_experts={self.num_experts}]")
        if not 2 <= self.seq_len <= self.max_position_embeddings:
            raise MoequantError(f"{where}: seq_len {self.seq_len} must be in [2, max_position_embeddings]")
        if self.vocab_size < 256 + 3:
            raise MoequantError(f"{where}: vocab_size {self.vocab_size} must exceed 256 bytes + 3 special tokens")
        if self.max_steps < 1 or self.log_every < 1:
            raise MoequantError(f"{where}: max_steps and log_every must be positive")
        for corpus, split in (*self.train_corpora, self.valid_corpus):
            if split == "test":
                raise MoequantError(f"{where}: refusing to train or validate on the test split of {corpus!r}")


VARIANTS: dict[str, TinyOlmoeConfig] = {
    "tiny-olmoe": TinyOlmoeConfig(router_aux_loss_coef=0.01),
    # No balance loss, and a higher learning rate: at lr 1e-3 routing was very skewed (min 35 of 16,384
    # assignments) but no expert was empty after 240 steps; at 3e-3 one expert of layer 3 gets none.
    "tiny-olmoe-collapsed": TinyOlmoeConfig(router_aux_loss_coef=0.0, lr=3e-3),
}


# ---------------------------------------------------------------- tokenizer and data


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Deterministic byte-level BPE (``tokenizers``) as a ``transformers.PreTrainedTokenizerFast``.

    Special tokens ``<|bos|>`` (id 0), ``<|eos|>`` (1), ``<|pad|>`` (2); none is added on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((line for text in texts for line in text.splitlines(keepends=True)), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=1024)


def encode_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` (no special tokens), encoded line by line and concatenated: [N] int64."""
    lines = text.splitlines(keepends=True)
    encs = tokenizer.backend_tokenizer.encode_batch(lines, add_special_tokens=False)
    return torch.tensor([i for e in encs for i in e.ids], dtype=torch.long)  # [N]


def make_windows(ids: torch.Tensor, seq_len: int, bos_id: int) -> torch.Tensor:
    """Non-overlapping windows ``[BOS] + seq_len-1 tokens``; the remainder is dropped: [W, seq_len]."""
    body = seq_len - 1
    w = ids.numel() // body
    chunks = ids[: w * body].view(w, body)  # [W, seq_len-1]
    return torch.cat([torch.full((w, 1), bos_id, dtype=ids.dtype), chunks], dim=1)  # [W, seq_len]


# ---------------------------------------------------------------- math


def lr_at(step: int, cfg: TinyOlmoeConfig) -> float:
    """Linear warmup over ``warmup_steps`` then cosine to ``lr * min_lr_ratio`` at ``max_steps`` (step from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch/OLMoE balance loss per layer, averaged over layers: ``E * sum_e f_e * P_e`` with ``f_e`` the
    fraction of top-k assignments to expert e and ``P_e`` its mean router probability. 1.0 when balanced."""
    losses = []
    for logits in router_logits:  # [T, E]
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        num_experts = probs.shape[-1]
        top = torch.topk(probs, top_k, dim=-1).indices  # [T, k]
        frac = F.one_hot(top, num_experts).sum(dim=(0, 1)).float() / top.numel()  # [E], sums to 1
        losses.append(num_experts * torch.sum(frac * probs.mean(dim=0)))
    return torch.stack(losses).mean()


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits [B, S, V], input_ids [B, S] (the BOS position is never a target)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


# ---------------------------------------------------------------- model


def olmoe_config(cfg: TinyOlmoeConfig, tokenizer):
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k, norm_topk_prob=False, router_aux_loss_coef=cfg.router_aux_loss_coef,
        output_router_logits=False, tie_word_embeddings=False, use_cache=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Mean next-token loss and perplexity over windows [W, S] (tokens = W * (S-1) targets)."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i: i + batch_size]  # [b, S]
        logits = model(input_ids=batch, use_cache=False).logits  # [b, S, V]
        targets = batch[:, 1:].numel()
        total += causal_lm_loss(logits, batch).item() * targets
        n += targets
    loss = total / max(1, n)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": n, "windows": int(windows.shape[0])}


@torch.no_grad()
def expert_counts(model, windows: torch.Tensor, top_k: int, batch_size: int) -> list[list[int]]:
    """Routed top-k assignments per [layer][expert] over every token (BOS included) of windows [W, S]."""
    model.eval()
    counts: torch.Tensor | None = None
    for i in range(0, windows.shape[0], batch_size):
        out = model(input_ids=windows[i: i + batch_size], use_cache=False, output_router_logits=True)
        per_layer = []
        for logits in out.router_logits:  # [T, E]
            top = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1).indices  # [T, k]
            per_layer.append(torch.bincount(top.reshape(-1), minlength=logits.shape[-1]))
        c = torch.stack(per_layer)  # [L, E]
        counts = c if counts is None else counts + c
    assert counts is not None
    return counts.tolist()


# ---------------------------------------------------------------- build


def build_tiny_olmoe(out_dir: Path, variant: str, *, config: TinyOlmoeConfig | None = None,
                     progress: bool = True) -> Path:
    """Train the tiny OLMoE ``variant`` (or ``config``) and save an HF directory at ``out_dir``.

    Written to a temp directory next to ``out_dir`` and renamed into place at the end."""
    if variant not in VARIANTS:
        raise MoequantError(f"unknown tiny OLMoE variant {variant!r} (choose from {', '.join(VARIANTS)})")
    cfg = config or VARIANTS[variant]
    out_dir = Path(out_dir)
    with AtomicDir(out_dir, overwrite=True, what="--out", is_ours=replaceable_build(variant),
                   kind=f"a previous build of {variant} (its training.json) or an empty directory") as tmp:
        _train_into(tmp, out_dir, variant, cfg, progress)
        write_manifest(tmp, {"variant": variant})
    log.info("tiny OLMoE %s saved to %s", variant, out_dir)
    return out_dir


def is_build_of(path: Path, variant: str) -> bool:
    """``path`` holds a tiny OLMoE ``variant`` built by moequant (its ``training.json`` says so)."""
    rec = read_json_object(Path(path) / "training.json")
    return (rec is not None and rec.get("variant") == variant
            and str(rec.get("call", "")).startswith("moequant.zoo.tiny_olmoe.build_tiny_olmoe("))


def replaceable_build(variant: str) -> Callable[[Path], bool]:
    """What a rebuild of ``variant`` may replace: a previous build of it, or an empty directory."""
    return lambda path: is_empty_dir(path) or is_build_of(path, variant)


def _load_corpus(corpus: str, split: str, max_chars: int | None) -> str:
    from moequant.zoo.corpora import load_text

    text = load_text(corpus, split)
    return text if max_chars is None else text[:max_chars]


def _train_into(out: Path, final_dir: Path, variant: str, cfg: TinyOlmoeConfig, progress: bool) -> None:
    """Train and write everything into ``out`` (a temp dir); ``final_dir`` is only recorded."""
    from tqdm.auto import tqdm
    from transformers import OlmoeForCausalLM

    from moequant.runinfo import run_info

    t_start = time.perf_counter()
    train_texts = [_load_corpus(c, s, cfg.max_train_chars) for c, s in cfg.train_corpora]
    valid_text = _load_corpus(*cfg.valid_corpus, cfg.max_valid_chars)

    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    bos = tokenizer.bos_token_id
    train = torch.cat([make_windows(encode_text(tokenizer, t), cfg.seq_len, bos) for t in train_texts])  # [W, S]
    valid = make_windows(encode_text(tokenizer, valid_text), cfg.seq_len, bos)  # [Wv, S]
    if train.shape[0] < cfg.batch_size:
        raise MoequantError(f"TinyOlmoeConfig: only {train.shape[0]} training windows of {cfg.seq_len} tokens, "
                            f"fewer than batch_size {cfg.batch_size} (raise max_train_chars)")
    if valid.shape[0] == 0:
        raise MoequantError(f"TinyOlmoeConfig: validation text {cfg.valid_corpus} too short for one window")
    t_data = time.perf_counter() - t_start
    log.info("tokenizer + data: %.1f s; %d train windows, %d valid windows", t_data, train.shape[0], valid.shape[0])

    torch.manual_seed(cfg.seed)
    model = OlmoeForCausalLM(olmoe_config(cfg, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    gen = torch.Generator().manual_seed(cfg.seed)

    curve: list[dict[str, Any]] = []
    window: list[tuple[float, float, float]] = []
    order = torch.randperm(train.shape[0], generator=gen)
    pos, epochs, steps = 0, 0, 0
    t_train = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, desc=f"train {variant}", disable=not progress, leave=False)
    model.train()
    for step in range(cfg.max_steps):
        if pos + cfg.batch_size > order.numel():
            order, pos, epochs = torch.randperm(train.shape[0], generator=gen), 0, epochs + 1
        batch = train[order[pos: pos + cfg.batch_size]]  # [B, S]
        pos += cfg.batch_size
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            res = model(input_ids=batch, use_cache=False, output_router_logits=True)
        lm = causal_lm_loss(res.logits, batch)
        aux = load_balancing_loss(res.router_logits, cfg.top_k)
        loss = lm + cfg.router_aux_loss_coef * aux if cfg.router_aux_loss_coef else lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        steps = step + 1
        window.append((lm.item(), aux.item(), float(res.aux_loss.detach())))
        if steps % cfg.log_every == 0 or steps == cfg.max_steps:
            curve.append(_curve_point(steps, lr, window))
            window = []
        bar.update(1)
        bar.set_postfix(loss=f"{lm.item():.3f}", aux=f"{aux.item():.3f}")
    bar.close()
    if window:
        curve.append(_curve_point(steps, lr_at(steps - 1, cfg), window))
    train_s = time.perf_counter() - t_train

    valid_metrics = evaluate(model, valid, cfg.batch_size)
    counts = expert_counts(model, valid[: cfg.count_seqs], cfg.top_k, cfg.batch_size)
    log.info("%s: %d steps, train loss %.3f, valid PPL %.1f", variant, steps,
             curve[-1]["loss"], valid_metrics["ppl"])

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for f in out.iterdir():  # save_pretrained may leave the weights owner-only (0600)
        os.chmod(f, 0o644)
    record = {
        "variant": variant,
        "call": f"moequant.zoo.tiny_olmoe.build_tiny_olmoe({str(final_dir)!r}, {variant!r})",
        "argv": sys.argv,
        "config": dataclasses.asdict(cfg),
        "seed": cfg.seed,
        "n_params": n_params,
        "steps": steps,
        "epochs_completed": epochs,
        "tokens_seen": steps * cfg.batch_size * cfg.seq_len,
        "train_windows": int(train.shape[0]),
        "train_tokens_available": int(train.numel()),
        "wall_seconds": {"data": t_data, "train": train_s, "total": time.perf_counter() - t_start},
        "tokens_per_second": steps * cfg.batch_size * cfg.seq_len / max(train_s, 1e-9),
        "final_train_loss": curve[-1]["loss"],
        "loss_curve": curve,
        "valid": {"corpus": list(cfg.valid_corpus), **valid_metrics},
        "expert_counts": counts,
        "expert_counts_tokens": int(min(cfg.count_seqs, valid.shape[0]) * cfg.seq_len),
        "balance_loss": "per-layer Switch loss E*sum(f*P), mean over layers (1.0 = balanced)",
        "bos_per_sequence": True,
        **run_info(),
    }
    atomic_write_json(out / "training.json", record)


def _curve_point(step: int, lr: float, window: list[tuple[float, float, float]]) -> dict[str, Any]:
    n = len(window)
    return {"step": step, "lr": lr, "loss": sum(w[0] for w in window) / n, "aux_loss": sum(w[1] for w in window) / n,
            "aux_loss_transformers": sum(w[2] for w in window) / n}
