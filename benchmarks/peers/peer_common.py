"""Glue shared by the peer scripts: the model and PTB-test windows of our harness, scoring, and the
``ppl.json`` every peer writes (our ``PplResult.to_dict()`` plus ``peer``, ``peer_version``, ``config``,
``bits_per_weight``, ``checkpoint_bytes``, ``command``, ``versions`` …).

Not a script; imported by ``hqq_peer.py``, ``bnb_peer.py``, ``llamacpp_peer.py``, ``fp_check.py``.
The windows are exactly ``moequant eval ppl MODEL --data ptb --max-tokens N``'s: PTB test tokenized once
by the model's tokenizer without special tokens, cut by ``make_windows`` (seqlen 512, stride 512, BOS
prepended as unscored context), each scored token's NLL from the fp32 log-softmax of the logits before it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from moequant.eval.bootstrap import bootstrap_ci
from moequant.eval.perplexity import PplConfig, PplResult, evaluate_perplexity, make_windows, window_nll
from moequant.zoo.corpora import tokenize_corpus
from moequant.runinfo import run_info

log = logging.getLogger("peers")

MODEL = "smollm2-135m"
DATA = "ptb"
SPLIT = "test"
ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "runs" / "peers"
# Decoder linears: what every tool quantizes (embeddings, lm_head (tied), norms stay as loaded).
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def ppl_config(max_tokens: int | None) -> PplConfig:
    """Our default protocol; ``max_tokens`` None/0 = the whole split."""
    return PplConfig(seqlen=512, stride=None, add_bos=True, batch_size=4, max_tokens=max_tokens or None)


def load_fp_model():
    """(fp32 model, tokenizer, HF directory) through moequant's loader: the weights every peer starts from."""
    from moequant.models.loader import load_model

    model, tok, resolved = load_model(MODEL)
    return model, tok, Path(resolved.path)


def ptb_test_ids(tokenizer) -> torch.Tensor:
    from moequant.zoo.corpora import load_text

    return tokenize_corpus(tokenizer, load_text(DATA, SPLIT))  # [n]


def decoder_linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LINEAR_SUFFIXES]


def score_torch(model: torch.nn.Module, ids: torch.Tensor, bos_id: int, max_tokens: int | None) -> PplResult:
    return evaluate_perplexity(model, ids, ppl_config(max_tokens), bos_id, progress=False)


# windows between two writes of a partial score (``score_logits_fn``)
PARTIAL_EVERY = 4


def score_logits_fn(logits_of: Callable[[list[int]], torch.Tensor], ids: torch.Tensor, bos_id: int,
                    max_tokens: int | None, partial: Path | None = None, model_key: str = "") -> PplResult:
    """Same windows and NLL as ``evaluate_perplexity``, for a model outside torch: ``logits_of(tokens)``
    returns logits [L, V] for every position of one window (BOS included).

    ``partial``: a file the windows scored so far are written to every ``PARTIAL_EVERY`` windows, and read back
    at the start when it was written for the same windows and ``model_key`` (an interrupted scoring of a
    1.5B model in llama.cpp is an hour); the caller deletes it once the result is kept."""
    cfg = ppl_config(max_tokens)
    windows = make_windows(ids, cfg.seqlen, cfg.effective_stride, bos_id, cfg.max_tokens)
    key = {"model": model_key, "windows": len(windows), "seqlen": cfg.seqlen, "stride": cfg.effective_stride,
           "bos": bos_id, "ids_sha256": hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()}
    nll, counts = [], []
    if partial is not None and partial.is_file():
        saved = json.loads(partial.read_text())
        if saved.get("key") == key:
            nll, counts = saved["nll"], saved["counts"]
            log.info("%s: %d of %d windows scored before, continuing", partial, len(nll), len(windows))
    t0 = time.time()
    for i, (win, n_scored) in enumerate(windows):
        if i < len(nll):
            continue
        logits = logits_of(win.tolist())  # [L, V]
        nll.append(window_nll(logits, win, n_scored))
        counts.append(n_scored)
        log.info("window %d/%d nll/token %.4f (%.0f s)", i + 1, len(windows), nll[-1] / n_scored, time.time() - t0)
        if partial is not None and (len(nll) % PARTIAL_EVERY == 0 or len(nll) == len(windows)):
            write_json_atomic(partial, {"key": key, "nll": nll, "counts": counts})
    total_nll, total = sum(nll), sum(counts)
    mean = total_nll / total
    return PplResult(ppl=math.exp(mean), nll_mean=mean, ci95=bootstrap_ci(nll, counts), tokens=total,
                     seqlen=cfg.seqlen, stride=cfg.effective_stride, add_bos=cfg.add_bos, n_windows=len(windows),
                     nll_per_window=nll, tokens_per_window=counts, max_tokens=cfg.max_tokens)


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def peer_result(res: PplResult, *, peer: str, peer_version: str | None, config: str,
                config_detail: dict[str, Any], bits_per_weight: float | None, checkpoint_bytes: int | None, seconds: float,
                **extra: Any) -> dict[str, Any]:
    """Our ``PplResult`` JSON shape plus the peer keys ``moequant compare`` reads: ``config`` is the short
    name (``int4-g64``, ``Q4_K_M-imat``; ``compare`` labels the run "<peer> <config>"), the settings go to
    ``config_detail``."""
    info = run_info(sys.argv[1:])
    info["command"] = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    return {"model": MODEL, "data": DATA, "split": SPLIT, **res.to_dict(), "seconds": round(seconds, 2),
            "peer": peer, "peer_version": peer_version, "config": config, "config_detail": config_detail,
            "bits_per_weight": bits_per_weight,
            "checkpoint_bytes": checkpoint_bytes, **extra, **info}


def run_name(tool: str, config: str) -> Path:
    return RUNS / f"{tool}-{config}"


def summary_line(d: dict[str, Any]) -> str:
    lo, hi = d["ci95"]
    bpw = d.get("bits_per_weight")
    return (f"{d.get('peer')} {d.get('config')}: {bpw if bpw is None else round(bpw, 4)} bits/w, "
            f"PPL {d['ppl']:.3f} [{lo:.3f}, {hi:.3f}] over {d['tokens']} tokens")
