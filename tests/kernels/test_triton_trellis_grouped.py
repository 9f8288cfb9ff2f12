"""The grouped Triton kernel of trellis expert stacks (``triton_trellis.grouped``: every routed expert of a layer
in one launch) against, per expert, the pure-torch reference (bit-by-bit decode + ``F.linear``) and the
single-matrix Triton linear; run on CPU tensors by Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` before the kernels are imported), and on CUDA when a GPU is present (marked ``gpu``).

Tolerance: that of ``test_triton_trellis.py`` (1e-5 of the output's scale; float32 products summed in blocks of
64 columns; measured on these cases under the interpreter: up to 4.9e-7 from the reference, and bit for bit
the per-expert linear, which a GPU need not reproduce since its row tiles differ). A wrong expert offset (words, scales or LUT of another expert) is O(1): every expert here has its
own random words, scales and LUT; one corrupted word of one expert is checked to move only that expert's rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import OnTestDevice, kernel_x
from test_triton_trellis import AOT_PREAMBLE
from moequant.codecs.config import TrellisConfig
from moequant.codecs.trellis import words_per_tile
from moequant.formats.trellis import TrellisTensor
from moequant.kernels import trellis as kt
from moequant.kernels.triton_load import triton_module
from moequant.nn.quant_experts import QuantExperts, looped_linear, route_by_expert

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


@pytest.fixture(scope="module")
def tri():
    """``kernels.triton_trellis`` through the lazy loader the ops use: compiled on CUDA, else interpreted."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    return OnTestDevice(triton_module("triton_trellis"))


def _cfg(code: str, bits: int, tb: bool, L: int, tile: int = 16) -> TrellisConfig:
    return TrellisConfig(bits=bits, L=L, V=2 if code == "hyb" else 1, tile=tile, code=code, Q=9, tail_biting=tb)


def _args(cfg: TrellisConfig) -> tuple:
    return cfg.bits, cfg.L, cfg.V, cfg.tile, cfg.code, cfg.Q, cfg.tail_biting


def _stack(cfg: TrellisConfig, e_all: int, n: int, k: int, seed: int = 0) -> TrellisTensor:
    """``[E, N, K]`` from random words (every word sequence is a valid stream), fp16 row scales in [0.5, 1.5) and
    (hyb) a different random fp16 LUT per expert."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(0, 1 << 16, (e_all, n // cfg.tile, k // cfg.tile, words_per_tile(cfg)), generator=g,
                          dtype=torch.int32).to(torch.uint16)  # [E, N/t, K/t, W]
    parts = {"words": words, "scale": (torch.rand(e_all, n, generator=g) + 0.5).half()}  # [E, N]
    if cfg.code == "hyb":
        parts["lut"] = torch.randn(e_all, 1 << cfg.Q, 2, generator=g).half()  # [E, 2^Q, 2]
    return TrellisTensor.from_parts((e_all, n, k), parts, cfg)


def _parts(qt: TrellisTensor) -> tuple:
    return qt.data["words"], qt.data["scale"], qt.data.get("lut")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def _sorted_rows(counts: tuple[int, ...], k: int, seed: int = 0) -> torch.Tensor:
    return kernel_x(sum(counts), k, seed=seed)  # [S, K], rows already grouped by expert


def _per_expert(counts, x: torch.Tensor, n: int, linear) -> torch.Tensor:
    """``[S, N]``: rows ``[start, end)`` of expert ``e`` from ``linear(e, x[start:end])``; rows never written stay NaN."""
    y = torch.full((x.shape[0], n), float("nan"))
    start = 0
    for e, c in enumerate(counts):
        if c:
            y[start:start + c] = linear(e, x[start:start + c])
        start += c
    return y


# (code, bits, tail-biting, L, tile, N, K): N and K are not multiples of the kernel's 64-wide blocks; the 6x6
# tail-biting tile at 2 bits is 72 bits a tile, so its cycle ends inside a word (the third stream mode)
CASES = [("hyb", 2, True, 16, 16, 80, 144), ("3inst", 3, False, 12, 16, 80, 144), ("1mad", 2, True, 12, 6, 66, 78)]
# expert 1 and 4 get no rows; expert 2 gets more rows than one 64-row tile
COUNTS = (3, 0, 70, 1, 0)


@pytest.mark.parametrize("code,bits,tb,L,tile,n,k", CASES, ids=lambda v: str(v))
def test_grouped_matches_per_expert_reference_and_linear(tri, code, bits, tb, L, tile, n, k):
    cfg = _cfg(code, bits, tb, L, tile)
    qt = _stack(cfg, len(COUNTS), n, k, seed=bits)
    words, scale, lut = _parts(qt)
    x = _sorted_rows(COUNTS, k)
    lut_e = (lambda e: None) if lut is None else (lambda e: lut[e])

    def ref(e: int, xe: torch.Tensor) -> torch.Tensor:
        return F.linear(xe, kt.reference(words[e], scale[e], lut_e(e), cfg))

    def one(e: int, xe: torch.Tensor) -> torch.Tensor:
        return tri.linear(xe, words[e], scale[e], lut_e(e), None, *_args(cfg))

    got = tri.grouped(x, COUNTS, words, scale, lut, *_args(cfg))  # [S, N]
    want = _per_expert(COUNTS, x, n, ref)
    assert got.shape == (sum(COUNTS), n) and got.dtype == x.dtype and not want.isnan().any()
    assert _rel_err(got, want) < TOL, cfg
    assert _rel_err(got, _per_expert(COUNTS, x, n, one)) < TOL, cfg


TILES = [dict(gemv=True, block_n=16, block_k=64), dict(gemv=True, block_n=32, block_k=128),
         dict(gemv=False, block_n=32, block_k=128), dict(gemv=True, block_n=16, block_k=32, split_k=2),
         dict(gemv=False, block_n=16, block_k=32, split_k=4)]  # K=80 in 32s: the fourth chunk is empty


@pytest.mark.parametrize("tile", TILES, ids=lambda t: "-".join(f"{k}{v}" for k, v in t.items()))
def test_tile_overrides_match_reference(tri, tile):
    """The tiles the GPU benchmark sweeps (``launch_for``'s keywords) give the same products, grouped and single,
    the GEMV body (no ``tl.dot``) on experts with several rows too."""
    cfg = _cfg("hyb", 2, True, 16)
    counts = (1, 0, 3)
    words, scale, lut = _parts(_stack(cfg, len(counts), 48, 80, seed=11))
    x = _sorted_rows(counts, 80, seed=4)

    def ref(e: int, xe: torch.Tensor) -> torch.Tensor:
        return F.linear(xe, kt.reference(words[e], scale[e], lut[e], cfg))

    want = _per_expert(counts, x, 48, ref)
    assert _rel_err(tri.grouped(x, counts, words, scale, lut, *_args(cfg), **tile), want) < TOL, tile
    one = tri.linear(x[1:], words[2], scale[2], lut[2], None, *_args(cfg), **tile)
    assert _rel_err(one, want[1:]) < TOL, tile


def test_grouped_uses_each_experts_own_words(tri):
    """Not vacuous: one flipped word of expert 2 moves expert 2's rows far beyond the tolerance and leaves every
    other expert's rows bit for bit as they were."""
    cfg = _cfg("hyb", 2, True, 16)
    words, scale, lut = _parts(_stack(cfg, 4, 32, 48, seed=7))
    counts = (2, 3, 4, 1)
    x = _sorted_rows(counts, 48, seed=3)
    good = tri.grouped(x, counts, words, scale, lut, *_args(cfg))
    bad_words = words.clone()
    bad_words[2, 1, 0, 2] ^= 0xFFFF
    bad = tri.grouped(x, counts, bad_words, scale, lut, *_args(cfg))
    rows = slice(5, 9)  # expert 2's rows
    assert _rel_err(bad[rows], good[rows]) > 1e-3
    assert torch.equal(bad[:5], good[:5]) and torch.equal(bad[9:], good[9:])


def test_grouped_half_activations(tri):
    """fp16 activations (bf16: GPU only, the interpreter has no bfloat16 dots)."""
    cfg = _cfg("3inst", 2, True, 12)
    words, scale, lut = _parts(_stack(cfg, 3, 32, 64, seed=2))
    counts = (4, 0, 2)
    x = _sorted_rows(counts, 64)
    want = _per_expert(counts, x, 32, lambda e, xe: F.linear(xe, kt.reference(words[e], scale[e], None, cfg)))
    got = tri.grouped(x.half(), counts, words, scale, lut, *_args(cfg))
    assert got.dtype == torch.float16 and _rel_err(got, want) < 1e-2  # fp16 output rounding


def test_grouped_edges_and_refusals(tri):
    cfg = _cfg("1mad", 2, True, 12)
    words, scale, lut = _parts(_stack(cfg, 3, 16, 32))
    empty = tri.grouped(torch.zeros(0, 32), (0, 0, 0), words, scale, lut, *_args(cfg))
    assert empty.shape == (0, 16)
    x = _sorted_rows((1, 1, 1), 32)
    with pytest.raises(ValueError, match="do not split"):
        tri.grouped(x, (1, 1), words, scale, lut, *_args(cfg))
    with pytest.raises(ValueError, match="do not split"):
        tri.grouped(x[:2], (1, 1, 1), words, scale, lut, *_args(cfg))
    with pytest.raises(ValueError, match="expert stack"):
        tri.grouped(x, (3,), words[0], scale[0], lut, *_args(cfg))
    with pytest.raises(ValueError, match="x"):
        tri.grouped(x[:, :16], (1, 1, 1), words, scale, lut, *_args(cfg))


def test_grouped_linear_leaves_the_cpu_path_alone(tri, monkeypatch):
    """``kernels.trellis.grouped_linear`` is CUDA-only: None for CPU tensors, and QuantExperts on the CPU never
    reaches the grouped kernel (its output equals the one-expert-at-a-time oracle)."""
    cfg = _cfg("hyb", 2, True, 12)
    gu, dn = _stack(cfg, 4, 32, 16, seed=1), _stack(cfg, 4, 16, 16, seed=2)  # [E, 2I, H], [E, H, I]
    routing = route_by_expert(torch.tensor([[0, 2], [2, 3]]), 4)
    x = kernel_x(routing.size, 16)
    assert kt.grouped_linear(gu, x, routing.counts) is None

    def refuse(*args, **kwargs):
        raise AssertionError("the grouped Triton kernel ran on the CPU path")

    monkeypatch.setattr(tri, "grouped", refuse)
    q = QuantExperts(gu, dn, torch.nn.functional.silu)
    idx = torch.tensor([[0, 2], [2, 3], [1, 0]])
    w = torch.softmax(torch.randn(3, 2, generator=torch.Generator().manual_seed(0)), -1)
    h = kernel_x(3, 16, seed=4)
    with torch.no_grad():
        got, want = q(h, idx, w), q.reference_forward(h, idx, w)
    assert torch.equal(got, want)
    views = [gu.select(e) for e in range(4)]
    assert torch.equal(looped_linear(x, routing, lambda e, xe: views[e].linear(xe), 32),
                       looped_linear(x, routing, lambda e, xe: q._expert_linear("gate_up_proj", e, xe), 32))


# Compiled for an H100-class GPU (sm_90) by Triton's compiler and the ptxas it ships, no GPU needed (as in
# test_triton_trellis.py), in a child process without TRITON_INTERPRET.
AOT_SCRIPT = AOT_PREAMBLE + r"""    sig = dict(x_ptr="*" + xdt, tiles_ptr="*i32", words_ptr="*i16", scale_ptr="*fp16", lut_ptr="*fp32",
               y_ptr="*" + xdt, N="i32", K="i32", KT="i32", sxm="i32", sym="i32", sys="i32",
               k_chunk="i32", lut_stride="i32")
    consts = dict(geo, IEEE=xdt == "fp32", BM=16, BN=64, BK=64, GEMV=False)
    sig.update({name: "constexpr" for name in consts})
    ptx = triton.compile(ASTSource(tt._grouped_kernel, sig, consts), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    out[f"{code}-{xdt}"] = {"div.rn": "div.rn.f32" in ptx, "div.full": "div.full" in ptx, "mma": "mma" in ptx}
print(json.dumps(out))
"""


def test_grouped_kernel_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    cases = [["1mad", 2, 16, True, "fp32"], ["hyb", 2, 16, True, "bf16"], ["3inst", 3, 12, False, "fp16"]]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-c", AOT_SCRIPT, json.dumps(cases)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(got) == {"1mad-fp32", "hyb-bf16", "3inst-fp16"}
    assert got["1mad-fp32"]["div.rn"] and not any(v["div.full"] for v in got.values())
    assert got["hyb-bf16"]["mma"] and got["3inst-fp16"]["mma"] and not got["1mad-fp32"]["mma"]  # IEEE FMAs for fp32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_quant_experts_use_the_grouped_kernel(monkeypatch):
    """On CUDA a trellis QuantExperts runs through ``grouped_linear`` and matches the CPU oracle."""
    cfg = _cfg("hyb", 2, True, 16)
    gu, dn = _stack(cfg, 8, 256, 128, seed=1), _stack(cfg, 8, 128, 128, seed=2)  # [E, 2I, H], [E, H, I]
    q = QuantExperts(gu, dn, torch.nn.functional.silu)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 7, (40, 2), generator=g)  # expert 7 never routed
    w = torch.softmax(torch.randn(40, 2, generator=g), -1)
    h = kernel_x(40, 128, seed=5)
    with torch.no_grad():
        want = q.reference_forward(h, idx, w)
        calls = []
        orig = kt.grouped_linear
        monkeypatch.setattr(kt, "grouped_linear", lambda *a: calls.append(1) or orig(*a))
        got = q.cuda()(h.cuda(), idx.cuda(), w.cuda())
    assert len(calls) == 2 and _rel_err(got.cpu(), want) < TOL
