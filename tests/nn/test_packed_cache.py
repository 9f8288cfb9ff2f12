"""QuantLinear keeps one QuantizedTensor view over its buffers while they are unchanged."""

import torch

from moequant.codecs.config import UniformConfig
from moequant.formats.registry import tensor_class_for
from moequant.nn.quant_linear import QuantLinear


def _layer(seed=0):
    cfg = UniformConfig(bits=4, group_size=32, symmetric=False)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(seed))
    return QuantLinear(tensor_class_for(cfg).encode(w, cfg))


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
