"""benchmarks/finetune_trellis.py: the finetune flags of each ``--methods`` entry (``M-layer`` is method M with
the layer-wise objective) — the command a row records is the command that trained it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from conftest import BENCHMARKS, bench_module


class _Ran(Exception):
    pass


@pytest.mark.parametrize("method, want", [
    ("kd", ["--method", "kd"]),
    ("kd-layer", ["--method", "kd", "--loss", "layer"]),
    ("bcjr", ["--method", "bcjr", "--tau", "0.3:0.05", "--soft-bits", "4"]),
    ("bcjr-layer", ["--method", "bcjr", "--loss", "layer", "--tau", "0.3:0.05", "--soft-bits", "4"]),
    ("ste-layer", ["--method", "ste", "--loss", "layer", "--ste-every", "8"]),
])
def test_method_flags(monkeypatch, tmp_path, method, want):
    m = bench_module(BENCHMARKS / "finetune_trellis.py", "finetune_trellis_bench")
    got = []

    def finetune(run, flags, out):
        got.append((run, flags, out))
        raise _Ran

    monkeypatch.setattr(m, "ensure_ptq", lambda *a: None)
    monkeypatch.setattr(m, "finetune", finetune)
    args = argparse.Namespace(steps=5, lr=1e-3, batch=4, tau="0.3:0.05", soft_bits=4, ste_every=8)
    with pytest.raises(_Ran):
        m.measure_finetune("0,1", method, args, {}, tmp_path)
    run, flags, out = got[0]
    common = ["--layers", "0,1", "--steps", "5", "--lr", "0.001", "--batch", "4"]
    assert flags == want[:2] + common + want[2:]
    assert run == Path(tmp_path / "ptq-L0+1") and out == tmp_path / f"{method}-L0+1"
