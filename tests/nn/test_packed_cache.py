"""QuantLinear keeps one QuantizedTensor view over its buffers while they are unchanged, and the next forward
after any change to a buffer (replaced, re-pointed, written in place) runs on the new data — also through
what a view derives from its buffers and keeps (a rotated tensor's unpacked signs, a kernel's arguments)."""

import pytest
import torch

from moequant.codecs.config import UniformConfig
from moequant.formats.registry import tensor_class_for
from moequant.formats.rotated import RotatedTensor
from moequant.nn.packed import buffers_token, buffers_unchanged
from moequant.nn.quant_linear import QuantLinear
from moequant.solvers.incoherence import Incoherence

N, K = 32, 64


def _layer(seed=0, rotated=False):
    cfg = UniformConfig(bits=4, group_size=32, symmetric=False)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    qt = tensor_class_for(cfg).encode(w, cfg)
    if rotated:
        qt = RotatedTensor.wrap(qt, Incoherence.make((N, K), seed=seed))
    return QuantLinear(qt)


def _fresh(layer):
    """A new QuantLinear over copies of ``layer``'s current buffers: the oracle of its next forward."""
    q = layer.qweight
    return QuantLinear(type(q)(q.shape, {d: t.clone() for d, t in q.data.items()}, dict(q.attrs)))


def _x(m=1, seed=3):
    return torch.randn(m, K, generator=torch.Generator().manual_seed(seed))


def test_view_kept_until_buffers_change():
    a, b = _layer(0), _layer(1)
    v = a.qweight
    assert a.qweight is v  # same object: a kernel's runtime cache on it survives between calls
    a.load_state_dict(b.state_dict())  # in-place copy: same storage, new version
    v2 = a.qweight
    assert v2 is not v and torch.equal(v2.dequantize(), b.qweight.dequantize())
    assert a.qweight is v2
    a._apply(lambda t: t.clone())  # what .to() / .cuda() do: new tensors, so a new view
    assert a.qweight is not v2 and torch.equal(a.qweight.dequantize(), b.qweight.dequantize())


def test_forward_keeps_the_view():
    a, x = _layer(0), _x()
    with torch.inference_mode():
        y = a(x)
        v = a.qweight
        assert torch.equal(a(x), y) and a.qweight is v


CHANGES = ["load_state_dict", "load_state_dict_assign", "setattr", "register_buffer", "data", "inplace",
           "inplace_no_grad", "to_clone"]


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("rotated", [False, True], ids=["uniform", "rotated"])
@pytest.mark.parametrize("m", [1, 20])  # the GEMV and the decode + GEMM paths
def test_next_forward_uses_the_new_data(change, rotated, m):
    a, b, x = _layer(0, rotated), _layer(1, rotated), _x(m)
    name = "weight_sign_in" if rotated else "weight_codes"  # rotated: the signs its view unpacks and keeps
    new = getattr(b, name).clone()
    with torch.inference_mode():
        before = a(x)  # builds and caches the view and what it derives
    view = a.qweight
    if change == "load_state_dict":
        a.load_state_dict({**a.state_dict(), name: new})
    elif change == "load_state_dict_assign":
        a.load_state_dict({**{k: v.clone() for k, v in a.state_dict().items()}, name: new}, assign=True)
    elif change == "setattr":
        setattr(a, name, new)
    elif change == "register_buffer":
        a.register_buffer(name, new)
    elif change == "data":
        getattr(a, name).data = new  # same tensor object and version counter, other memory
    elif change == "inplace":
        getattr(a, name).copy_(new)
    elif change == "inplace_no_grad":
        with torch.no_grad():
            getattr(a, name).copy_(new)
    elif change == "to_clone":
        a._apply(lambda t: t.clone())
    assert a.qweight is not view
    with torch.inference_mode():
        after = a(x)
        assert torch.equal(after, _fresh(a)(x))  # bit for bit: the same kernel path on the new data
    if change != "to_clone":
        assert not torch.equal(after, before)


def test_data_swapped_twice_between_calls():
    """``t.data = B`` then ``t.data = C`` without a forward between: C must not pass for the cached A even if the
    allocator put it at A's old address (the token keeps A's storage alive, so it cannot)."""
    a, x = _layer(0, rotated=True), _x()
    with torch.inference_mode():
        a(x)
    view, signs = a.qweight, a.weight_sign_in
    for seed in (1, 2):
        signs.data = _layer(seed, rotated=True).weight_sign_in.clone()
    assert a.qweight is not view
    with torch.inference_mode():
        assert torch.equal(a(x), _fresh(a)(x))


def test_inference_tensor_buffers():
    """Buffers made under ``inference_mode`` keep no version counter: replacement is still detected."""
    with torch.inference_mode():
        a, b, x = _layer(0), _layer(1), _x()
        a(x)
        token = buffers_token(a, "weight")
        assert all(version is None for _, _, version, _, _ in token)
        assert buffers_unchanged(a, token)
        a.weight_codes = b.weight_codes.clone()
        assert not buffers_unchanged(a, token)
        assert torch.equal(a(x), _fresh(a)(x))


def test_token_covers_every_buffer():
    a = _layer(0)
    assert [key for key, *_ in buffers_token(a, "weight")] == ["weight_codes", "weight_scale", "weight_zero"]
    for name in ("weight_codes", "weight_scale", "weight_zero"):
        token = buffers_token(a, "weight")
        assert buffers_unchanged(a, token)
        getattr(a, name).add_(0)  # a write of the same values still bumps the version counter
        assert not buffers_unchanged(a, token)
