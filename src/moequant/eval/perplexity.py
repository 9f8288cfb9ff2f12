"""Perplexity of a causal LM over a token stream, with the NLL of every window kept.

Protocol (``make_windows``; the same for every model and every peer):

1. The whole split is tokenized once, without special tokens (``zoo.corpora.tokenize_corpus``), into a stream
   ``t[0..n)``. ``max_tokens`` (if set) keeps only ``t[0..max_tokens)``, from the start.
2. Window ``i`` starts at ``begin_i = i * stride`` and holds the tokens ``t[begin_i .. end_i)`` with
   ``end_i = min(begin_i + seqlen, n)``; windows are made until one reaches the end of the stream
   (``end_i == n``). ``stride`` defaults to ``seqlen``: non-overlapping windows. A final partial
   window is kept and scored on what it has.
3. With ``add_bos`` the BOS id is prepended to every window as context: the model sees
   ``[BOS] + t[begin_i .. end_i)`` (``seqlen + 1`` positions for a full window), BOS is never scored,
   and the window's first token is predicted from BOS alone. Without BOS the model sees
   ``t[begin_i .. end_i)`` and a window's first token cannot be predicted.
4. Scored tokens of window ``i`` are the absolute positions ``[max(prev_end, begin_i + s), end_i)``
   where ``prev_end = end_{i-1}`` (0 for the first window) and ``s = 0`` with BOS, ``1`` without.
   They are always the *last* ``n_scored`` tokens of the window. Consequences:
   - ``stride == seqlen`` with BOS: every token of the stream is scored exactly once;
   - ``stride == seqlen`` without BOS: every token but the first of each window is scored once
     (``n - number_of_windows`` tokens);
   - ``stride < seqlen`` (the Hugging Face sliding protocol): window ``i > 0`` scores only the tokens
     no earlier window scored (its last ``stride`` tokens, fewer at the end), with the
     ``seqlen - stride`` tokens before them as extra context; every token from the first (without
     BOS: from the second) is scored exactly once.
   A window that would score nothing (a final window of one token without BOS) is dropped.
5. Token ``t[j]`` at window position ``p`` is scored with the log-probability the logits at position
   ``p - 1`` give it, in fp32 (``log_softmax`` / cross-entropy). PPL = exp(sum NLL / scored tokens);
   the per-window NLL sums and counts are kept for paired bootstrap comparisons.

Memory: the logits of a whole batch (``B × L × V`` floats: 2 GB for 4 windows of 513 positions and a
262k vocabulary) are never materialised when the model allows it. ``evaluate_perplexity`` runs the model
with ``logits_to_keep=1`` and takes the final hidden states ``[B, L, D]`` from its decoder (a forward hook
on ``get_decoder()``), then applies the output head (``get_output_embeddings()``, called as a module so a
packed head works, plus Gemma's ``final_logit_softcapping``) to the scored positions only, ``chunk_rows``
at a time, with the same fp32 log-softmax (``chunked_window_nll``). The head is checked against the
model's own logits of the last position of every batch; a model whose head it cannot reproduce (another
scaling, no decoder hook, no ``logits_to_keep``) is scored from its full logits as before. ``eval tasks``
(``lm_eval_adapter``) scores its continuations with the same ``ChunkedScorer`` / ``head_target_logprobs``.

Routed experts: on a model with ``QuantExperts`` the result also says how many experts the scoring passes
computed (``experts_computed``: per call, the experts that got at least one token) against a dense pass
(``experts_total``: every expert on every call), in total and per experts module
(``moequant.nn.quant_experts.count_routed_experts``). A batch scored from full logits after the head check
failed (see above) ran the model twice; both passes are counted.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from moequant.eval.bootstrap import bootstrap_ci
from moequant.nn.quant_experts import ExpertCounts, QuantExperts, count_routed_experts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PplConfig:
    """Perplexity protocol: window length, stride (``None`` = ``seqlen``, non-overlapping), BOS
    prepended as unscored context, windows per forward pass, and an optional cap on stream tokens."""

    seqlen: int = 512
    stride: int | None = None
    add_bos: bool = True
    batch_size: int = 4
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.seqlen < (1 if self.add_bos else 2):
            raise ValueError(f"seqlen must be >= {1 if self.add_bos else 2}, got {self.seqlen}")
        if self.stride is not None and not 1 <= self.stride <= self.seqlen:
            raise ValueError(f"stride must be in [1, seqlen={self.seqlen}], got {self.stride}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")

    @property
    def effective_stride(self) -> int:
        return self.seqlen if self.stride is None else self.stride

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PplResult:
    """Perplexity of one run. ``nll_per_window[i]`` is the NLL sum (nats) over the
    ``tokens_per_window[i]`` scored tokens of window ``i``; ``ci95`` is a percentile bootstrap over
    windows (``bootstrap_ci``, 2000 replicates, seed 0). ``experts_*`` (``None`` for a model without
    ``QuantExperts``): the experts computed against a dense pass's, summed and per experts module
    (``{name: {"computed", "total", "calls"}}``)."""

    ppl: float
    nll_mean: float
    ci95: tuple[float, float]
    tokens: int
    seqlen: int
    stride: int
    add_bos: bool
    n_windows: int
    nll_per_window: list[float]
    tokens_per_window: list[int]
    max_tokens: int | None = None
    experts_computed: int | None = None
    experts_total: int | None = None
    experts_per_layer: dict[str, dict[str, int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci95"] = list(self.ci95)
        if self.experts_total is None:  # no QuantExperts: the JSON of a dense model is unchanged
            for key in ("experts_computed", "experts_total", "experts_per_layer"):
                del out[key]
        return out


def expert_totals(counts: dict[str, ExpertCounts]) -> dict[str, Any]:
    """``PplResult``'s ``experts_*`` fields from ``count_routed_experts``' counts (empty for no module)."""
    if not counts:
        return {}
    return {"experts_computed": sum(c.computed for c in counts.values()),
            "experts_total": sum(c.total for c in counts.values()),
            "experts_per_layer": {name: asdict(c) for name, c in counts.items()}}


# ---------------------------------------------------------------- windows (pure)


def make_windows(token_ids: torch.Tensor, seqlen: int, stride: int | None = None, bos_id: int | None = None,
                 max_tokens: int | None = None) -> list[tuple[torch.Tensor, int]]:
    """Cut the stream ``token_ids`` [n] into model inputs by the module's protocol.

    Returns ``(input_ids [L], n_scored)`` per window, ``L = window tokens + (1 if bos_id is not None)``;
    the scored tokens are the last ``n_scored`` of ``input_ids``. ``bos_id=None`` means no BOS."""
    stride = seqlen if stride is None else stride
    if seqlen < 1 or not 1 <= stride <= seqlen:
        raise ValueError(f"need seqlen >= 1 and 1 <= stride <= seqlen, got seqlen={seqlen}, stride={stride}")
    ids = token_ids.reshape(-1).long()  # [n]
    if max_tokens is not None:
        ids = ids[:max_tokens]  # [min(n, max_tokens)]
    n = ids.numel()
    skip_first = 0 if bos_id is not None else 1
    windows: list[tuple[torch.Tensor, int]] = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + seqlen, n)
        n_scored = end - max(prev_end, begin + skip_first)
        body = ids[begin:end]  # [end - begin]
        if bos_id is not None:
            body = torch.cat([body.new_full((1,), bos_id), body])  # [end - begin + 1]
        if n_scored > 0:
            windows.append((body, n_scored))
        prev_end = end
        if end == n:
            break
    return windows


def window_nll(logits: torch.Tensor, input_ids: torch.Tensor, n_scored: int) -> float:
    """NLL sum (fp32, nats) of the last ``n_scored`` tokens of ``input_ids`` [L] under ``logits`` [L, V],
    where ``logits[p]`` predicts ``input_ids[p + 1]``."""
    length = input_ids.numel()
    if not 1 <= n_scored <= length - 1:
        raise ValueError(f"n_scored={n_scored} must be in [1, {length - 1}] for a window of {length} tokens")
    pred = logits[length - 1 - n_scored:length - 1].float()  # [n_scored, V]
    target = input_ids[length - n_scored:].to(pred.device)  # [n_scored]
    return float(F.cross_entropy(pred, target, reduction="sum"))


CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 256 MiB in fp32
MAX_CHUNK_ROWS = 1024


def default_chunk_rows(vocab: int) -> int:
    """Positions whose logits are computed at once: ``CHUNK_ELEMENTS / V``, at most ``MAX_CHUNK_ROWS``
    (the head's weight is read once per chunk, so chunks stay large enough for a GEMM)."""
    return max(1, min(MAX_CHUNK_ROWS, CHUNK_ELEMENTS // max(1, vocab)))


def head_target_logprobs(flat: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                         head: Callable[[torch.Tensor], torch.Tensor], chunk_rows: int,
                         dtype: torch.dtype | None = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``targets`` [N] under the logits ``head(flat[rows])`` ([N] positions of the
    final hidden states ``flat`` [M, D]), and whether each target is the argmax of its position's logits.

    ``head`` ([c, D] -> logits [c, V]) is applied once per distinct row (a row may be scored for several
    targets), ``chunk_rows`` distinct rows at a time, so at most ``chunk_rows × V`` logits exist at once;
    the log-softmax is taken in ``dtype`` (None: the logits' own dtype).
    Returns ``(logp [N] in that dtype, is_argmax [N] bool)``."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    uniq, where = torch.unique(rows, return_inverse=True)  # [U] ascending, [N] index into uniq
    logp_out: torch.Tensor | None = None
    top = torch.zeros(rows.numel(), dtype=torch.bool, device=flat.device)  # [N]
    for start in range(0, uniq.numel(), chunk_rows):
        part = uniq[start:start + chunk_rows]  # [c]
        logp = F.log_softmax(head(flat[part]), dim=-1, dtype=dtype)  # [c, V]
        if logp_out is None:
            logp_out = torch.empty(rows.numel(), dtype=logp.dtype, device=flat.device)  # [N]
        sel = ((where >= start) & (where < start + part.numel())).nonzero().squeeze(1)  # [n] targets here
        local, tgt = where[sel] - start, targets[sel]  # [n], [n]
        logp_out[sel] = logp[local, tgt]
        top[sel] = logp.argmax(dim=-1)[local] == tgt
        del logp
    if logp_out is None:
        logp_out = torch.empty(0, dtype=dtype or flat.dtype, device=flat.device)
    return logp_out, top


def chunked_window_nll(hidden: torch.Tensor, input_ids: torch.Tensor, n_scored: list[int],
                       head: Callable[[torch.Tensor], torch.Tensor], chunk_rows: int) -> list[float]:
    """``window_nll`` of every row of a batch from its final hidden states ``hidden`` [B, L, D]: ``head``
    ([c, D] -> logits [c, V]) is applied to the scored positions only, ``chunk_rows`` positions at a time
    (chunks run across windows; ``head_target_logprobs``), each chunk's NLL in fp32 and the per-window
    sums in float64."""
    batch, length = input_ids.shape
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    rows, targets, owner = [], [], []
    for b, n in enumerate(n_scored):
        if not 1 <= n <= length - 1:
            raise ValueError(f"n_scored={n} must be in [1, {length - 1}] for a window of {length} tokens")
        rows.append(torch.arange(b * length + length - 1 - n, b * length + length - 1))  # [n] predicting rows
        targets.append(input_ids[b, length - n:])  # [n]
        owner.append(torch.full((n,), b))  # [n]
    device = hidden.device
    flat = hidden.reshape(batch * length, hidden.shape[-1])  # [B·L, D]
    rows_t, targets_t, owner_t = (torch.cat(rows).to(device), torch.cat(targets).to(device),
                                  torch.cat(owner).to(device))  # [N] each
    logp, _ = head_target_logprobs(flat, rows_t, targets_t, head, chunk_rows)  # [N] fp32
    sums = torch.zeros(batch, dtype=torch.float64, device=device)  # [B]
    sums.index_add_(0, owner_t, logp.neg().double())
    return sums.tolist()


def _call(model: torch.nn.Module, method: str) -> Any:
    fn = getattr(model, method, None)
    try:
        return fn() if callable(fn) else None
    except (AttributeError, NotImplementedError, ValueError):
        return None


class ChunkedScorer:
    """Final hidden states from the decoder, logits per chunk from the head (see the module docstring;
    also used by ``moequant.eval.lm_eval_adapter``). ``hidden_states`` and ``nll`` return None, and set
    ``reason``, when this model's logits cannot be reproduced that way."""

    def __init__(self, model: torch.nn.Module, chunk_rows: int | None) -> None:
        self.model, self.reason, self.told = model, None, False
        self.decoder, self.lm_head = _call(model, "get_decoder"), _call(model, "get_output_embeddings")
        try:
            takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            takes_keep = False
        if not isinstance(self.decoder, torch.nn.Module) or self.decoder is model or \
                not isinstance(self.lm_head, torch.nn.Module) or not takes_keep:
            self.reason = "no decoder / output head / logits_to_keep"
        config = getattr(model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.softcap = getattr(text, "final_logit_softcapping", None)
        vocab = getattr(text, "vocab_size", None)
        self.chunk_rows = chunk_rows or default_chunk_rows(vocab if isinstance(vocab, int) else 1)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[..., D]`` -> logits ``[..., V]`` as the CausalLM forward computes them."""
        logits = self.lm_head(h)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def hidden_states(self, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """One forward pass of ``input_ids`` [B, L] with ``logits_to_keep=1``: the decoder's final hidden
        states [B, L, D], once ``head`` has reproduced the model's own logits of the last position; None
        (and ``reason`` set) when it does not."""
        if self.reason is not None:
            return None
        captured: list[torch.Tensor] = []

        def keep(_module, _args, out) -> None:
            h = out if isinstance(out, torch.Tensor) else getattr(out, "last_hidden_state", None)
            captured.append(h if h is not None or not isinstance(out, (tuple, list)) else out[0])

        hook = self.decoder.register_forward_hook(keep)
        try:
            logits = self.model(input_ids, logits_to_keep=1, **kwargs).logits  # [B, 1, V]
        finally:
            hook.remove()
        hidden = captured[-1] if captured else None  # [B, L, D]
        if not isinstance(hidden, torch.Tensor) or tuple(hidden.shape[:2]) != tuple(input_ids.shape) \
                or logits.shape[1] != 1:
            self.reason = "the decoder's output is not the final hidden states"
            return None
        mine = self.head(hidden[:, -1:, :]).float()  # [B, 1, V]
        theirs = logits.float()
        if mine.shape != theirs.shape or \
                (mine - theirs).abs().max() > 1e-5 * float(theirs.abs().max()) + 1e-6:
            self.reason = "its output head is not lm_head (+ final_logit_softcapping)"
            return None
        return hidden

    def nll(self, input_ids: torch.Tensor, n_scored: list[int], kwargs: dict[str, Any]) -> list[float] | None:
        hidden = self.hidden_states(input_ids, kwargs)
        if hidden is None:
            return None
        return chunked_window_nll(hidden, input_ids, n_scored, self.head, self.chunk_rows)


# ---------------------------------------------------------------- glue


def _input_device(model: torch.nn.Module) -> torch.device:
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def forward_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    # A KV cache is useless for one scoring pass; only pass the flag to models that know it.
    config = getattr(model, "config", None)
    return {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}


def _batches(windows: list[tuple[torch.Tensor, int]], batch_size: int) -> list[list[int]]:
    """Window indices grouped by input length (order of first appearance), chunked to ``batch_size``."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, (ids, _) in enumerate(windows):
        by_len[ids.numel()].append(i)
    return [idx[k:k + batch_size] for idx in by_len.values() for k in range(0, len(idx), batch_size)]


def evaluate_perplexity(model: torch.nn.Module, token_ids: torch.Tensor, config: PplConfig,
                        bos_id: int | None, progress: bool = True, *, chunk_rows: int | None = None,
                        done: dict[int, float] | None = None,
                        on_batch: Callable[[dict[int, float]], None] | None = None) -> PplResult:
    """Perplexity of ``model`` (``model(input_ids).logits`` -> [B, L, V]) on the stream ``token_ids`` [n].
    ``chunk_rows``: positions whose logits are computed at once (default ``default_chunk_rows(V)``).
    ``done``: summed NLLs of windows an interrupted run already scored (``{window index: nll}``, whole batches
    of the same ``config``): their batches are skipped. ``on_batch(scored)``: called after every batch with all
    the windows scored so far (``eval.ppl_progress`` saves them)."""
    from tqdm.auto import tqdm

    if config.add_bos and bos_id is None:
        raise ValueError("add_bos=True needs a bos_id (the tokenizer has none: pass add_bos=False)")
    windows = make_windows(token_ids, config.seqlen, config.effective_stride,
                           bos_id if config.add_bos else None, config.max_tokens)
    if not windows:
        raise ValueError(f"no window to score in a stream of {token_ids.numel()} tokens")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(ids.numel() for ids, _ in windows)
    if isinstance(max_pos, int) and longest > max_pos:
        log.warning("windows of %d positions exceed the model's max_position_embeddings=%d", longest, max_pos)

    device, kwargs = _input_device(model), forward_kwargs(model)
    nll = [0.0] * len(windows)
    scored = dict(done or {})
    if any(not 0 <= i < len(windows) for i in scored):
        raise ValueError(f"scored windows {sorted(scored)[:3]}... do not index {len(windows)} windows")
    batches = _batches(windows, config.batch_size)
    for i, v in scored.items():
        nll[i] = v
    if scored and any(any(i in scored for i in b) and not all(i in scored for i in b) for b in batches):
        raise ValueError("the scored windows are not whole batches of this batch size")
    todo = [b for b in batches if b[0] not in scored]
    scorer = ChunkedScorer(model, chunk_rows)
    has_experts = any(isinstance(m, QuantExperts) for m in model.modules())
    with torch.inference_mode(), \
            (count_routed_experts(model) if has_experts else contextlib.nullcontext({})) as expert_counts:
        for batch in tqdm(todo, desc="perplexity", unit="batch", disable=not progress,
                          initial=len(batches) - len(todo), total=len(batches)):
            input_ids = torch.stack([windows[i][0] for i in batch]).to(device)  # [B, L]
            sums = scorer.nll(input_ids, [windows[i][1] for i in batch], kwargs)
            if sums is None:
                if not scorer.told:
                    (log.info if scorer.reason.startswith("no ") else log.warning)(
                        "perplexity: scoring from full logits [B, L, V] (%s)", scorer.reason)
                    scorer.told = True
                logits = model(input_ids, **kwargs).logits  # [B, L, V]
                sums = [window_nll(logits[row], input_ids[row], windows[i][1]) for row, i in enumerate(batch)]
                del logits
            for row, i in enumerate(batch):
                nll[i] = sums[row]
                scored[i] = sums[row]
            if on_batch is not None:
                on_batch(scored)
    counts = [n_scored for _, n_scored in windows]
    total_nll, total_tokens = sum(nll), sum(counts)
    nll_mean = total_nll / total_tokens
    result = PplResult(
        ppl=math.exp(nll_mean), nll_mean=nll_mean,
        ci95=bootstrap_ci(nll, counts), tokens=total_tokens, seqlen=config.seqlen,
        stride=config.effective_stride, add_bos=config.add_bos, n_windows=len(windows),
        nll_per_window=nll, tokens_per_window=counts, max_tokens=config.max_tokens, **expert_totals(expert_counts),
    )
    log.info("perplexity %.4f (95%% CI %.4f-%.4f) over %d tokens in %d windows", result.ppl, *result.ci95,
             result.tokens, result.n_windows)
    if result.experts_total:
        log.info("routed experts computed: %d of %d (%.1f%% of a dense pass)", result.experts_computed,
                 result.experts_total, 100.0 * result.experts_computed / result.experts_total)
    return result
