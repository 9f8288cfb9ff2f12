"""ShardReader.read (plain file reads, no mmap) returns exactly what safetensors' own reader returns."""

import pytest
import torch
from safetensors.torch import save_file

from moequant.errors import MoequantError
from moequant.formats.checkpoint import ST_DTYPES, ShardReader


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate(ST_DTYPES):
        base = torch.randn(3, 5, 7, generator=g) * 100
        out[f"t{i}"] = base > 0 if dt is torch.bool else base.to(dt)
    out["scalar"] = torch.tensor(3.5)
    out["empty"] = torch.zeros(0, 4)
    return out


def test_read_matches_safetensors_bit_for_bit(tmp_path):
    ts = _tensors()
    save_file(ts, str(tmp_path / "model.safetensors"))
    r = ShardReader(tmp_path)
    for k, t in ts.items():
        got = r.read(k)
        assert got.dtype == t.dtype and got.shape == t.shape, k
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k
        assert torch.equal(got, r.get(k)), k
    # fresh memory: writing to it does not touch the file or the next read
    a = r.read("t0")
    a.zero_()
    assert torch.equal(r.read("t0"), ts["t0"])


def test_read_truncated_file_names_the_tensor(tmp_path):
    save_file({"a": torch.ones(1000)}, str(tmp_path / "model.safetensors"))
    r = ShardReader(tmp_path)
    r.raw_location("a")  # header cached, then the file loses its tail
    p = tmp_path / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(MoequantError, match="truncated.*'a'"):
        r.read("a")
