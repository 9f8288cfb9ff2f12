"""The C++ trellis kernels (``moequant-trellis``) against the pure-torch reference: the decode is bit-identical
for every code, tail-biting on and off, 2-4 bits and odd tile geometries; the fused GEMV equals decode +
``F.linear`` up to float32 reordering; ``linear`` takes the reference where the fast path does not apply.

Tensors come from random packed words (``from_parts``): every word sequence is a valid stream, and the
encoder's own agreement with the op is in ``test_trellis_op.py``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import cpp_extensions_disabled
import moequant.kernels.trellis as kt
from moequant.codecs.config import TrellisConfig
from moequant.codecs.trellis import code_values, words_per_tile
from moequant.formats.trellis import TrellisTensor
from moequant.kernels.select import reference_kernels

pytestmark = pytest.mark.usefixtures("one_thread")

# GEMV tolerance: float32 sums in another order (8 partial sums per row, the row scale applied to the sum);
# each product is exact to 2^-24 and a K-term sum in any order is within ~K·2^-24 of the exact one, so
# |gemv - reference| <= RTOL · (|x| · |Ŵ|ᵀ) with room to spare at K <= 1024. A wrong state, sign, scale,
# wrap-around or stream offset is off by O(1) of that bound (test_a_wrong_kernel_fails).
RTOL = 1e-5


@pytest.fixture(scope="module")
def ext():
    mod = kt.extension()
    if mod is None:
        pytest.skip("the moequant-trellis C++ kernels cannot be built here (no compiler)")
    return mod


def _cfg(code: str, bits: int, tb: bool = True, tile: int = 16, L: int = 16) -> TrellisConfig:
    return TrellisConfig(bits=bits, L=L, V=2 if code == "hyb" else 1, tile=tile, code=code, Q=9 if L > 9 else 5,
                         tail_biting=tb)


def _random_tensor(shape: tuple[int, ...], cfg: TrellisConfig, seed: int = 0) -> TrellisTensor:
    """A packed tensor ``shape [..., N, K]`` with random words, fp16 row scales in [0.5, 1.5) and (hyb) a
    random fp16 LUT."""
    g = torch.Generator().manual_seed(seed)
    *lead, n, k = shape
    words = torch.randint(0, 1 << 16, (*lead, n // cfg.tile, k // cfg.tile, words_per_tile(cfg)), generator=g,
                          dtype=torch.int32).to(torch.uint16)
    parts = {"words": words, "scale": (torch.rand(*lead, n, generator=g) + 0.5).half()}
    if cfg.code == "hyb":
        parts["lut"] = torch.randn(1 << cfg.Q, 2, generator=g).half()
    return TrellisTensor.from_parts(shape, parts, cfg)


def _parts(qt: TrellisTensor):
    return qt.data["words"], qt.data["scale"], qt.data.get("lut")


def _args(cfg: TrellisConfig) -> tuple:
    return cfg.bits, cfg.L, cfg.V, cfg.tile, cfg.code, cfg.Q, cfg.tail_biting


def _assert_gemv_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None):
    """y [..., N] against x [..., K] @ w [N, K]ᵀ (+ bias) computed in float64, within RTOL · (|x| · |w|ᵀ)."""
    want = x.double() @ w.double().T + (0 if bias is None else bias.double())
    bound = RTOL * (x.double().abs() @ w.double().abs().T) + 1e-30
    err = (y.double() - want).abs()
    assert bool((err <= bound).all()), f"max error {float(err.max()):.3g}, worst ratio {float((err / bound).max()):.3g}"


# --- decode ------------------------------------------------------------------------------------------
DECODE_CASES = [(code, bits, tb) for code in ("hyb", "1mad", "3inst") for bits in (2, 3, 4) for tb in (True, False)]


@pytest.mark.parametrize("code,bits,tb", DECODE_CASES, ids=lambda v: str(v))
def test_decode_is_bit_identical(ext, code, bits, tb):
    cfg = _cfg(code, bits, tb)
    for shape in ((32, 48), (64, 576)):
        qt = _random_tensor(shape, cfg, seed=bits)
        words, scale, lut = _parts(qt)
        want = kt.reference(words, scale, lut, cfg)  # [N, K]
        got = ext.decode(words, scale, lut, *_args(cfg))
        assert got.dtype == torch.float32 and torch.equal(got.view(torch.int32), want.view(torch.int32))
        assert torch.equal(kt.dequant(words, scale, lut, cfg).view(torch.int32), want.view(torch.int32))  # the op


@pytest.mark.parametrize("cfg", [_cfg("hyb", 2, tile=8), _cfg("3inst", 3, tile=4), _cfg("1mad", 2, False, tile=4, L=10),
                                 _cfg("hyb", 3, tile=2, L=10), _cfg("1mad", 4, tile=6, L=12), _cfg("hyb", 1, tile=16, L=24)],
                         ids=lambda c: f"{c.short_name}-t{c.tile}-tb{int(c.tail_biting)}")
def test_decode_other_geometries(ext, cfg):
    """Vector paths for 8 | tile, the buffered path (tile 4), scalar ones (tiles 2 and 6; a 12-bit tail-biting
    cycle that ends inside a word), a free start at tile 4, L = 24."""
    qt = _random_tensor((cfg.tile * 3, cfg.tile * 5), cfg)
    words, scale, lut = _parts(qt)
    want = kt.reference(words, scale, lut, cfg)
    assert torch.equal(ext.decode(words, scale, lut, *_args(cfg)).view(torch.int32), want.view(torch.int32))
    x = torch.randn(3, cfg.tile * 5, generator=torch.Generator().manual_seed(1))
    _assert_gemv_close(ext.gemv(x, words, scale, lut, None, *_args(cfg)), x, want)


@pytest.mark.parametrize("code,L", [("hyb", 16), ("1mad", 20), ("3inst", 20)])
def test_every_state_value(ext, code, L):
    """The kernels' codes of every state, scalar and vector paths, equal ``codecs.trellis.code_values`` (1mad:
    all 1021 byte sums; 3inst: the fp16 add's rounding, done without fp16 instructions in the vector path)."""
    cfg = _cfg(code, 2, L=L)
    lut = torch.randn(1 << cfg.Q, 2, generator=torch.Generator().manual_seed(0)).half() if code == "hyb" else None
    states = torch.arange(1 << L)
    want = code_values(cfg, None if lut is None else lut.float()).view(torch.int32)
    for vector in (False, True) if ext.has_avx2() else (False,):
        got = ext.code_values(states, lut, cfg.bits, cfg.L, cfg.V, cfg.code, cfg.Q, vector)
        assert torch.equal(got.view(torch.int32), want), f"vector={vector}"


def test_expert_stack_and_threads(ext):
    """Experts of a stacked tensor (``select``) decode through the op as the reference does, with 2 threads."""
    cfg = _cfg("hyb", 2)
    qt = _random_tensor((3, 48, 64), cfg, seed=5)  # [E, N, K]
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        full = qt.dequantize()  # [E, N, K], each expert through moequant::trellis_dequant
        for e in range(3):
            one = qt.select(e)
            want = kt.reference(*_parts(one), cfg)
            assert torch.equal(full[e], want) and torch.equal(one.dequantize(), want)
            x = torch.randn(2, 64, generator=torch.Generator().manual_seed(e))
            _assert_gemv_close(one.linear(x), x, want)
    finally:
        torch.set_num_threads(n)


# --- linear ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code,bits", [("hyb", 2), ("hyb", 4), ("1mad", 3), ("3inst", 2)])
@pytest.mark.parametrize("m", [1, 3, 64])
def test_linear_matches_reference(ext, code, bits, m):
    cfg = _cfg(code, bits)
    qt = _random_tensor((64, 576), cfg, seed=m)
    g = torch.Generator().manual_seed(m + 1)
    x = torch.randn(m, 576, generator=g)
    bias = torch.randn(64, generator=g)
    w = kt.reference(*_parts(qt), cfg)  # [N, K]
    y = qt.linear(x, bias)
    assert y.shape == (m, 64) and y.dtype == torch.float32
    _assert_gemv_close(y, x, w, bias)  # M > GEMV_MAX_ROWS: blocks of decoded rows through torch's GEMM
    x3 = x.reshape(1, m, 576)  # leading dims are kept
    assert qt.linear(x3).shape == (1, m, 64)


def test_linear_other_dtypes_decode_then_matmul(ext):
    cfg = _cfg("hyb", 2)
    qt = _random_tensor((32, 48), cfg)
    x = torch.randn(2, 48).to(torch.bfloat16)
    with reference_kernels():
        want = qt.linear(x)
    got = qt.linear(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_reference_paths(ext, monkeypatch):
    """Reference mode and a missing extension both give exactly the reference's result, without the C++ path."""
    cfg = _cfg("hyb", 2)
    qt = _random_tensor((32, 48), cfg)
    x = torch.randn(1, 48)
    want = kt.linear_reference(x, *_parts(qt), None, cfg)

    def boom(*a, **k):
        raise AssertionError("the C++ path was taken")

    monkeypatch.setattr(kt, "linear_packed", boom)
    with reference_kernels():
        assert torch.equal(qt.linear(x), want)
    with cpp_extensions_disabled(monkeypatch):
        assert kt.extension() is None
        assert torch.equal(qt.linear(x), want)
        assert torch.equal(qt.dequantize(), kt.reference(*_parts(qt), cfg))


def test_the_op_and_its_fake(ext):
    cfg = _cfg("1mad", 2)
    qt = _random_tensor((32, 48), cfg)
    x = torch.randn(2, 48)
    y = torch.ops.moequant.trellis_linear(x, *_parts(qt), None, *_args(cfg))
    assert torch.equal(y, qt.linear(x))  # same C++ kernel, same order
    words, scale, _ = _parts(qt)
    meta = torch.ops.moequant.trellis_linear(x.to("meta"), words.to("meta"), scale.to("meta"), None, None, *_args(cfg))
    assert meta.shape == (2, 32) and meta.device.type == "meta"


def test_cache_follows_the_tensors(ext):
    """The prepared C++ matrix cached on a tensor is rebuilt when its LUT changes in place (fine-tuning)."""
    cfg = _cfg("hyb", 2)
    qt = _random_tensor((32, 48), cfg)
    x = torch.randn(1, 48)
    qt.linear(x)
    qt.data["lut"].mul_(2)
    _assert_gemv_close(qt.linear(x), x, kt.reference(*_parts(qt), cfg))


def test_a_wrong_kernel_fails(ext):
    """The checks above catch the bugs a kernel could have: a tail-biting stream read without its wrap (zeros
    after the end instead of its start again), or read one word off."""
    cfg = _cfg("hyb", 2)
    qt = _random_tensor((32, 48), cfg)
    words, scale, lut = _parts(qt)
    w = kt.reference(words, scale, lut, cfg)
    x = torch.randn(1, 48)
    no_wrap = torch.cat([words, torch.zeros_like(words[..., :1])], -1)  # the free-start layout: 33 words
    wrong_decode = ext.decode(no_wrap, scale, lut, *_args(_cfg("hyb", 2, tb=False)))
    assert not torch.equal(wrong_decode, w)
    for wrong in (ext.gemv(x, no_wrap, scale, lut, None, *_args(_cfg("hyb", 2, tb=False))),
                  ext.gemv(x, words.roll(1, -1), scale, lut, None, *_args(cfg))):
        with pytest.raises(AssertionError):
            _assert_gemv_close(wrong, x, w)
