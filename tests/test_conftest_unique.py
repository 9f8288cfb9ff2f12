"""Tests import helpers with `from conftest import ...`; under pytest's default import mode a second
conftest.py in a sub-folder is registered as the module `conftest` too and shadows the shared one, so
collection fails for every file that imports from it (CI broke this way once). One conftest.py only."""

from pathlib import Path


def test_one_conftest_only():
    tests = Path(__file__).parent
    found = sorted(str(p.relative_to(tests)) for p in tests.rglob("conftest.py"))
    assert found == ["conftest.py"], f"nested conftest.py files shadow tests/conftest.py: {found}"
