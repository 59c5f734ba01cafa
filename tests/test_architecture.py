"""docs/architecture.md names the places a change goes as `path::Symbol`; each must exist, so
the page cannot drift from the code unnoticed."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"
REFERENCE = re.compile(r"`([\w./-]+\.py)::([\w.]+)`")


def _defined_names(path: Path) -> set[str]:
    """Top-level functions, classes and assignments of a module, and `Class.attribute`."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        names.add(f"{node.name}.{item.name}")
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        names.add(f"{node.name}.{item.target.id}")
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_the_architecture_page_names_symbols():
    assert len(REFERENCE.findall(PAGE.read_text())) >= 20


def test_every_symbol_the_architecture_page_names_exists():
    missing = []
    for path, symbol in sorted(set(REFERENCE.findall(PAGE.read_text()))):
        module = ROOT / path
        if not module.is_file() or symbol not in _defined_names(module):
            missing.append(f"{path}::{symbol}")
    assert not missing, f"docs/architecture.md names what the code does not define: {missing}"


def test_every_module_the_architecture_page_names_exists():
    paths = set(re.findall(r"`((?:esd|gputracker|tests)/[\w./-]*\.py)`", PAGE.read_text()))
    assert paths
    assert sorted(p for p in paths if not (ROOT / p).is_file()) == []
