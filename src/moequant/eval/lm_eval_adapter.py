"""lm-evaluation-harness (0.4.x) around a model we loaded ourselves: ``HFLM(pretrained=model_obj)``,
so quantized checkpoints run natively through QuantLinear / QuantExperts, and task loading / running
with every seed fixed and the per-example log-likelihoods kept.

Memory: lm-eval's ``HFLM`` scores a batch of (context, continuation) requests from the full logits
``[B, L, V]`` and their log-softmax, although only the continuation positions are read (a few tokens
per request). ``make_lm`` returns a subclass whose log-likelihood path takes the decoder's final hidden
states (``perplexity.ChunkedScorer``: ``logits_to_keep=1``, its head checked against the model's own
logits) and applies the output head at the continuation positions only, a chunk of positions at a time;
everything else follows ``HFLM._loglikelihood_tokens`` (see ``chunked_loglikelihood_tokens``). A model
whose head cannot be reproduced, ``batch_size="auto"`` and seq2seq models take lm-eval's own path.

Needs the ``eval`` extra (``pip install -e ".[eval]"``: lm-eval)."""

from __future__ import annotations

import functools
import logging
import os
import socket
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch
from torch import nn

from moequant.errors import MoequantError
from moequant.eval.tasks_progress import request_key

log = logging.getLogger(__name__)

HUB_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada")
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MoequantError("eval tasks needs lm-eval: pip install -e '.[eval]' (lm-eval 0.4.x)") from None
    return lm_eval


def lm_eval_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("lm_eval")
    except md.PackageNotFoundError:
        return "not installed"


Request = tuple[Any, list[int], list[int]]  # ((context, continuation) strings or None, context ids, continuation ids)


def make_lm(model: nn.Module, tokenizer: Any, batch_size: int = 8, max_length: int | None = None, *,
            chunked: bool = True, chunk_rows: int | None = None):
    """An lm-eval ``HFLM`` over an already loaded causal LM and its tokenizer (CPU or the model's
    device). The tokenizer's own special-token rule applies (SmolLM2 adds no BOS). ``chunked`` (default):
    log-likelihoods from the output head at the continuation positions only (see the module docstring),
    ``chunk_rows`` positions at a time (default ``perplexity.default_chunk_rows(V)``); ``chunked=False``:
    lm-eval's stock ``HFLM``."""
    _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:
        raise MoequantError("eval tasks needs a tokenizer: the model directory has none")
    if batch_size < 1:
        raise MoequantError(f"--batch-size must be >= 1, got {batch_size}")
    device = str(next(model.parameters()).device) if any(True for _ in model.parameters()) else "cpu"
    lm_logger = logging.getLogger("lm_eval.models.huggingface")
    level = lm_logger.level
    lm_logger.setLevel(logging.ERROR)  # "pretrained is not a str" warnings: passing a model object is the point
    cls = _chunked_hflm_class() if chunked else HFLM
    try:
        lm = cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, max_length=max_length)
    finally:
        lm_logger.setLevel(level)
    if chunked:
        lm.chunk_rows = chunk_rows
    return lm


@functools.cache
def _chunked_hflm_class() -> type:
    """``HFLM`` with ``_loglikelihood_tokens`` replaced by ``chunked_loglikelihood_tokens`` (defined on
    first use: lm-eval is an optional dependency)."""
    from lm_eval.models.huggingface import HFLM

    from moequant.eval.perplexity import ChunkedScorer

    class ChunkedHFLM(HFLM):
        """lm-eval's ``HFLM`` whose log-likelihoods never materialise the full logits ``[B, L, V]``."""

        chunk_rows: int | None = None
        _scorer: ChunkedScorer | None = None
        kept: dict[str, tuple[float, bool]] | None = None  # answers of an interrupted run (``eval.tasks_progress``)
        on_batch: Callable[[dict[str, tuple[float, bool]]], None] | None = None  # called with ``kept`` per batch

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            def stock(reqs: list[Request]) -> list[tuple[float, bool]]:
                return super(ChunkedHFLM, self)._loglikelihood_tokens(reqs, disable_tqdm=disable_tqdm,
                                                                      override_bs=override_bs)

            if self.backend != "causal" or not isinstance(self.batch_size, int) or self.world_size != 1:
                return stock(requests)
            if self._scorer is None:
                self._scorer = ChunkedScorer(self.model, self.chunk_rows)
            return chunked_loglikelihood_tokens(self, self._scorer, requests, disable_tqdm, stock)

    return ChunkedHFLM


def _request_groups(requests: list[Request], share_prefix: bool) -> list[list[int]]:
    """Request indices in lm-eval's scoring order, as groups answered by one input row each.

    With ``share_prefix`` (HFLM's ``logits_cache``) requests with the same ``context + continuation[:-1]``
    form one group (they have the same input; their continuations end the same row, e.g. one-token
    answers to one question), its longest continuation first among equals as lm-eval picks it; groups
    are sorted by that request's ``context + continuation``: longest first, then by the token ids (stable),
    as ``HFLM._loglikelihood_tokens`` orders them, so batches hold the same rows."""
    if share_prefix:
        by_key: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            by_key.setdefault(tuple(ctx + cont[:-1]), []).append(i)
        groups = list(by_key.values())
    else:
        groups = [[i] for i in range(len(requests))]
    heads = [max(g, key=lambda i: len(requests[i][2])) for g in groups]  # the first longest continuation
    ordered = sorted(zip(heads, groups),
                     key=lambda hg: (-len(requests[hg[0]][1] + requests[hg[0]][2]),
                                     tuple(requests[hg[0]][1] + requests[hg[0]][2])))
    return [[h] + [i for i in g if i != h] for h, g in ordered]


def chunked_loglikelihood_tokens(lm: Any, scorer: Any, requests: list[Request], disable_tqdm: bool,
                                 stock: Callable[[list[Request]], list[tuple[float, bool]]]
                                 ) -> list[tuple[float, bool]]:
    """``(log-likelihood, is_greedy)`` of every request ``(strings, context ids, continuation ids)``, in
    the order given: what ``HFLM._loglikelihood_tokens`` returns for a causal LM, from the output head
    applied to the continuation positions only.

    As lm-eval does it: the input row of a request is ``(context + continuation)[-(max_length + 1):][:-1]``
    (left truncation), rows are right-padded with id 0 to the longest in the batch, ``lm.batch_size`` rows
    per forward pass in lm-eval's order (``_request_groups``), the model runs under ``lm``'s
    ``mixed_precision_dtype`` autocast, the log-softmax is taken in ``lm.softmax_dtype`` (None: the logits'
    dtype) and summed over the continuation; ``is_greedy``: every continuation token is its position's
    argmax. Each answer goes to ``lm.cache_hook``. When ``scorer`` cannot reproduce the model's logits the
    requests not yet answered go to ``stock`` (lm-eval's own path). ``lm.kept`` (a dict, or None): answers by batch
    index and ``tasks_progress.request_key``; a batch whose requests are all there is taken from it, every scored batch is
    added to it and ``lm.on_batch(kept)`` called (``eval tasks --resume``).

    One difference, on purpose: requests of one ``context + continuation[:-1]`` whose continuations have
    different lengths (not the choices of one question, which share the context) share a row in both,
    but lm-eval 0.4.13 gathers a shorter continuation's log-probabilities from the *first* positions of
    the longest one's (its ``is_greedy`` from the last, right, ones); here every request is scored at its
    own positions, as lm-eval scores it without that sharing (``logits_cache=False``)."""
    from tqdm.auto import tqdm

    from moequant.eval.perplexity import forward_kwargs, head_target_logprobs

    model, device, max_len = lm.model, lm.device, lm.max_length
    kwargs = forward_kwargs(model)
    mixed = lm.mixed_precision_dtype

    def autocast():
        return torch.autocast(device_type=device.type, dtype=mixed) if mixed is not None else nullcontext()

    def head(h: torch.Tensor) -> torch.Tensor:
        with autocast():
            return scorer.head(h)

    groups = _request_groups(requests, lm.logits_cache)
    batches = [groups[k:k + lm.batch_size] for k in range(0, len(groups), lm.batch_size)]
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    kept, on_batch = getattr(lm, "kept", None), getattr(lm, "on_batch", None)  # eval.tasks_progress
    keys = [request_key(r[1], r[2]) for r in requests] if kept is not None else []
    truncated = 0
    pbar = tqdm(total=len(requests), disable=disable_tqdm or lm.rank != 0, desc="Running loglikelihood requests")
    try:
        for nb, batch in enumerate(batches):
            # answered before a kill (keyed with the batch: a request asked twice may sit in two batches)
            if kept is not None and all(f"{nb}:{keys[i]}" in kept for g in batch for i in g):
                for i in (i for g in batch for i in g):
                    out[i] = kept[f"{nb}:{keys[i]}"]
                    if requests[i][0] is not None:
                        lm.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
                    pbar.update(1)
                continue
            rows = []
            for g in batch:
                _, ctx, cont = requests[g[0]]
                if not ctx or not cont or len(cont) > max_len:
                    raise ValueError(f"a request needs a context, a continuation and at most max_length={max_len} "
                                     f"continuation tokens (got {len(ctx)} and {len(cont)})")
                truncated += len(ctx) + len(cont) > max_len + 1
                rows.append((ctx + cont)[-(max_len + 1):][:-1])
            width = max(len(r) for r in rows)
            input_ids = torch.zeros(len(rows), width, dtype=torch.long)  # [B, L] right-padded with 0
            for b, r in enumerate(rows):
                input_ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            input_ids = input_ids.to(device)
            with torch.inference_mode():
                with autocast():
                    hidden = scorer.hidden_states(input_ids, kwargs)  # [B, L, D]
                if hidden is None:
                    if not scorer.told:
                        log.warning("eval tasks: scoring from full logits [B, L, V] (%s)", scorer.reason)
                        scorer.told = True
                    rest = sorted(i for later in batches[nb:] for g in later for i in g)
                    pbar.close()
                    for i, answer in zip(rest, stock([requests[i] for i in rest])):
                        out[i] = answer
                    break
                # continuation tokens of every request of the batch: position p of row b predicts p + 1
                pos, tgt, spans = [], [], []
                for b, g in enumerate(batch):
                    inplen = len(rows[b])
                    for i in g:
                        cont = requests[i][2]
                        spans.append((i, len(tgt), len(cont)))
                        pos.extend(range(b * width + inplen - len(cont), b * width + inplen))
                        tgt.extend(cont)
                flat = hidden.reshape(-1, hidden.shape[-1])  # [B·L, D]
                logp, top = head_target_logprobs(flat, torch.tensor(pos, device=device),
                                                 torch.tensor(tgt, device=device), head, scorer.chunk_rows,
                                                 dtype=lm.softmax_dtype)  # [N], [N]
                del hidden, flat
            for i, start, n in spans:
                answer = (float(logp[start:start + n].sum()), bool(top[start:start + n].all()))
                out[i] = answer
                if requests[i][0] is not None:  # loglikelihood_rolling adds its own per-document entry
                    lm.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                pbar.update(1)
            if kept is not None:
                kept.update({f"{nb}:{keys[i]}": out[i] for i, _, _ in spans})
                if on_batch is not None:
                    on_batch(kept)
    finally:
        pbar.close()
    if truncated:
        log.warning("eval tasks: %d request(s) longer than max_length=%d + 1 tokens: truncated from the left",
                    truncated, max_len)
    assert all(a is not None for a in out)
    return out  # type: ignore[return-value]


def hub_offline_reason() -> str | None:
    """Why the Hugging Face hub is unusable here (an offline variable set, or its host does not
    resolve), or None when it may be reachable."""
    for v in OFFLINE_VARS:
        if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{v}={os.environ[v]}"
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a proxy resolves names for us: let the download itself tell
    old = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(5)
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"{host} does not resolve"
    finally:
        socket.setdefaulttimeout(old)
    return None


def check_hub_tasks(names: list[str], local_hint: str) -> None:
    """Fail in one line, before any model is loaded, when ``names`` need the hub and it is unusable."""
    if not names:
        return
    reason = hub_offline_reason()
    if not reason:
        return
    what = "need" if all(n in HUB_TASKS for n in names) else "are not local tasks; lm-eval's own tasks need"
    raise MoequantError(f"task(s) {', '.join(names)} {what} the Hugging Face hub, which is not reachable here "
                        f"({reason}); local tasks: {local_hint}")


def load_tasks(lm_eval_names: list[str], include_dir: Path | None, include_defaults: bool) -> dict[str, Any]:
    """lm-eval Task objects by name, the requested leaf tasks first, then the subtasks of requested
    groups (datasets are loaded here: hub tasks download now). Errors become one-line ``MoequantError``s."""
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(include_dir) if include_dir else None, include_defaults=include_defaults)
    unknown = [n for n in lm_eval_names if n not in tm.all_tasks]
    if unknown:
        raise MoequantError(f"unknown task(s) {', '.join(unknown)}: neither a local task nor an lm-eval task")
    try:
        loaded = tm.load(lm_eval_names)
    except (ConnectionError, OSError) as e:
        raise MoequantError(f"could not load task(s) {', '.join(lm_eval_names)}: {str(e).splitlines()[0]} "
                            "(the Hugging Face hub is needed for lm-eval's own tasks)") from None
    leaves = loaded["tasks"]  # every leaf task: a group (lambada, ...) is evaluated as its subtasks
    if not leaves:
        raise MoequantError(f"task(s) {', '.join(lm_eval_names)}: lm-eval loaded no task")
    first = {n: leaves[n] for n in lm_eval_names if n in leaves}
    return {**first, **{n: t for n, t in leaves.items() if n not in first}}


def run_tasks(lm: Any, tasks: dict[str, Any], limit: int | None, seed: int) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` zero-shot with every seed set to ``seed``; ``limit`` keeps the first
    N documents of each task in file order. Returns ``{"results": lm-eval's per-task metrics,
    "samples": {task: [samples sorted by doc_id]}}``."""
    lm_eval = _import_lm_eval()

    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.values()), num_fewshot=0, limit=limit,
                                  bootstrap_iters=0, log_samples=True, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed, verbosity="WARNING")
    if out is None:
        raise MoequantError("lm-eval returned no results")
    samples = {name: sorted(s, key=lambda x: x["doc_id"]) for name, s in out["samples"].items()}
    return {"results": out["results"], "samples": samples}


def sample_logliks(sample: dict[str, Any]) -> list[float]:
    """Per-choice log-likelihoods of one lm-eval multiple-choice sample (``resps``: one
    ``[(loglik, is_greedy)]`` per choice)."""
    return [float(r[0][0]) for r in sample["resps"]]
