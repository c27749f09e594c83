"""The package's structure (docs/architecture.md): no import cycle, no oversized module, no private name imported
across modules. Read from the source with the ast module, so these checks cost no imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "dlplora"
MAX_LINES = 500
SIZE_EXEMPT: set[str] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import of a dlplora module in `name`,
    at any depth (function-level imports included: a lazy import is still a dependency)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    base = name.split(".") if _is_package(name) else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            found.append((target, [n for n in names if f"{target}.{n}" not in MODULES], node.lineno))
            found += [(m, [], node.lineno) for m in submodules]
    return found


def _graph() -> dict[str, set[str]]:
    """module -> the modules it makes Python run: the imported one and the packages above it, except the packages
    that hold the importer too (Python initialises those first, so they close no cycle)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        own = {".".join(m.split(".")[:i]) for i in range(1, len(m.split(".")) + 1)}
        for target, _, _ in _imports(m):
            if target not in MODULES:
                continue
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in MODULES and dep not in own and dep != m:
                    graph[m].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                cycle = visit(d)
                if cycle:
                    return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("low, high", [
    ("dlplora.library", ("dlplora.train", "dlplora.eval", "dlplora.engine", "dlplora.serve")),
    ("dlplora.decoding", ("dlplora.engine", "dlplora.serve", "dlplora.eval", "dlplora.fusion")),
    ("dlplora.eval", ("dlplora.train", "dlplora.serve", "dlplora.cli", "dlplora.pipelines")),
    ("dlplora.engine", ("dlplora.serve", "dlplora.eval", "dlplora.cli", "dlplora.train")),
])
def test_lower_layers_do_not_import_higher_ones(low, high):
    graph = _graph()
    for m, deps in graph.items():
        if m == low or m.startswith(low + "."):
            bad = [d for d in deps if any(d == h or d.startswith(h + ".") for h in high)]
            assert not bad, f"{m} imports {bad}"


def test_no_module_is_over_the_size_limit():
    big = {m: n for m, p in MODULES.items() if m not in SIZE_EXEMPT
           and (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_no_private_name_is_imported_across_modules():
    bad = []
    for m in MODULES:
        for target, names, line in _imports(m):
            bad += [f"{m}:{line} imports {n} from {target}" for n in names if n.startswith("_") and not n.startswith("__")]
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                bad += [f"{path.name}:{node.lineno} imports {a.name} from {node.module}" for a in node.names
                        if a.name.startswith("_")]
    assert not bad, "\n".join(bad)


def test_every_module_is_in_a_package_setuptools_finds():
    """pip install -e . finds packages with an __init__.py: every directory of modules needs one."""
    for path in (SRC / PACKAGE).rglob("*.py"):
        for parent in path.relative_to(SRC).parents:
            if str(parent) != ".":
                assert (SRC / parent / "__init__.py").is_file(), f"{parent} has no __init__.py"
