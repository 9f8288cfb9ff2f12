"""moequant::rht_apply / rht_apply_outer: the C++ random-Hadamard kernels of the two rules (``paley``, the block
inside; ``hartley``, the block outside) (kernels/hadamard.py, csrc/hadamard.cpp) against the
torch path of solvers.incoherence (signs times ``hadamard_transform``), and its use by ``Incoherence``.

Tolerance: both compute in fp32 in different orders (a butterfly vs Kronecker-factor matmuls); measured
max |kernel - reference| <= 2e-7 of the row's norm here. The tests allow 1e-5 of ``‖x‖``; a wrong sign,
block or scale is off by O(1) of it.
"""

from __future__ import annotations


import pytest
import torch

from conftest import require_extension
from moequant.kernels import cpp_build
from moequant.kernels import hadamard as kh
from moequant.kernels.select import reference_kernels
from moequant.codecs.hadamard import RULES
from moequant.solvers.incoherence import Incoherence, hadamard_transform, random_signs

TOL = 1e-5  # max |kernel - reference| / max row norm of x

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [1, 2, 12, 64, 576, 768, 896, 1536, 4864, 7, 40, 456, 912]  # powers of two, Paley blocks, a random
# block (7), and blocks of 228 on runs of 2 and 4 (qwen2.5-coder-0.5b-moe's experts: the outer rule's short-run path)
ROWS = [1, 3, 8, 300]
OP = {"paley": "rht_apply", "paley-outer": "rht_apply_outer", "hartley": "rht_apply_outer"}  # the rule's kernel
REF = {"paley": kh.reference, "paley-outer": kh.reference_outer, "hartley": kh.reference_outer}  # its definition


@pytest.fixture(scope="module")
def ext():
    """The ``rht`` extension (skipped without a compiler or with the extensions disabled on purpose)."""
    return require_extension(kh.extension, "rht")


def _x(rows, n, seed=0):
    return torch.randn(rows, n, generator=torch.Generator().manual_seed(seed)) + 0.25  # [R, n]


def _err(got, want, x):
    return float((got - want).abs().max() / x.norm(dim=-1).max())


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("rows", ROWS)
def test_kernel_matches_hadamard_transform(ext, n, rows, rule):
    x, sb, sa = _x(rows, n), random_signs(n, 1), random_signs(n, 2)
    kernel, block = getattr(ext, OP[rule]), kh.block_for(n, rule)
    for transpose in (False, True):
        want = hadamard_transform(x * sb, transpose, rule) * sa  # [R, n]
        got = kernel(x, sb, sa, block, transpose)
        assert got.shape == x.shape and got.dtype == torch.float32
        assert _err(got, want, x) <= TOL
        bare = kernel(x, kh._NONE, kh._NONE, block, transpose)  # no signs
        assert _err(bare, hadamard_transform(x, transpose, rule), x) <= TOL
        for pre, post in ((sb, kh._NONE), (kh._NONE, sa)):  # one side only
            one = hadamard_transform(x * (sb if pre.numel() else 1), transpose, rule) * (sa if post.numel() else 1)
            assert _err(kernel(x, pre, post, block, transpose), one, x) <= TOL
        ref = REF[rule](x, sb, sa, block, transpose)  # the op's torch definition
        assert _err(ref, want, x) <= TOL


def test_the_rules_differ_where_n_has_an_odd_part(ext):
    """Not vacuous: the two kernels give different transforms for 576 = 16·36 = 64·9 (and the same for 512)."""
    for n, same in ((576, False), (512, True)):
        x = _x(4, n)
        a = ext.rht_apply(x, kh._NONE, kh._NONE, kh.block_for(n, "paley"), False)
        b = ext.rht_apply_outer(x, kh._NONE, kh._NONE, kh.block_for(n, "hartley"), False)
        assert (_err(a, b, x) <= TOL) == same


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("n", [12, 576, 7])
def test_kernel_takes_any_layout_and_leading_dims(ext, n, rule):
    x = _x(n, 6, seed=3).T  # [6, n], not contiguous
    sb = random_signs(n, 4)
    kernel, block = getattr(ext, OP[rule]), kh.block_for(n, rule)
    want = hadamard_transform(x * sb, rule=rule)
    assert _err(kernel(x, sb, kh._NONE, block, False), want, x) <= TOL
    got = kernel(x.reshape(2, 3, n), sb, kh._NONE, block, False)  # [2, 3, n]
    assert got.shape == (2, 3, n) and _err(got.reshape(6, n), want, x) <= TOL
    assert kernel(x[:0], sb, kh._NONE, block, False).shape == (0, n)  # no rows


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("n", SIZES)
def test_op_dispatches_to_kernel_and_reference(ext, n, rule):
    x, sb = _x(3, n, seed=1), random_signs(n, 3)
    want = hadamard_transform(x * sb, rule=rule)
    op, block = getattr(torch.ops.moequant, OP[rule]), kh.block_for(n, rule)
    assert _err(op(x, sb, kh._NONE, block, False), want, x) <= TOL
    with reference_kernels():
        assert _err(op(x, sb, kh._NONE, block, False), want, x) <= TOL


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)])
def test_incoherence_fast_path_round_trip(ext, n, lead, rule):
    inc = Incoherence.make((n, n), seed=7, rule=rule)
    x = torch.randn(*lead, n, generator=torch.Generator().manual_seed(2))  # [..., n]
    xr = inc.transform_input(x)
    with reference_kernels():
        want = inc.transform_input(x)
        back_ref = inc.restore_output(want)
    assert xr.shape == x.shape and _err(xr, want, x.reshape(-1, n)) <= TOL
    assert _err(inc.restore_output(xr), back_ref, x.reshape(-1, n)) <= TOL
    # H_n^T inverts H_n and the signs square to one: with S_V = S_U, restore_output(transform_input(x)) == x
    same = Incoherence(inc.sign_in, inc.sign_in, rule)
    assert _err(same.restore_output(same.transform_input(x)), x, x.reshape(-1, n)) <= TOL


def test_fast_path_taken_and_skipped(ext, monkeypatch):
    n = 576
    inc, x = Incoherence.make((n, n), seed=1), _x(1, n)
    calls = []

    class Spy:
        def __getattr__(self, name):
            def call(*a):
                calls.append(a[-1])
                return getattr(ext, name)(*a)

            assert name == "rht_apply_outer"  # the default rule's kernel
            return call

    monkeypatch.setattr(kh, "_extension", lambda: Spy())
    inc.restore_output(inc.transform_input(x))
    assert calls == [False, True]  # one kernel call each
    calls.clear()
    with reference_kernels():
        inc.restore_output(inc.transform_input(x))
    monkeypatch.setenv("MOEQUANT_KERNELS", "reference")
    inc.restore_output(inc.transform_input(x))
    monkeypatch.delenv("MOEQUANT_KERNELS")
    inc.transform_input(x.double())  # float64: the torch path
    inc.transform_input(x.clone().requires_grad_())  # autograd: the torch path
    per_expert = Incoherence.make((2, n, n), seed=1, per_expert=True)
    per_expert.transform_input(x.expand(2, 1, n))  # [E, n] signs over the leading dim: the torch path
    assert calls == []
    per_expert.transform_input(x, expert=1)  # one expert's [n] signs: the kernel
    assert calls == [False]


def test_reference_path_without_extension(monkeypatch):
    """MOEQUANT_NO_EXT=1 (no compiler, a failed build): ``fast`` declines and the torch path gives the result."""
    monkeypatch.setenv(cpp_build.DISABLE_ENV, "1")
    cpp_build._load.cache_clear()
    try:
        n = 896
        inc, x = Incoherence.make((n, n), seed=2), _x(2, n)
        assert kh.fast(x, inc.sign_in, None, False) is None
        got = inc.transform_input(x)
        torch.testing.assert_close(got, hadamard_transform(x * inc.sign_in, rule=inc.rule), rtol=0, atol=0)
    finally:
        monkeypatch.delenv(cpp_build.DISABLE_ENV)
        cpp_build._load.cache_clear()


def test_shape_errors_still_raised(ext):
    inc = Incoherence.make((12, 64), seed=0)
    with pytest.raises(ValueError, match="does not match signs"):
        inc.transform_input(torch.randn(2, 63))
    with pytest.raises(ValueError, match="does not match signs"):
        inc.restore_output(torch.randn(2, 64))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shape", [(576, 1536), (40, 12), (3, 64, 896)])
def test_a_trained_weight_inverse_takes_the_kernel_forward_and_backward(ext, monkeypatch, rule, shape):
    """Fine-tuning an rht run differentiates ``weight_inverse``: with shared signs its two sides run in the
    kernel, and so does the gradient (the adjoint transform, the inverse rotation ``weight``)."""
    inc = Incoherence.make(shape, seed=3, rule=rule)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(*shape, generator=g).requires_grad_(True)  # [..., N, K], in the rotated domain
    upstream = torch.randn(*shape, generator=g)
    calls = []

    class Spy:
        def __getattr__(self, name):
            def call(*a):
                calls.append(a[-1])  # transpose
                return getattr(ext, name)(*a)
            return call

    monkeypatch.setattr(kh, "_extension", lambda: Spy())
    y = inc.weight_inverse(w)
    y.backward(upstream)
    assert calls == [True, True, False, False]  # columns then rows, forward (H^T) and backward (H)
    want = inc.weight_inverse(w.detach())  # the torch path (no grad)
    scale = max(float(w.detach().abs().max()), 1.0) * max(shape[-1], shape[-2]) ** 0.5
    assert float((y.detach() - want).abs().max()) / scale <= TOL
    grad_want = inc.weight(upstream)  # the adjoint of an orthogonal map is its inverse
    assert float((w.grad - grad_want).abs().max()) / scale <= TOL
    assert float((grad_want - upstream).abs().max()) > 0.1  # the rotation is not the identity here


def test_the_trained_weight_inverse_passes_gradcheck_in_float64():
    """float64: the kernel declines, the same autograd function runs torch ops; gradcheck then checks its
    backward (signs swapped, transpose flipped) against finite differences, on every rule."""
    for rule in RULES:
        inc = Incoherence.make((12, 40), seed=5, rule=rule)
        w = torch.randn(12, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
        assert torch.autograd.gradcheck(inc.weight_inverse, (w,))
