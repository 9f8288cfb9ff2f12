"""torch's cpp_extension runs ``ninja`` from PATH: while moequant loads its kernels, the running interpreter's own
folder comes first when a ``ninja`` lies there (an environment's python run without activating it)."""

import os
import sys

from moequant.kernels import cpp_build


def _fake_env(tmp_path, with_ninja: bool):
    bindir = tmp_path / "env" / "bin"
    bindir.mkdir(parents=True)
    if with_ninja:
        (bindir / "ninja").write_text("#!/bin/sh\n")
    return bindir


def test_the_interpreters_folder_comes_first_while_loading(tmp_path, monkeypatch):
    bindir = _fake_env(tmp_path, with_ninja=True)
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with cpp_build.interpreter_tools_first():
        assert os.environ["PATH"] == f"{bindir}:/usr/bin:/bin"
        with cpp_build.interpreter_tools_first():  # already first: not added twice
            assert os.environ["PATH"] == f"{bindir}:/usr/bin:/bin"
    assert os.environ["PATH"] == "/usr/bin:/bin"
    monkeypatch.delenv("PATH")
    with cpp_build.interpreter_tools_first():
        assert os.environ["PATH"] == str(bindir)
    assert "PATH" not in os.environ


def test_path_is_left_alone_without_a_ninja_beside_the_interpreter(tmp_path, monkeypatch):
    bindir = _fake_env(tmp_path, with_ninja=False)
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with cpp_build.interpreter_tools_first():
        assert os.environ["PATH"] == "/usr/bin:/bin"
    assert os.environ["PATH"] == "/usr/bin:/bin"


def test_load_runs_cpp_extension_with_that_path(tmp_path, monkeypatch):
    import shutil

    import pytest
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler: _load stops before cpp_extension")
    bindir = _fake_env(tmp_path, with_ninja=True)
    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", os.environ["PATH"])  # restored after the test
    seen = []

    def fake_load(**kwargs):
        seen.append((os.environ["PATH"].split(os.pathsep)[0], kwargs["build_directory"]))
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert cpp_build._load.__wrapped__("qgemv", ("qgemv.cpp",)) == "module"
    assert seen[0][0] == str(bindir) and seen[0][1].startswith(str(tmp_path / "cache" / "ext" / "qgemv-"))
    assert os.environ["PATH"].split(os.pathsep)[0] != str(bindir)
