"""moequant::trellis_dequant: the op, its pure-torch reference and the encoder's reconstruction agree
bit for bit; the fake implementation gives the right shape."""

import pytest
import torch

from moequant.codecs.config import TrellisConfig
from moequant.codecs.trellis import initial_lut, quantize_matrix
from moequant.formats.trellis import TrellisTensor
from moequant.kernels.trellis import dequant, reference, trellis_dequant

CASES = [TrellisConfig(bits=2, L=10, V=2, tile=16), TrellisConfig(bits=3, L=11, V=1, tile=4, code="1mad"),
         TrellisConfig(bits=2, L=12, V=1, tile=8, code="3inst", tail_biting=False),
         TrellisConfig(bits=3, L=10, V=2, tile=2, Q=6)]  # 12-bit tail-biting tiles: the bitwise path


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.short_name}-t{c.tile}-tb{int(c.tail_biting)}")
def test_op_reference_and_encoder_agree(cfg, one_thread):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 32, 48, generator=g)  # [E, N, K]: two experts
    lut = initial_lut(cfg)
    qt = TrellisTensor.encode(w, cfg)
    words, scale = qt.data["words"], qt.data["scale"]
    luts = qt.data.get("lut")
    for e in range(2):
        _, _, rec = quantize_matrix(w[e], cfg, lut)  # the encoder's own reconstruction [N, K]
        lut_e = None if luts is None else luts[e]
        op = dequant(words[e], scale[e], lut_e, cfg)
        assert op.dtype == torch.float32 and op.shape == (32, 48)
        assert torch.equal(op, rec)
        assert torch.equal(reference(words[e], scale[e], lut_e, cfg), rec)
    assert torch.equal(qt.dequantize(), torch.stack([quantize_matrix(w[e], cfg, lut)[2] for e in range(2)]))


def test_fake_shape_under_meta():
    cfg = CASES[0]
    words = torch.empty(3, 5, 32, dtype=torch.uint16, device="meta")  # 48 x 80 weights
    out = trellis_dequant(words, torch.empty(48, dtype=torch.float16, device="meta"),
                          torch.empty(1 << cfg.Q, 2, dtype=torch.float16, device="meta"), cfg.bits, cfg.L, cfg.V,
                          cfg.tile, cfg.code, cfg.Q, cfg.tail_biting)
    assert out.shape == (48, 80) and out.dtype == torch.float32 and out.device.type == "meta"
