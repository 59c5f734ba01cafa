"""The modules of esd/ import one another in one direction: no import cycle, counting the
imports inside functions too (a deferred import is still a dependency). Read with ast, so
nothing is imported to check it."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def esd_import_graph() -> dict[str, set[str]]:
    """module → the esd modules it imports (anywhere in its body)."""
    modules = {_module_name(p): p for p in (ROOT / "esd").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:                     # relative: from . import x / from .x import y
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name
                       and not name.startswith(t + ".")}   # a package above is not a use
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, …, a], or None."""
    state: dict[str, int] = {}                    # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_walk_sees_deferred_imports_and_finds_a_planted_cycle():
    graph = esd_import_graph()
    assert "esd.loading.hub_http" in graph["esd.loading.hub"]
    assert "esd.loading.checkpoint" in graph["esd.loading.formats"]   # imported in a function
    planted = {k: set(v) for k, v in graph.items()}
    planted["esd.loading.hub_http"].add("esd.loading.hub")
    assert find_cycle(planted) is not None


def test_the_modules_of_esd_import_each_other_without_a_cycle():
    cycle = find_cycle(esd_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_loading_never_imports_the_disk_budget():
    graph = esd_import_graph()
    offenders = sorted(m for m, targets in graph.items()
                       if m.startswith("esd.loading") and "esd.disk_budget" in targets)
    assert offenders == []
