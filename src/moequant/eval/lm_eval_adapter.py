"""lm-evaluation-harness (0.4.x) around a model we loaded ourselves: ``HFLM(pretrained=model_obj)``,
so quantized checkpoints run natively through QuantLinear / QuantExperts, and task loading / running
with every seed fixed and the per-example log-likelihoods kept.

Needs the ``eval`` extra (``pip install -e ".[eval]"``: lm-eval)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import nn

from moequant.errors import MoequantError

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


def make_lm(model: nn.Module, tokenizer: Any, batch_size: int = 8, max_length: int | None = None):
    """An lm-eval ``HFLM`` over an already loaded causal LM and its tokenizer (CPU or the model's
    device). The tokenizer's own special-token rule applies (SmolLM2 adds no BOS)."""
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
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                    max_length=max_length)
    finally:
        lm_logger.setLevel(level)


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
