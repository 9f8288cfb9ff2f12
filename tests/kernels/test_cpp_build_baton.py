"""A ``lock`` file that torch's ``cpp_extension`` left in a build directory (its process was stopped inside
``load``) is removed under moequant's own lock, so the next process loads the kernels instead of waiting on it
forever (a CI run hung 90 minutes in the setup's kernel build on exactly such a file)."""

import logging
from pathlib import Path

import pytest
from torch.utils import file_baton

from conftest import require_extension
from moequant.fsutil import file_lock
from moequant.kernels import cpp_build
from moequant.kernels import uniform as ku


def _qgemv_build_dir() -> Path:
    paths = [cpp_build.CSRC / s for s in ku._SOURCES]
    return cpp_build.ext_dir() / cpp_build._build_tag(ku.EXT_NAME, paths, cpp_build._cflags())


@pytest.fixture
def no_baton_waits(monkeypatch):
    """torch's wait on a baton fails the test at once instead of spinning until the file goes."""
    def refuse(self):
        raise AssertionError(f"cpp_extension waited on {self.lock_file_path}")

    monkeypatch.setattr(file_baton.FileBaton, "wait", refuse)


def test_a_stale_baton_is_removed_and_the_kernels_load(no_baton_waits, caplog):
    require_extension(ku.extension, "qgemv")  # built (the setup builds it); skipped without a compiler
    baton = _qgemv_build_dir() / "lock"
    assert not baton.exists()
    baton.touch()  # as a process killed inside cpp_extension.load leaves it
    cpp_build._load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="moequant.kernels.cpp_build"):
            mod = ku.extension()
        assert mod is not None and mod.has_avx2() == bool(cpp_build.simd_flags())
        assert not baton.exists()
        assert [r.getMessage() for r in caplog.records] == [
            f"moequant: removing {baton}, left by a process that was stopped while it built or loaded the "
            f"{ku.EXT_NAME} C++ kernels"]
    finally:
        baton.unlink(missing_ok=True)
        cpp_build._load.cache_clear()


def test_clear_stale_baton_reports_what_it_did(tmp_path):
    assert cpp_build.clear_stale_baton(tmp_path, "x") is False
    (tmp_path / "lock").touch()
    assert cpp_build.clear_stale_baton(tmp_path, "x") is True
    assert not (tmp_path / "lock").exists()


def test_file_lock_says_whether_it_holds_the_lock(tmp_path):
    with file_lock(tmp_path / "a.lock") as held:
        assert held is True
    (tmp_path / "file").write_text("")  # a lock that cannot be created, even by root
    with file_lock(tmp_path / "file" / "b.lock") as held:
        assert held is False
