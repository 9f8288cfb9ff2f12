"""The Triton kernels of the uniform format (``kernels/triton_uniform.py``) against the pure-torch reference,
run on CPU tensors by Triton's interpreter (``TRITON_INTERPRET=1``, set before the kernels are imported), and
on CUDA when a GPU is present (marked ``gpu``).

Tolerance: float32 products summed in another order than ``F.linear`` (blocks of 64 columns); measured on
these cases under the interpreter, up to ~2e-7 of the output's scale. A wrong code, bit offset, group index,
scale or zero point is ~1e-2 or more (checked below by corrupting one byte).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from conftest import OnTestDevice, kernel_x, packed_uniform
from moequant.codecs.config import UniformConfig
from moequant.formats.registry import tensor_class_for
from moequant.kernels import uniform as ku
from moequant.nn.quant_experts import looped_linear, route_by_expert

pytest.importorskip("triton")

TOL = 1e-5


@pytest.fixture(scope="module")
def tri():
    """``kernels.triton_uniform``: compiled on CUDA, else run by the interpreter (``tests/conftest.py`` sets
    ``TRITON_INTERPRET=1`` before anything imports Triton)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    return OnTestDevice(importlib.import_module("moequant.kernels.triton_uniform"))


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def _kernel_args(qt):
    codes, scale, zero, bits, gs, k, grid = ku.op_args(qt)
    zc = 0.0 if zero is not None else ku.zero_point(bits, grid)
    return codes, scale, zero, bits, gs, k, zc, grid


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("n,k,gs", [(40, 100, 32), (24, 130, 48), (16, 64, -1)])
def test_linear_matches_reference(tri, bits, symmetric, n, k, gs):
    qt = packed_uniform(n, k, bits, gs, symmetric, seed=bits + 10 * symmetric)
    codes, scale, zero, b, g, kk, zc, grid = _kernel_args(qt)
    bias = torch.randn(n)
    for m in (1, 5, 20):
        x = kernel_x(m, k, seed=m)
        want = ku.reference(x, codes, scale, zero, bias, b, g, kk, grid)  # [M, N]
        got = tri.linear(x, codes, scale, zero, bias, b, g, kk, zc)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert _rel_err(got, want) < TOL, (bits, symmetric, n, k, gs, m)


# bf16 activations: GPU only (the interpreter computes bf16 dots wrongly: numpy has no bfloat16)
HALF = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", HALF)
def test_linear_leading_dims_half_and_no_bias(tri, dtype):
    qt = packed_uniform(32, 96, 4, 32, False, scale_dtype="bfloat16")
    codes, scale, zero, b, g, kk, zc, grid = _kernel_args(qt)
    x = kernel_x(6, 96).reshape(2, 3, 96).to(dtype)
    want = ku.reference(x, codes, scale, zero, None, b, g, kk, grid)  # [2, 3, 32] in dtype
    got = tri.linear(x, codes, scale, zero, None, b, g, kk, zc)
    assert got.shape == (2, 3, 32) and got.dtype == dtype
    assert _rel_err(got, want) < 1e-2  # half output rounding (fp16 ~5e-4, bf16 ~4e-3 per element)


def test_midrise_grid(tri):
    """The v1 symmetric grid decodes with the zero point (2^b - 1)/2."""
    qt = packed_uniform(16, 64, 3, 32, True)
    codes, scale, zero, b, g, kk, _, _ = _kernel_args(qt)
    x = kernel_x(2, 64)
    want = ku.reference(x, codes, scale, None, None, b, g, kk, "midrise")
    got = tri.linear(x, codes, scale, None, None, b, g, kk, ku.zero_point(3, "midrise"))
    assert _rel_err(got, want) < TOL


def test_a_corrupted_byte_is_seen(tri):
    """The comparison is not vacuous: one flipped code byte moves the output far beyond the tolerance."""
    qt = packed_uniform(16, 64, 3, 32, False)
    codes, scale, zero, b, g, kk, zc, grid = _kernel_args(qt)
    x = kernel_x(1, 64)
    bad = codes.clone()
    bad[3, 5] ^= 0xFF
    want = ku.reference(x, codes, scale, zero, None, b, g, kk, grid)
    assert _rel_err(tri.linear(x, bad, scale, zero, None, b, g, kk, zc), want) > 1e-3


@pytest.mark.parametrize("bits,symmetric", [(4, False), (3, True), (2, False)])
def test_grouped_matches_per_expert_reference(tri, bits, symmetric):
    e_all, n, k, t, top = 5, 24, 80, 9, 2
    g = torch.Generator().manual_seed(3)
    w = torch.randn(e_all, n, k, generator=g)  # [E, N, K]
    cfg = UniformConfig(bits=bits, group_size=32, symmetric=symmetric, clip_search=False)
    qt = tensor_class_for(cfg).encode(w, cfg)
    idx = torch.randint(0, e_all - 1, (t, top), generator=g)  # expert E-1 gets no token
    routing = route_by_expert(idx, e_all)
    x = torch.randn(t, k, generator=g)[routing.token]  # [S, K] sorted by expert
    views = [qt.select(e) for e in range(e_all)]

    def ref(e: int, xe: torch.Tensor) -> torch.Tensor:
        c, s, z, b, gs, kk, grid = ku.op_args(views[e])
        return ku.reference(xe, c, s, z, None, b, gs, kk, grid)

    want = looped_linear(x, routing, ref, n)  # [S, N]
    codes, scale, zero, b, gs, kk, zc, _ = _kernel_args(qt)
    got = tri.grouped(x, routing.counts, codes, scale, zero, b, gs, kk, zc)
    assert routing.counts[-1] == 0 and got.shape == want.shape
    assert _rel_err(got, want) < TOL
    with pytest.raises(ValueError, match="do not split"):
        tri.grouped(x[:-1], routing.counts, codes, scale, zero, b, gs, kk, zc)


TILES = [dict(gemv=True, block_n=16, block_k=64), dict(gemv=True, block_n=32, block_k=256),
         dict(gemv=False, block_n=32, block_k=128), dict(gemv=True, block_n=16, block_k=64, split_k=3),
         dict(gemv=False, block_n=32, block_k=64, split_k=8)]  # split 8 of K=300 in 64s: three empty chunks


@pytest.mark.parametrize("tile", TILES, ids=lambda t: "-".join(f"{k}{v}" for k, v in t.items()))
def test_tile_overrides_match_reference(tri, tile):
    """Every tile the GPU benchmark sweeps (``launch_for``'s keywords) computes the same product: the GEMV body
    (no ``tl.dot``) on several rows too, K not a multiple of the block, groups across blocks, split-K (bias added
    once, after the partial sums)."""
    qt = packed_uniform(40, 300, 4, 32, False, seed=5)
    codes, scale, zero, b, g, kk, zc, grid = _kernel_args(qt)
    bias = torch.randn(40)
    for m in (1, 3):
        x = kernel_x(m, 300, seed=m)
        want = ku.reference(x, codes, scale, zero, bias, b, g, kk, grid)
        assert _rel_err(tri.linear(x, codes, scale, zero, bias, b, g, kk, zc, **tile), want) < TOL, (tile, m)
    w = torch.randn(3, 40, 300, generator=torch.Generator().manual_seed(2))  # [E, N, K]
    cfg = UniformConfig(bits=3, group_size=64, symmetric=True, clip_search=False)
    st = tensor_class_for(cfg).encode(w, cfg)
    counts = (2, 0, 1)
    x = kernel_x(3, 300)
    want = []
    for e, rows in ((0, x[:2]), (2, x[2:])):
        ce, se, ze, be, ge, ke, gride = ku.op_args(st.select(e))
        want.append(ku.reference(rows, ce, se, ze, None, be, ge, ke, gride))  # [rows, N]
    c, s_, z, b, gs, kk, zc, _ = _kernel_args(st)
    assert _rel_err(tri.grouped(x, counts, c, s_, z, b, gs, kk, zc, **tile), torch.cat(want)) < TOL, tile


def test_launch_rule():
    tu = importlib.import_module("moequant.kernels.triton_uniform")
    assert tu.launch_for(1) == tu.Launch(1, tu.GEMV_BN, tu.GEMV_BK, True)
    assert tu.launch_for(2) == tu.Launch(16, 64, 64, False)
    assert tu.launch_for(40) == tu.Launch(64, 64, 64, False)
    assert tu.launch_for(1, block_n=16, gemv=False) == tu.Launch(16, 16, 64, False)
    t = tu.launch_for(1, split_k=8)
    assert t.split == 8 and t.k_chunk(300) == 128 and t.k_chunk(4096) == 512  # multiples of bk=128
    with pytest.raises(ValueError, match="split_k"):
        tu.launch_for(1, split_k=-1)


def test_tile_table(tri):
    t = tri.tile_table((3, 0, 17, 1), 16, torch.device("cpu"))
    assert t.tolist() == [[0, 0, 3], [2, 3, 20], [2, 19, 20], [3, 20, 21]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_op_and_quant_linear_route_to_triton():
    qt = packed_uniform(64, 256, 4, 128, False)
    x = kernel_x(3, 256)
    want = qt.linear(x)
    qc = type(qt)(qt.shape, {n: t.cuda() for n, t in qt.data.items()}, qt.attrs)
    got = qc.linear(x.cuda())
    assert got.is_cuda and _rel_err(got.cpu(), want) < TOL
