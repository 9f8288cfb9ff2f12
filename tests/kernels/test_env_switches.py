"""Environment switches (``select.EnvSwitch``): read per call at the cost of a dict probe, so a change made at
run time (``monkeypatch.setenv``, ``os.environ[...] =``, ``del``) takes effect at the next call."""

import os

import pytest
import torch

from moequant.kernels import cpp_build, select
from moequant.kernels import uniform as ku
from moequant.kernels.select import EnvSwitch, kernel_mode, reference_kernels, use_fast

NAME = "MOEQUANT_TEST_ENV_SWITCH"


@pytest.fixture(params=[True, False], ids=["probe", "os.environ.get"])
def probe(request, monkeypatch):
    """Both ways of reading: the dict probe and the ``os.environ.get`` fallback."""
    if not request.param:
        monkeypatch.setattr(select, "_ENV_PROBE", False)
    elif not select._ENV_PROBE:
        pytest.skip("os.environ has no _data dict here")
    return request.param


def test_switch_follows_the_environment(probe, monkeypatch):
    parsed = []

    def parse(v):
        parsed.append(v)
        return (v or "").upper()

    s = EnvSwitch(NAME, parse)
    monkeypatch.delenv(NAME, raising=False)
    assert s.get() == "" and s.get() == ""
    monkeypatch.setenv(NAME, "abc")
    assert s.get() == "ABC"
    os.environ[NAME] = "xyz"
    assert s.get() == "XYZ" and s.get() == "XYZ"
    del os.environ[NAME]
    assert s.get() == ""
    if probe:
        assert parsed == [None, "abc", "xyz", None]  # parsed once per value


def test_a_bad_value_raises_at_every_read(probe, monkeypatch):
    monkeypatch.setenv("MOEQUANT_KERNELS", "fastest")
    for _ in range(2):
        with pytest.raises(ValueError, match="MOEQUANT_KERNELS"):
            kernel_mode()
    with reference_kernels():  # the context forces the mode without reading the environment
        assert kernel_mode() == "reference"
    monkeypatch.setenv("MOEQUANT_KERNELS", " Reference ")
    assert kernel_mode() == "reference" and not use_fast()
    monkeypatch.delenv("MOEQUANT_KERNELS")
    assert kernel_mode() == "auto" and use_fast()


def test_kernel_switches_at_run_time(probe, monkeypatch, qgemv_ext):
    from moequant.codecs.config import UniformConfig
    from moequant.formats.base import QuantizedTensor
    from moequant.formats.registry import tensor_class_for

    cfg = UniformConfig(bits=3, group_size=64, symmetric=False, clip_search=False)
    qt = tensor_class_for(cfg).encode(torch.randn(16, 128, generator=torch.Generator().manual_seed(0)), cfg)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(1))
    ref = QuantizedTensor.linear(qt, x)
    fast = ku.linear(qt, x)
    assert not torch.equal(fast, ref)  # the kernel sums in another order: tells the paths apart
    monkeypatch.setenv("MOEQUANT_KERNELS", "reference")
    assert torch.equal(ku.linear(qt, x), ref)
    monkeypatch.delenv("MOEQUANT_KERNELS")
    assert torch.equal(ku.linear(qt, x), fast)
    monkeypatch.setenv(cpp_build.DISABLE_ENV, "1")
    assert ku.extension() is None and torch.equal(ku.linear(qt, x), ref)
    monkeypatch.setenv(cpp_build.DISABLE_ENV, "0")
    assert ku.extension() is not None and torch.equal(ku.linear(qt, x), fast)
    monkeypatch.setenv(ku.INT4_ENV, "int4pack")
    assert ku._INT4.get() == "int4pack"
    monkeypatch.delenv(ku.INT4_ENV)
    assert (ku._INT4.get() or ku.INT4_DEFAULT) == ku.INT4_DEFAULT
