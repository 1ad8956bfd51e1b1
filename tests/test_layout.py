"""The layout's one-way dependencies: the product imports no user tool, and nothing but the tests imports the tests.

product (top-level modules, methods/)  <-  user tools (scripts/), calibration models (calibration/)  <-  tests/
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = sorted(ROOT.glob("*.py")) + sorted((ROOT / "methods").glob("*.py"))
TOOLS = sorted((ROOT / "scripts").glob("*.py")) + sorted((ROOT / "calibration").glob("*.py"))


def imported_packages(path: Path) -> set[str]:
    """The top-level names of every module a file imports (at any depth in the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", PRODUCT, ids=lambda p: str(p.relative_to(ROOT)))
def test_product_code_imports_no_tool_and_no_test(path):
    assert not imported_packages(path) & {"scripts", "calibration", "tests"}


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_tools_and_calibration_import_no_test(path):
    assert "tests" not in imported_packages(path)


def test_scripts_holds_user_tools_only():
    """Every file under scripts/ is a command with --help (a __main__ entry point), none a fixture or library."""
    for path in sorted((ROOT / "scripts").glob("*.py")):
        if path.name == "__init__.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert 'if __name__ == "__main__":' in text and "argparse" in text, path.name
