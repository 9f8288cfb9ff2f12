"""CLI: bad input gives one clear line on stderr and a non-zero exit; nothing half-written."""

import json
import math

import pytest
import torch

from conftest import tiny_model
from moequant.cli import main


def _run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_unknown_alias(capsys, tmp_path):
    rc, _, err = _run(capsys, "-q", "quantize", "no-such-model", "--out", str(tmp_path / "o"))
    assert rc == 2 and "unknown model 'no-such-model'" in err and "smollm2-135m" in err
    assert not (tmp_path / "o").exists()


def test_missing_local_path(capsys, tmp_path):
    rc, _, err = _run(capsys, "-q", "quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert rc == 2 and "no such directory" in err


def test_bits_out_of_range(capsys, tmp_path):
    rc, _, err = _run(capsys, "-q", "quantize", "x/y", "--bits", "7", "--out", str(tmp_path / "o"))
    assert rc == 2 and "--bits 7" in err


@pytest.fixture()
def tiny_dir(tmp_path):
    m = tiny_model("olmoe")
    d = tmp_path / "tiny"
    m.save_pretrained(d)
    return d


def test_quantize_inspect_end_to_end(capsys, tmp_path, tiny_dir):
    out = tmp_path / "q"
    rc, stdout, err = _run(capsys, "-q", "quantize", str(tiny_dir), "--bits", "2", "--asym", "--group-size", "32",
                           "--out", str(out))
    assert rc == 0, err
    rep = json.loads((out / "report.json").read_text())
    # every row stores K/4 bytes of codes, K/32 fp16 scales and its K/32 2-bit zeros padded to whole bytes
    def row_bits(k):
        return 2 * k + 16 * (k // 32) + 8 * -(-(2 * (k // 32)) // 8)
    rows = [(math.prod(t["shape"][:-1]), t["shape"][-1]) for t in rep["quantized_tensors"]]
    expected = sum(r * row_bits(k) for r, k in rows) / sum(r * k for r, k in rows)
    assert rep["bits_per_weight"] == pytest.approx(expected, rel=1e-12)
    assert 2.5625 < rep["bits_per_weight"] < 2.8
    assert len(rep["quantized_tensors"]) == 2 * (4 + 2)  # q,k,v,o + 2 expert tensors per layer
    assert {"command", "versions", "config", "kept_tensors"} <= rep.keys()
    rc, stdout, err = _run(capsys, "-q", "inspect", str(out), "--json", str(tmp_path / "i.json"))
    assert rc == 0, err
    info = json.loads((tmp_path / "i.json").read_text())
    assert {"checkpoint_bytes", "resident_bytes", "ideal_bytes"} <= info.keys()
    assert info["resident_bytes"] <= 1.05 * info["ideal_bytes"]
    assert "mlp.experts.gate_up_proj" in stdout
    # existing output directory
    rc, _, err = _run(capsys, "-q", "quantize", str(tiny_dir), "--out", str(out), "--group-size", "32")
    assert rc == 2 and "already exists" in err


def test_group_size_must_divide(capsys, tmp_path, tiny_dir):
    rc, _, err = _run(capsys, "-q", "quantize", str(tiny_dir), "--group-size", "48", "--out", str(tmp_path / "o"))
    assert rc == 2 and "48" in err and "model.layers.0" in err
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]
