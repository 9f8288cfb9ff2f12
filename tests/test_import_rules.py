"""The import rules of DESIGN.md that hold today, checked on the source (every import, lazy ones included):
``codecs/`` is pure math (torch and other codecs only), ``formats/`` never imports a solver, the calibration
or the run orchestration, and ``eval/`` is a library (neither ``runs`` nor the CLI)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moequant"

# folder -> moequant modules (prefixes) it must never import
FORBIDDEN = {
    "codecs": ("moequant.",),  # anything of ours but codecs (allowed below)
    "formats": ("moequant.solvers", "moequant.calib", "moequant.api", "moequant.runs", "moequant.cli",
                "moequant.layerwise", "moequant.nn"),
    "eval": ("moequant.runs", "moequant.cli", "moequant.compare_job", "moequant.sweep"),
}
ALLOWED = {"codecs": ("moequant.codecs", "moequant.errors")}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                                                   if node.module == "moequant"]
    return out


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_imports(folder):
    bad = []
    for path in sorted((SRC / folder).rglob("*.py")):
        for line, mod in _imports(path):
            if mod.startswith(ALLOWED.get(folder, ("\0",))):
                continue
            if mod.startswith(FORBIDDEN[folder]) or mod == "moequant":
                bad.append(f"{path.relative_to(SRC)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_the_rule_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from moequant.solvers.incoherence import Incoherence\n")
    assert (2, "moequant.solvers.incoherence") in _imports(f)
