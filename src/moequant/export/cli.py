"""``moequant export FORMAT ...``: one subcommand per target, each defined beside its writer.

Every target module exposes ``add_parser(export_subparsers)``; the list below is the one place a target
is wired into the command line."""

from __future__ import annotations

import argparse
import importlib

# module (under moequant.export) -> defines add_parser(subparsers)
TARGETS: tuple[str, ...] = ("compressed_tensors", "gguf")


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="write a model or checkpoint in another engine's format (GGUF, compressed-tensors)")
    esub = e.add_subparsers(dest="export_cmd", required=True, metavar="FORMAT")
    for name in TARGETS:
        importlib.import_module(f"moequant.export.{name}").add_parser(esub)
