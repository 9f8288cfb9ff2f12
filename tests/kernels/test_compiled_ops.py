"""Packed modules under ``torch.compile``: one graph, no break, and the C++ kernels called from it as dispatcher ops
(``moequant_ext::*``, ``kernels/cpp_ops.py``) — the same numbers as the eager call, bit for bit (the same kernel
with the same arguments).

The graphs are captured with a recording backend (dynamo's trace, no inductor codegen), so the test is quick;
``fullgraph=True`` turns any graph break into a failure.
"""

from __future__ import annotations

import pytest
import torch

from conftest import require_extension
from moequant.codecs.config import GgufConfig, LutConfig, UniformConfig
from moequant.codecs.hadamard import Incoherence
from moequant.formats.kquant import GGUF_CLASSES
from moequant.formats.lut import LutDqTensor, LutTensor
from moequant.formats.rotated import RotatedTensor
from moequant.formats.uniform import UniformAsymTensor, UniformTensor
from moequant.kernels import cpp_ops
from moequant.kernels import uniform as ku
from moequant.kernels.select import kernels
from moequant.nn.quant_embedding import QuantEmbedding
from moequant.nn.quant_linear import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")

N, K = 40, 256


@pytest.fixture(scope="module", autouse=True)
def ops():
    require_extension(ku.extension, "qgemv")
    ready = cpp_ops.prepare()
    assert all(ready.values()), ready
    return ready


def _w(seed=0):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


def _packed():
    """One packed tensor per kernel family: uniform asym / sym, NF4 plain and double-quantized, GGUF Q6_K, and
    a rotated int4 (the RHT op on both sides of the uniform op)."""
    asym = UniformAsymTensor.encode(_w(1), UniformConfig(bits=4, group_size=64, symmetric=False))
    sym = UniformTensor.encode(_w(2), UniformConfig(bits=3, group_size=32, symmetric=True))
    nf4 = LutTensor.encode(_w(3), LutConfig(lut="nf4", block_size=64))
    nf4dq = LutDqTensor.encode(_w(4), LutConfig(lut="nf4", block_size=64, double_quant=True, dq_block_size=8))
    q6k = GGUF_CLASSES["q6_k"].encode(_w(5), GgufConfig(qtype="q6_k"))
    inc = Incoherence.make((N, K), seed=6)
    inner = UniformAsymTensor.encode(inc.weight(_w(6)), UniformConfig(bits=4, group_size=64, symmetric=False))
    rot = RotatedTensor.wrap(inner, inc)
    return {"int4-asym": (asym, "uniform_linear"), "int3-sym": (sym, "uniform_linear"), "nf4": (nf4, "lut_linear"),
            "nf4-dq": (nf4dq, "lut_linear"), "q6_k": (q6k, "gguf_linear"), "rht-int4": (rot, "rht_apply")}


class _Recorder:
    """A dynamo backend that keeps the op targets of every graph it is given and runs the graph as traced."""

    def __init__(self):
        self.targets: list[str] = []
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        self.targets += [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        return gm.forward


@pytest.mark.parametrize("name", ["int4-asym", "int3-sym", "nf4", "nf4-dq", "q6_k", "rht-int4"])
@pytest.mark.parametrize("rows", [1, 12])  # GEMV and tiles + BLAS
def test_a_packed_linear_compiles_to_one_graph_calling_the_cpp_kernel(name, rows):
    qt, op = _packed()[name]
    mod = QuantLinear(qt, bias=torch.randn(N)).eval()
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    torch._dynamo.reset()
    rec = _Recorder()
    compiled = torch.compile(mod, backend=rec, fullgraph=True)  # a graph break raises
    with torch.no_grad():
        got, want = compiled(x), mod(x)
    assert rec.graphs == 1 and any(f"moequant_ext.{op}" in t for t in rec.targets), rec.targets
    assert torch.equal(got, want)


def test_reference_mode_at_trace_time_traces_the_python_op():
    qt, _ = _packed()["int4-asym"]
    mod = QuantLinear(qt).eval()
    x = torch.randn(2, K)
    torch._dynamo.reset()
    rec = _Recorder()
    with kernels("reference"), torch.no_grad():
        got = torch.compile(mod, backend=rec, fullgraph=True)(x)
        want = mod(x)
    assert not any("moequant_ext" in t for t in rec.targets) and any("moequant.uniform_linear" in t for t in rec.targets)
    assert torch.equal(got, want)


def test_a_packed_embedding_compiles_without_a_data_dependent_break():
    qt = UniformTensor.encode(_w(7), UniformConfig(bits=8, group_size=32, symmetric=True, clip_search=False))
    emb = QuantEmbedding(qt).eval()
    ids = torch.tensor([[3, 5, 3, 39], [0, 0, 1, 2]])
    torch._dynamo.reset()
    rec = _Recorder()
    with torch.no_grad():
        got = torch.compile(emb, backend=rec, fullgraph=True)(ids)
        assert rec.graphs == 1 and torch.equal(got, emb(ids))


def test_prepare_without_builds_loads_nothing(monkeypatch):
    from moequant.kernels import cpp_build

    monkeypatch.setattr(cpp_ops, "OPS", {})
    monkeypatch.setattr(cpp_build, "is_built", lambda *a: False)
    assert cpp_ops.prepare(build=False) == dict.fromkeys(cpp_ops._FAKES, False) and cpp_ops.OPS == {}
    assert cpp_ops.op("uniform_linear") is None  # then the compiled graph traces the Python op
