"""The qgemv extension as a fixture: skipped where no compiler exists or the extension is disabled on
purpose, a failure where it should build and does not."""

import os
import shutil

import pytest

from moequant.kernels import cpp_build
from moequant.kernels import uniform as ku


@pytest.fixture(scope="module")
def qgemv_ext():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here: only the reference path exists")
    if os.environ.get(cpp_build.DISABLE_ENV, "").strip() not in ("", "0"):
        pytest.skip(f"{cpp_build.DISABLE_ENV} is set")
    mod = ku.extension()
    assert mod is not None, "the qgemv extension failed to build (see the warning)"
    assert mod.has_avx2() == bool(cpp_build.simd_flags())  # the vector path is what these tests exercise
    return mod
