"""The ``--calib*`` options shared by every command that reads calibration text (quantize, zoo build moe,
export gguf): one definition, so their names, types and help cannot drift apart."""

from __future__ import annotations

import argparse


def add_calib_arguments(group: argparse._ActionsContainer, *, data_help: str, samples: int, seqlen: int = 512,
                        seed: int = 0, batch_size: bool = True, defer_defaults: bool = False) -> None:
    """``--calib``, ``--calib-samples``, ``--calib-seqlen``, ``--calib-seed`` (and ``--calib-batch-size``).

    ``defer_defaults``: the parsed values stay ``None`` unless given (the command fills them from another
    source, e.g. a base config); the help still states the default the command ends up using."""
    def default(value: int) -> int | None:
        return None if defer_defaults else value

    group.add_argument("--calib", default=None, help=f"calibration text: corpus alias or text file ({data_help})")
    group.add_argument("--calib-samples", type=int, default=default(samples),
                       help=f"calibration windows (default {samples})")
    group.add_argument("--calib-seqlen", type=int, default=default(seqlen), help=f"tokens per window (default {seqlen})")
    group.add_argument("--calib-seed", type=int, default=default(seed),
                       help=f"seed of the window positions (default {seed})")
    if batch_size:
        group.add_argument("--calib-batch-size", type=int, default=8,
                           help="calibration windows per forward pass (default 8)")
