"""A kept output head whose values already lie on an 8-bit block grid, multiplied from that grid at decode.

Models converted from a GGUF file (every zoo model) carry an output head dequantized from a block type:
SmolLM2's tied table comes from ``Q8_0`` (fp16 ``d`` per 32 columns, ``x = d * q``, ``q`` in [-127, 127]).
Kept unquantized, it is a float32 matrix (49152 x 576, 113 MB) read whole at every decoded token — more than
every int4 decoder linear together. Its values are exactly our symmetric midtread int8 grid at group 32 with
fp16 scales (``codecs.uniform.exact_symmetric_parts`` proves it group by group), so the same numbers can be
multiplied from 8.5 bits/weight (30 MB) by the packed GEMV.

``attach_exact_head`` does that at load, for CPU decode only: the module keeps its float weight (tied to the
embeddings, in the state dict, used by prefill, by anything that needs gradients and by
``MOEQUANT_KERNELS=reference``); at most ``GEMV_MAX_ROWS`` rows of activations take the packed GEMV.
Nothing is written to the checkpoint. The weights are bit-identical; the product differs from ``F.linear``
only in fp32 summation order (within 1e-5 of ``|x| |W|ᵀ``, ``tests/nn/test_exact_head.py``).
``MOEQUANT_EXACT_HEAD=0`` turns it off (the runtime benchmark measures both).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from moequant.kernels.select import EnvSwitch, use_fast
from moequant.kernels.uniform import GEMV_MAX_ROWS

log = logging.getLogger(__name__)

EXACT_HEAD_ENV = "MOEQUANT_EXACT_HEAD"
_ENABLED = EnvSwitch(EXACT_HEAD_ENV, lambda v: (v or "1").strip() not in ("0", "false", "no", "off"))
# Q8_0's grid: what llama.cpp stores the heads and embedding tables of its q4/q5 files in.
EXACT_BITS, EXACT_GROUP = 8, 32
# The llama.cpp block types whose tables are found again exactly, narrowest first: (name, bits, scale rule of
# ``codecs.uniform.exact_symmetric_parts``). Q4_0 / Q5_0 scale by the signed extreme (a scale may be negative).
EXACT_GRIDS = (("Q4_0", 4, True), ("Q5_0", 5, True), ("Q8_0", 8, False))


class ExactGridLinear(nn.Linear):
    """An ``nn.Linear`` (same ``weight`` parameter, same state dict) that multiplies decode-sized inputs from
    ``packed``, a packed tensor holding exactly ``weight``'s values."""

    def __init__(self, linear: nn.Linear, packed) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: a tied embedding stays tied
        self.bias = linear.bias
        self.packed = packed  # a QuantizedTensor (not a buffer: never saved)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if (rows <= GEMV_MAX_ROWS and x.is_cpu and x.dtype == torch.float32 and self.weight.is_cpu
                and _ENABLED.get() and use_fast()
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return self.packed.linear(x, self.bias)  # [..., N]
        return F.linear(x, self.weight, self.bias)


def grid_name(bits: int) -> str:
    """The llama.cpp block type of the exact grid at ``bits`` (``Q4_0`` / ``Q5_0`` / ``Q8_0``)."""
    return next(name for name, b, _ in EXACT_GRIDS if b == bits)


def exact_grid_config(bits: int = EXACT_BITS):
    """The ``UniformConfig`` of a grid: symmetric midtread int ``bits``, group 32, fp16 scales (``Q8_0`` at 8
    bits, ``Q5_0`` / ``Q4_0`` at 5 / 4)."""
    from moequant.codecs.config import UniformConfig

    return UniformConfig(bits=bits, group_size=EXACT_GROUP, symmetric=True, clip_search=False,
                         scale_dtype="float16")


def exact_packed_view(weight: torch.Tensor):
    """The group-32 fp16-scale ``UniformTensor`` holding exactly ``weight [N, K]`` on the first grid of
    ``EXACT_GRIDS`` that holds it (the narrowest: a Q4_0 table also fits the Q5_0 grid), or None."""
    from moequant.codecs.uniform import exact_symmetric_parts
    from moequant.formats.uniform import UniformTensor

    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.is_meta or not weight.is_cpu:
        return None
    for _, bits, signed_max in EXACT_GRIDS:
        parts = exact_symmetric_parts(weight, bits, EXACT_GROUP, torch.float16, signed_max=signed_max)
        if parts is not None:
            return UniformTensor.from_parts(tuple(weight.shape), {"codes": parts[0], "scale": parts[1]},
                                            exact_grid_config(bits))
    return None


def attach_exact_head(model: nn.Module) -> bool:
    """Swap the model's kept float32 ``nn.Linear`` head for an ``ExactGridLinear`` when its values lie exactly
    on a group-32 grid of ``EXACT_GRIDS`` (a GGUF ``Q8_0`` / ``Q5_0`` / ``Q4_0`` source); -> whether it did. Off
    under ``MOEQUANT_EXACT_HEAD=0``."""
    from moequant.layerwise import set_module

    if not _ENABLED.get():
        return False
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if type(head) is not nn.Linear:  # packed heads and already-attached ones are left alone
        return False
    packed = exact_packed_view(head.weight.detach())
    if packed is None:
        return False
    name = next(n for n, m in model.named_modules() if m is head)
    set_module(model, name, ExactGridLinear(head, packed))
    bits = packed.attrs["bits"]
    log.info("%s: its values lie exactly on an int%d group-32 grid (a %s source): decoding multiplies it from the "
             "grid (%.1f MiB instead of %.1f)", name, bits, grid_name(bits), packed.nbytes() / 2**20,
             head.weight.nbytes / 2**20)
    return True
