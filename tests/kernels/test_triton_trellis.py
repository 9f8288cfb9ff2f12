"""The Triton kernels of the trellis format (``kernels/triton_trellis.py``) against the pure-torch reference
(``kernels.trellis.reference``: bit-by-bit unpacking), run on CPU tensors by Triton's interpreter
(``TRITON_INTERPRET=1``, set by ``tests/conftest.py`` before the kernels are imported), and on CUDA when a GPU
is present (marked ``gpu``).

The decode must be bit-identical (``torch.equal``). The linear sums float32 products in another order than
``F.linear`` (blocks of 64 columns); measured on these cases under the interpreter, up to ~5e-7 of the
output's scale, so the tolerance is 1e-5 of it. A wrong state, sign, scale or stream offset is O(1e-2) or more
(checked below by corrupting one word).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import OnTestDevice, kernel_x
from moequant.codecs.config import TrellisConfig
from moequant.codecs.trellis import words_per_tile
from moequant.formats.trellis import TrellisTensor
from moequant.kernels import trellis as kt
from moequant.kernels.triton_load import triton_module

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


@pytest.fixture(scope="module")
def tri():
    """``kernels.triton_trellis`` through the lazy loader the ops use: compiled on CUDA, else run by the
    interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports Triton)."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    return OnTestDevice(triton_module("triton_trellis"))


def _cfg(code: str, bits: int, tb: bool, L: int = 12, tile: int = 16) -> TrellisConfig:
    return TrellisConfig(bits=bits, L=L, V=2 if code == "hyb" else 1, tile=tile, code=code, Q=9, tail_biting=tb)


def _args(cfg: TrellisConfig) -> tuple:
    return cfg.bits, cfg.L, cfg.V, cfg.tile, cfg.code, cfg.Q, cfg.tail_biting


def _parts(qt: TrellisTensor) -> tuple:
    return qt.data["words"], qt.data["scale"], qt.data.get("lut")


def _encoded(cfg: TrellisConfig, n: int = 16, k: int = 32, seed: int = 0) -> TrellisTensor:
    """A seeded ``[N, K]`` weight with rows of varied scale, encoded by the codec (Viterbi; tiny and L=12: cheap)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.5 + torch.rand(n, 1, generator=g))  # [N, K]
    return TrellisTensor.encode(w, cfg)


def _random_words(cfg: TrellisConfig, n: int, k: int, seed: int = 0) -> TrellisTensor:
    """Random words (every word sequence is a valid stream), fp16 row scales in [0.5, 1.5), a random fp16 LUT."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(0, 1 << 16, (n // cfg.tile, k // cfg.tile, words_per_tile(cfg)), generator=g,
                          dtype=torch.int32).to(torch.uint16)  # [N/t, K/t, W]
    parts = {"words": words, "scale": (torch.rand(n, generator=g) + 0.5).half()}
    if cfg.code == "hyb":
        parts["lut"] = torch.randn(1 << cfg.Q, 2, generator=g).half()
    return TrellisTensor.from_parts((n, k), parts, cfg)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def _check_decode(tri, qt: TrellisTensor) -> None:
    cfg = qt.config
    words, scale, lut = _parts(qt)
    want = kt.reference(words, scale, lut, cfg)  # [N, K] float32
    got = tri.dequant(words, scale, lut, *_args(cfg))
    assert got.dtype == torch.float32 and torch.equal(got, want), cfg


# --- decode ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", ["hyb", "1mad", "3inst"])
@pytest.mark.parametrize("tb", [True, False], ids=["tail-biting", "free-start"])
def test_decode_of_encoded_weights_is_bit_identical(tri, code, tb):
    for bits in (2, 3, 4):
        _check_decode(tri, _encoded(_cfg(code, bits, tb), seed=bits))


@pytest.mark.parametrize("code", ["hyb", "1mad", "3inst"])
def test_decode_at_l16_is_bit_identical(tri, code):
    """L = 16 (the default) from random words: Viterbi at L = 16 is too slow for a unit test."""
    for bits, tb in ((2, True), (3, False), (4, True)):
        _check_decode(tri, _random_words(_cfg(code, bits, tb, L=16), 48, 80, seed=bits))


@pytest.mark.parametrize("code", ["hyb", "3inst"])
def test_decode_odd_tile(tri, code):
    """A 6x6 tile at 2 bits: the tail-biting stream is 72 bits, so its cycle ends inside a word."""
    cfg = _cfg(code, 2, True, tile=6)
    assert 36 * 2 % 16
    _check_decode(tri, _random_words(cfg, 18, 24, seed=5))


def test_decode_refuses_a_wrong_word_count(tri):
    cfg = _cfg("1mad", 2, True)
    words, scale, _ = _parts(_random_words(cfg, 16, 16))
    with pytest.raises(ValueError, match="words"):
        tri.dequant(words[..., :-1], scale, None, *_args(cfg))


# --- linear ---------------------------------------------------------------------------------------
LINEAR_CASES = [("hyb", 2, True, 16), ("1mad", 3, False, 12), ("3inst", 4, True, 16)]


@pytest.mark.parametrize("code,bits,tb,L", LINEAR_CASES, ids=lambda v: str(v))
def test_linear_matches_reference(tri, code, bits, tb, L):
    cfg = _cfg(code, bits, tb, L=L)
    qt = _random_words(cfg, 80, 144, seed=bits) if L == 16 else _encoded(cfg, 80, 144, seed=bits)
    words, scale, lut = _parts(qt)
    bias = torch.randn(80)
    for m in (1, 5, 20):
        x = kernel_x(m, 144, seed=m)
        want = kt.linear_reference(x, words, scale, lut, bias, cfg)  # [M, N]
        got = tri.linear(x, words, scale, lut, bias, *_args(cfg))
        assert got.shape == want.shape and got.dtype == want.dtype
        assert _rel_err(got, want) < TOL, (cfg, m)


# bf16 activations: GPU only (the interpreter computes bf16 dots wrongly: numpy has no bfloat16)
HALF = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", HALF)
def test_linear_leading_dims_half_and_no_bias(tri, dtype):
    cfg = _cfg("hyb", 2, True)
    words, scale, lut = _parts(_encoded(cfg, 32, 48))
    x = kernel_x(6, 48).reshape(2, 3, 48).to(dtype)
    want = kt.linear_reference(x, words, scale, lut, None, cfg)  # [2, 3, 32] in dtype
    got = tri.linear(x, words, scale, lut, None, *_args(cfg))
    assert got.shape == (2, 3, 32) and got.dtype == dtype
    assert _rel_err(got, want) < 1e-2  # half output rounding (fp16 ~5e-4, bf16 ~4e-3 per element)


def test_a_corrupted_word_is_seen(tri):
    """The comparisons are not vacuous: one flipped word changes the decode and moves the linear's output far
    beyond the tolerance."""
    cfg = _cfg("hyb", 2, True)
    words, scale, lut = _parts(_encoded(cfg, 16, 32))
    bad = words.clone()
    bad[0, 1, 3] ^= 0xFFFF
    want = kt.reference(words, scale, lut, cfg)
    assert not torch.equal(tri.dequant(bad, scale, lut, *_args(cfg)), want)
    x = kernel_x(1, 32)
    ref = kt.linear_reference(x, words, scale, lut, None, cfg)
    assert _rel_err(tri.linear(x, bad, scale, lut, None, *_args(cfg)), ref) > 1e-3


# Compiled for an H100-class GPU (sm_90) by Triton's own compiler and the ptxas it ships, no GPU needed: the
# GPU code path (types, constexpr branches, bf16/fp32 dots) builds, and 1mad divides with div.rn. Runs in a
# child process: with TRITON_INTERPRET=1 set (as here) @triton.jit gives interpreter functions.
# The child script's head, shared with test_triton_trellis_grouped.py: for each case, a one-tile config's geometry.
AOT_PREAMBLE = r"""
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moequant.codecs.config import TrellisConfig
from moequant.codecs.trellis import words_per_tile
from moequant.kernels import triton_trellis as tt

out = {}
for code, bits, L, tb, xdt in json.loads(sys.argv[1]):
    cfg = TrellisConfig(bits=bits, L=L, V=2 if code == "hyb" else 1, code=code, tail_biting=tb)
    words = torch.zeros(1, 1, words_per_tile(cfg), dtype=torch.uint16)
    lut = torch.zeros(1 << cfg.Q, 2) if code == "hyb" else None
    geo = tt._geometry(words, torch.zeros(cfg.tile), lut, cfg)
"""
AOT_SCRIPT = AOT_PREAMBLE + r"""    tensors = {"words_ptr": "*i16", "scale_ptr": "*fp16", "lut_ptr": "*fp32"}
    if xdt is None:
        kernel, sizes = tt._dequant_kernel, dict(BN=64, BK=64)
        sig = dict(tensors, out_ptr="*fp32", N="i32", K="i32", KT="i32")
    else:
        kernel, sizes = tt._linear_kernel, dict(HAS_BIAS=True, IEEE=xdt == "fp32", BM=16, BN=64, BK=64,
                                                GEMV=False)
        sig = dict(x_ptr="*" + xdt, **tensors, bias_ptr="*" + xdt, y_ptr="*" + xdt, M="i32", N="i32", K="i32",
                   KT="i32", sxm="i32", sym="i32", sys="i32", k_chunk="i32")
    consts = dict(geo, **sizes)
    sig.update({name: "constexpr" for name in consts})
    ptx = triton.compile(ASTSource(kernel, sig, consts), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    out[f"{code}-{xdt}"] = {"div.rn": "div.rn.f32" in ptx, "div.full": "div.full" in ptx, "mma": "mma" in ptx}
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    cases = [["hyb", 2, 16, True, None], ["1mad", 3, 12, False, None], ["3inst", 4, 16, True, None],
             ["1mad", 2, 16, True, "fp32"], ["hyb", 2, 16, True, "bf16"]]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # 3.9's default, stated (silences its warning)
    run = subprocess.run([sys.executable, "-c", AOT_SCRIPT, json.dumps(cases)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(got) == {"hyb-None", "1mad-None", "3inst-None", "1mad-fp32", "hyb-bf16"}
    assert got["1mad-None"]["div.rn"] and got["1mad-fp32"]["div.rn"]  # correctly rounded, as the reference
    assert not any(v["div.full"] for v in got.values())
    assert got["hyb-bf16"]["mma"] and not got["1mad-fp32"]["mma"]  # tensor cores for bf16, IEEE FMAs for fp32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ops_route_to_triton():
    """The ops' CUDA kernels: the decode equals the CPU reference bit for bit, the linear within TOL."""
    for cfg in (_cfg("hyb", 2, True, L=16), _cfg("1mad", 3, False, L=16), _cfg("3inst", 4, True, L=16)):
        qt = _random_words(cfg, 256, 512, seed=cfg.bits)
        words, scale, lut = _parts(qt)
        want = kt.reference(words, scale, lut, cfg)
        on_gpu = [t if t is None else t.cuda() for t in (words, scale, lut)]
        got = torch.ops.moequant.trellis_dequant(*on_gpu, *_args(cfg))
        assert got.is_cuda and torch.equal(got.cpu(), want), cfg
        x, bias = kernel_x(3, 512), torch.randn(256)
        y = torch.ops.moequant.trellis_linear(x.cuda(), *on_gpu[:3], bias.cuda(), *_args(cfg))
        assert y.is_cuda and _rel_err(y.cpu(), kt.linear_reference(x, words, scale, lut, bias, cfg)) < TOL, cfg
