"""``QuantLinear``: a linear layer that stores only its packed weight and dequantizes it per call."""

from __future__ import annotations

import torch
from torch import nn

from moequant.formats.base import QuantizedTensor
from moequant.nn.packed import cached_packed_tensor, clear_packed_cache, register_packed


class QuantLinear(nn.Module):
    """``y = x Ŵᵀ + b`` computed from the packed ``weight_*`` buffers at call time
    (``QuantizedTensor.linear``: decode then matmul, or a format's own path — a rotated tensor rotates
    the activations instead). Only the packed data is resident; a decoded weight lives for one call.

    ``keep_decoded`` (off by default; ``exact_gguf.decode_slow_tables`` sets it on a head stored in a GGUF block
    type when the GGUF kernel is not available): the weight is decoded once, kept in float32 beside the packed data, and
    multiplied with ``F.linear`` — the product of a float head with the same values."""

    keep_decoded: bool = False

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight, got {qweight.shape}")
        self.out_features, self.in_features = qweight.shape
        register_packed(self, "weight", qweight)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def qweight(self) -> QuantizedTensor:
        return cached_packed_tensor(self, "weight")  # one view per weight: a kernel's repack cache persists

    def _apply(self, fn, recurse: bool = True):
        clear_packed_cache(self)  # the cached view (and its runtime caches) belongs to the old tensors
        return super()._apply(fn, recurse)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)  # [N, K]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep_decoded:
            q = self.qweight
            cache = q.__dict__.setdefault("_runtime", {})  # lives as long as this view (cleared by _apply)
            if "decoded" not in cache:
                cache["decoded"] = q.dequantize(torch.float32)  # [N, K]
            w = cache["decoded"]
            return nn.functional.linear(x, w if w.dtype == x.dtype else w.to(x.dtype), self.bias)  # [..., N]
        return self.qweight.linear(x, self.bias)  # [..., N]

    def extra_repr(self) -> str:
        q = self.qweight
        return f"in={self.in_features}, out={self.out_features}, {q.format_id}, {q.bits_per_weight():.3f} bpw"
