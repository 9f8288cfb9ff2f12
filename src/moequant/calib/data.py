"""Calibration token batches: random windows of a training text, drawn with a seeded generator.

Default (DESIGN.md): PTB train, 128 sequences of 512 tokens, seed 0 — never the evaluation text. Each
sequence is ``[BOS] + (seqlen - 1)`` consecutive text tokens when the tokenizer has a BOS token, the
same convention the perplexity harness uses, so the layers see in calibration what they see in
evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moequant.errors import MoequantError


@dataclass(frozen=True)
class CalibData:
    """Where calibration text comes from and how much of it: ``samples`` windows of ``seqlen`` tokens."""

    data: str = "ptb"
    split: str = "train"
    samples: int = 128
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"--calib-samples must be >= 1, got {self.samples}")
        if self.seqlen < 2:
            raise ValueError(f"--calib-seqlen must be >= 2, got {self.seqlen}")

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "split": self.split, "samples": self.samples, "seqlen": self.seqlen,
                "seed": self.seed}


def sample_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int, bos_id: int | None) -> torch.Tensor:
    """``samples`` windows of a token stream ``ids [n]`` -> int64 ``[samples, seqlen]``.

    Start positions are drawn uniformly (with replacement) from a ``torch.Generator`` seeded with
    ``seed``; with ``bos_id`` every window is BOS + ``seqlen - 1`` text tokens.
    """
    body = seqlen - (bos_id is not None)
    n = int(ids.numel())
    if n < body + 1:
        raise MoequantError(f"calibration text has {n} tokens, fewer than one window of {body}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - body + 1, (samples,), generator=gen)  # [S]
    windows = torch.stack([ids[s:s + body] for s in starts.tolist()])  # [S, body]
    if bos_id is not None:
        windows = torch.cat([torch.full((samples, 1), bos_id, dtype=windows.dtype), windows], dim=1)
    return windows.to(torch.long)  # [S, seqlen]


def calibration_tokens(tokenizer: Any, spec: CalibData) -> torch.Tensor:
    """Tokenize ``spec.data``'s ``spec.split`` and draw the windows: int64 ``[samples, seqlen]``."""
    from moequant.zoo.corpora import tokenize_corpus
    from moequant.zoo.corpora import load_text

    ids = tokenize_corpus(tokenizer, load_text(spec.data, spec.split))
    return sample_windows(ids, spec.samples, spec.seqlen, spec.seed, tokenizer.bos_token_id)
