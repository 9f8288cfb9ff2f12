"""``AdditiveTensor`` (additive-packed v2): exact packing at the code width, exact decode, every stored bit
counted (codebooks per expert or once when shared), the checkpoint contract and the method entry."""

import pytest
import torch

from moequant.codecs.additive import project_codebooks, reconstruct
from moequant.codecs.additive_search import quantize
from moequant.codecs.config import AdditiveConfig
from moequant.formats.additive import AdditiveTensor, code_bytes, pack_codes, unpack_codes
from moequant.formats.base import check_data
from moequant.formats.bitpack import chunk_geometry
from moequant.formats.methods import METHODS, tensor_class_for
from moequant.formats.registry import FORMATS, encode, from_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(kmeans_iters=4, em_rounds=1, adam_steps=5, search_rounds=1)


def _parts(shape, m, b, g, share, seed=0):
    """Random codes, fp16-exact codebooks and scales for a tensor of ``shape`` (no encoder run)."""
    gen = torch.Generator().manual_seed(seed)
    *lead, n, k = shape
    codes = torch.randint(1 << b, (*lead, n, k // g, m), generator=gen)
    book_lead = () if share == "layer" or not lead else tuple(lead)
    books = torch.randn(*book_lead, m, 1 << b, g, generator=gen).half().float()
    scale = (torch.rand(*lead, n, generator=gen) + 0.1).half().float()
    return {"codes": codes, "codebooks": books, "scale": scale}


@pytest.mark.parametrize("bits", range(1, 17))
def test_codes_pack_at_their_width(bits):
    codes = torch.randint(1 << bits, (3, 37), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, code_bytes(37, bits))
    parts = [min(bits, 8)] + ([bits - 8] if bits > 8 else [])
    chunk_bits = sum(8 * chunk_geometry(p)[1] for p in parts)
    assert 0 <= code_bytes(37, bits) * 8 - 37 * bits < chunk_bits  # only the padding to whole chunks is extra
    assert torch.equal(unpack_codes(packed, bits, 37), codes)


@pytest.mark.parametrize("shape,m,b,g,share", [((5, 24), 2, 8, 8, "expert"), ((3, 5, 24), 2, 8, 8, "expert"),
                                               ((3, 5, 24), 2, 8, 8, "layer"), ((2, 4, 16), 1, 16, 8, "layer"),
                                               ((2, 3, 12), 3, 5, 4, "expert"), ((7, 8), 1, 12, 2, "layer")])
def test_packed_round_trip_is_exact(shape, m, b, g, share):
    cfg = AdditiveConfig(M=m, B=b, g=g, share=share)
    parts = _parts(shape, m, b, g, share)
    qt = AdditiveTensor.from_parts(shape, parts, cfg)
    qt.check_data()
    assert torch.equal(qt.codes(), parts["codes"])
    lead = shape[:-2]
    want = _decode_by_hand(parts, shape, share)
    assert torch.equal(qt.dequantize(), want)
    sd = qt.to_state_dict("w")
    back = from_state_dict(sd, "w", qt.meta())
    assert type(back) is AdditiveTensor and all(torch.equal(back.data[n], qt.data[n]) for n in qt.data)
    assert torch.equal(back.dequantize(), want)
    check_data(AdditiveTensor, shape, AdditiveTensor.check_meta(qt.meta())[1],
               {n: (tuple(t.shape), t.dtype) for n, t in sd_items(sd)})
    if lead:
        for e in range(lead[0]):
            view = qt.select(e)
            assert torch.equal(view.dequantize(), want[e])
            if share == "layer":
                assert view.data["codebooks"] is qt.data["codebooks"]  # the one shared set, no copy
    assert qt.bits_per_weight() == AdditiveTensor.expected_bits_per_weight(shape, cfg)


def _decode_by_hand(parts, shape, share):
    """Ŵ[..., r, jg:(j+1)g] = s[r] · (C_0[b_0] + C_1[b_1] + ...), matrix by matrix, row by row."""
    *lead, n, k = shape
    codes = parts["codes"].reshape(-1, n, *parts["codes"].shape[-2:])  # [E, N, G, M]
    books = parts["codebooks"]
    scale = parts["scale"].reshape(-1, n)
    out = torch.empty(codes.shape[0], n, k)
    for e in range(codes.shape[0]):
        be = books if books.dim() == 3 else books.reshape(-1, *books.shape[-3:])[e]  # [M, C, g]
        for r in range(n):
            groups = [sum((be[m, int(codes[e, r, j, m])] for m in range(1, be.shape[0])), be[0, int(codes[e, r, j, 0])])
                      for j in range(codes.shape[2])]
            out[e, r] = scale[e, r] * torch.cat(groups)
    return out.reshape(shape)


def sd_items(sd):
    return [(k[len("w_"):], t) for k, t in sd.items()]


def test_bits_per_weight_counted_by_hand():
    # 2x8 in groups of 8 on [E=4, N=64, K=128]: 2 code bits per weight, a 16-bit scale per row, and
    # 2 x 256 x 8 float16 codebook values per expert, or once for the layer when shared
    e, n, k = 4, 64, 128
    weights = e * n * k
    codes, scales, books = 2 * weights, 16 * e * n, 2 * 256 * 8 * 16
    for share, book_sets in (("expert", e), ("layer", 1)):
        cfg = AdditiveConfig(M=2, B=8, g=8, share=share)
        qt = AdditiveTensor.from_parts((e, n, k), _parts((e, n, k), 2, 8, 8, share), cfg)
        want = (codes + scales + book_sets * books) / weights
        assert qt.bits_per_weight() == want == AdditiveTensor.expected_bits_per_weight((e, n, k), cfg)
    assert (2 + 16 / 128 + 4 * 65536 / weights, 2 + 16 / 128 + 65536 / weights) == (10.125, 4.125)


def test_decode_of_encode_is_the_codecs_reconstruction():
    torch.manual_seed(0)
    w = torch.randn(3, 8, 16)
    h = torch.eye(16) + 0.5 * torch.ones(16, 16)
    for share in ("expert", "layer"):
        cfg = AdditiveConfig(M=2, B=4, g=4, share=share, **FAST)
        qt = encode(w, cfg, h)
        codes, books, scale = quantize(w, h, cfg)  # the encoder is deterministic: the same parts again
        flat_books = books if books.dim() == 3 else books.reshape(-1, *books.shape[-3:])
        assert torch.equal(qt.dequantize(), reconstruct(codes, flat_books, scale))
        assert torch.equal(qt.codes(), codes)
        assert float((qt.dequantize() - w).pow(2).sum() / w.pow(2).sum()) < 0.5  # a real fit


def test_data_spec_and_metadata():
    spec = AdditiveTensor.data_spec((4, 6, 32), {"M": 2, "B": 8, "g": 8, "share": "layer"})
    assert spec == {"codes": ((4, 6, 8), torch.uint8), "scale": ((4, 6), torch.float16),
                    "codebooks": ((2, 256, 8), torch.float16)}
    spec = AdditiveTensor.data_spec((4, 6, 32), {"M": 1, "B": 16, "g": 8, "share": "expert"})
    assert spec["codes"] == ((4, 6, 8), torch.uint8) and spec["codebooks"] == ((4, 1, 65536, 8), torch.float16)
    with pytest.raises(ValueError, match="K a multiple of 8"):
        AdditiveTensor.data_spec((6, 20), {"M": 2, "B": 8, "g": 8, "share": "expert"})
    meta = {"format": "additive-packed", "format_version": 1, "shape": [4, 6, 32], "M": 2, "B": 17, "g": 8,
            "share": "layer"}
    with pytest.raises(ValueError, match="bits per codebook"):
        AdditiveTensor.check_meta(meta)


def test_refusals():
    cfg = AdditiveConfig(M=1, B=4, g=4)
    parts = _parts((4, 8), 1, 4, 4, "expert")
    with pytest.raises(ValueError, match="out of range"):
        AdditiveTensor.from_parts((4, 8), {**parts, "codes": parts["codes"] + 16}, cfg)
    qt = AdditiveTensor.from_parts((2, 4, 8), _parts((2, 4, 8), 1, 4, 4, "layer"), AdditiveConfig(M=1, B=4, g=4,
                                                                                                   share="layer"))
    with pytest.raises(ValueError, match="are not \\[M, 2\\^B, g\\]"):
        AdditiveTensor((2, 4, 8), {**qt.data, "codebooks": qt.data["codebooks"][None]}, qt.attrs)
    with pytest.raises(TypeError, match="needs an AdditiveConfig"):
        AdditiveTensor.encode(torch.zeros(4, 8), METHODS.get("int").from_flags(lambda n, d: d))


def test_method_entry_builds_the_config_from_flags():
    m = METHODS.get("additive")
    flags = {"codebooks": "1x16", "group": 8, "init": "kmeans", "share": "layer"}
    cfg = m.from_flags(lambda name, default: flags.get(name, default))
    assert cfg == AdditiveConfig(M=1, B=16, g=8, init="kmeans", share="layer")
    assert METHODS.find(cfg) is m and tensor_class_for(cfg) is AdditiveTensor and m.columns is None
    assert FORMATS.get("additive-packed") is AdditiveTensor
    assert m.from_flags(lambda name, default: default) == AdditiveConfig()  # 2x8, g8, beam 8, oa-em, per expert
    with pytest.raises(ValueError, match="is not MxB"):
        m.from_flags(lambda name, default: {"codebooks": "2by8"}.get(name, default))
    with pytest.raises(ValueError, match="--bits 3 does not apply"):
        m.from_flags(lambda name, default: {"bits": 3}.get(name, default))
    assert m.from_flags(lambda name, default: {"bits": 2}.get(name, default)).bits == 2


def test_solver_hands_the_encoder_the_damped_hessian():
    # --solver auto picks "ldlq" for additive (calibrate) and no rotation; solve_tensor then encodes with the
    # whole damped Hessian (no column feedback); rtn encodes without it; act-order has no columns to order
    from moequant.alloc.defaults import auto_incoherence, auto_solver
    from moequant.calib.hessian import damp
    from moequant.errors import MoequantError
    from moequant.solvers.config import SolverConfig
    from moequant.solvers.solve import solve_tensor

    cfg = AdditiveConfig(M=1, B=4, g=4, **FAST)
    assert auto_solver(cfg) == "ldlq" and auto_incoherence("ldlq", [cfg]) == "none"
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    x = torch.randn(64, 16) @ torch.randn(16, 16)
    h = (x.T @ x / 64).double()
    qt, info = solve_tensor(w, cfg, SolverConfig(solver="ldlq", damp=0.05), h, "t")
    assert torch.equal(qt.dequantize(), encode(w, cfg, damp(h, 0.05)).dequantize())
    plain, plain_info = solve_tensor(w, cfg, SolverConfig(solver="rtn"), h, "t")
    assert torch.equal(plain.dequantize(), encode(w, cfg).dequantize())
    assert 0 < info.proxy[0] < plain_info.proxy[0]  # the Hessian-aware search has the lower output error
    with pytest.raises(MoequantError, match="no columns to order"):
        solve_tensor(w, cfg, SolverConfig(solver="ldlq", act_order=True), h, "t")


@pytest.mark.parametrize("m,b", [(2, 8), (1, 12)])
def test_linear_matches_decode_then_matmul(m, b):
    # one input row and sixteen (the kernel's paths are tested in tests/kernels/test_additive_kernel.py)
    shape = (3, 20, 32)
    qt = AdditiveTensor.from_parts(shape, _parts(shape, m, b, 8, "layer", seed=4),
                                   AdditiveConfig(M=m, B=b, g=8, share="layer"))
    view = qt.select(1)  # an expert's view: the shared codebooks, its codes and scales
    bias = torch.randn(20)
    gen = torch.Generator().manual_seed(5)
    for t in (1, 16):
        x = torch.randn(t, 32, generator=gen)
        want = torch.nn.functional.linear(x, view.dequantize(), bias)
        got = view.linear(x, bias)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    y = view.linear(torch.randn(4, 5, 32, dtype=torch.float64))
    assert y.shape == (4, 5, 20) and y.dtype == torch.float64
    with pytest.raises(ValueError, match="needs a 2-D tensor"):
        qt.linear(torch.randn(1, 32))


def _int8_by_hand(books):
    """Each codebook ``[C, g]`` of ``books [..., M, C, g]`` as int8 times a float16 step, done one codebook at a
    time: step = fp16(max |C| / 127), value = round(C / step) in −127..127."""
    flat = books.reshape(-1, *books.shape[-2:])
    q, steps = torch.empty(flat.shape, dtype=torch.int8), torch.empty(flat.shape[0], dtype=torch.float16)
    for i, c in enumerate(flat):
        step = torch.tensor(float(c.abs().max()) / 127).half()
        q[i] = torch.round(c / step.float()).clamp(-127, 127).to(torch.int8)
        steps[i] = step
    return q.reshape(books.shape), steps.reshape(books.shape[:-2])


@pytest.mark.parametrize("shape,m,b,g,share", [((5, 24), 2, 8, 8, "expert"), ((3, 5, 24), 2, 8, 8, "expert"),
                                               ((3, 5, 24), 2, 8, 8, "layer"), ((2, 3, 12), 3, 5, 4, "expert")])
def test_int8_codebooks_store_one_step_per_codebook_and_round_trip_exactly(shape, m, b, g, share):
    cfg = AdditiveConfig(M=m, B=b, g=g, share=share, codebook_bits=8)
    parts = _parts(shape, m, b, g, share)  # float16 codebooks: not on the int8 grid
    qt = AdditiveTensor.from_parts(shape, parts, cfg)
    qt.check_data()
    q, steps = _int8_by_hand(parts["codebooks"])
    assert torch.equal(qt.data["codebooks"], q) and torch.equal(qt.data["codebook_scale"], steps)
    values = q.float() * steps.float()[..., None, None]
    assert float((values - parts["codebooks"]).abs().amax()) <= float(steps.float().max()) / 2  # rounded, not clipped
    want = _decode_by_hand({**parts, "codebooks": values}, shape, share)
    assert torch.equal(qt.dequantize(), want)
    again = AdditiveTensor.from_parts(shape, {**parts, "codebooks": qt.codebook_values()}, cfg)
    assert all(torch.equal(again.data[n], qt.data[n]) for n in qt.data)  # the grid is idempotent
    back = from_state_dict(qt.to_state_dict("w"), "w", qt.meta())
    assert set(back.data) == {"codes", "scale", "codebooks", "codebook_scale"}
    assert all(torch.equal(back.data[n], qt.data[n]) for n in qt.data) and torch.equal(back.dequantize(), want)
    lead = shape[:-2]
    if lead:
        for e in range(lead[0]):
            view = qt.select(e)
            assert torch.equal(view.dequantize(), want[e])
            if share == "layer":
                assert view.data["codebook_scale"] is qt.data["codebook_scale"]
    # every stored bit: codes, a 16-bit scale per row, M x 2^B x g int8 values and M 16-bit steps per set
    *lead, n, k = shape
    mats = 1 if not lead else lead[0]
    sets = 1 if share == "layer" or not lead else mats
    code_bits = mats * n * 8 * code_bytes(k // g * m, b)
    by_hand = (code_bits + 16 * mats * n + sets * m * ((1 << b) * g * 8 + 16)) / (mats * n * k)
    assert qt.bits_per_weight() == by_hand == AdditiveTensor.expected_bits_per_weight(shape, cfg)


def test_int8_codebooks_cut_smollm2_135m_to_2_088_counted_bits():
    # SmolLM2-135M's seven linears per layer (q, o 576x576; k, v 192x576; gate, up 1536x576; down 576x1536), 2x8 g8
    shapes = [(576, 576)] * 2 + [(192, 576)] * 2 + [(1536, 576)] * 2 + [(576, 1536)]
    weights = sum(n * k for n, k in shapes)

    def counted(bits):
        cfg = AdditiveConfig(codebook_bits=bits)
        return sum(AdditiveTensor.expected_bits_per_weight(s, cfg) * s[0] * s[1] for s in shapes) / weights

    rows = sum(n for n, _ in shapes)
    assert counted(16) == pytest.approx(2 + (16 * rows + 7 * 2 * 256 * 8 * 16) / weights) == pytest.approx(2.15307, abs=1e-5)
    assert counted(8) == pytest.approx(2 + (16 * rows + 7 * (2 * 256 * 8 * 8 + 32)) / weights) == pytest.approx(2.08832, abs=1e-5)


def test_encoder_fits_int8_codebooks_on_their_grid():
    torch.manual_seed(0)
    w = torch.randn(2, 24, 32)
    h = torch.eye(32) + 0.5 * torch.ones(32, 32)
    errs = {}
    for bits in (16, 8):
        cfg = AdditiveConfig(M=2, B=5, g=4, share="layer", codebook_bits=bits, **FAST)
        codes, books, scale = quantize(w, h, cfg)
        assert torch.equal(project_codebooks(books, bits), books)  # what the search kept is what is stored
        qt = encode(w, cfg, h)
        assert torch.equal(qt.dequantize(), reconstruct(codes, books, scale))
        d = qt.dequantize() - w
        errs[bits] = float(torch.einsum("enk,kl,enl->", d, h, d))
    assert errs[8] != errs[16] and errs[8] / errs[16] < 1.02  # another fit, as good within 2% (measured ×1.003)


def test_version_1_tensors_read_as_float16_codebooks():
    qt = AdditiveTensor.from_parts((4, 16), _parts((4, 16), 2, 4, 8, "expert"), AdditiveConfig(M=2, B=4, g=8))
    v1 = {k: v for k, v in qt.meta().items() if k != "codebook_bits"} | {"format_version": 1}
    assert AdditiveTensor.check_meta(v1)[1]["codebook_bits"] == 16
    back = from_state_dict(qt.to_state_dict("w"), "w", v1)
    assert back.attrs["codebook_bits"] == 16 and torch.equal(back.dequantize(), qt.dequantize())
    with pytest.raises(ValueError, match="missing attributes \\['codebook_bits'\\]"):
        AdditiveTensor.check_meta({**v1, "format_version": 2})
    with pytest.raises(ValueError, match="version 1 has no 'codebook_bits'"):
        AdditiveTensor.check_meta({**v1, "codebook_bits": 8})
    with pytest.raises(ValueError, match="--codebook-bits 4 is not 16"):
        AdditiveTensor.check_meta({**qt.meta(), "codebook_bits": 4})
