"""The shape of the code (docs/architecture.md): rooms a reader can find, no import cycles, the core
free of transformers and of the command line, no class or function too long to read at once.

Read from the source with ``ast`` (every import counts, also one inside a function).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

import atp

ROOT = Path(atp.__file__).parent
LONGEST_CLASS = 300  # lines, docstrings included
LONGEST_FUNCTION = 100
ROOM_LINES = 250  # the host's rooms (compat, the one place of transformers knowledge, is not a room)
ROOMS = ("runtime", "calls", "checks", "strategies", "distributed", "handle", "checkpoint", "generate")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = modules()


def imports(name: str) -> set[str]:
    """The atp modules ``name`` imports (a ``from package import name`` counts as the submodule)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: imports(name) for name in MODULES}


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(GRAPH[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return found


def reachable(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for other in GRAPH[todo.pop()] - seen:
            seen.add(other)
            todo.append(other)
    return seen


def test_no_import_cycles():
    assert cycles() == []


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    monkeypatch.setitem(GRAPH, "atp.core.layout", GRAPH["atp.core.layout"] | {"atp.core.step"})
    assert any({"atp.core.layout", "atp.core.step"} <= set(component) for component in cycles())


@pytest.mark.parametrize(
    "name", sorted(n for n in MODULES if n.startswith(("atp.core", "atp.policies", "atp.scorers")))
)
def test_the_core_reaches_neither_the_host_nor_the_command_line(name):
    """The core (and the policies and scorers it calls) is what a second host reuses."""
    wrong = {other for other in reachable(name) if other.startswith(("atp.host", "atp.cli", "atp.backbones"))}
    # a position keeper reads transformers' argument names when a host calls it, not at import
    lazy = {"atp.host", "atp.host.compat"} if "atp.components.position_keeper" in reachable(name) else set()
    assert wrong <= lazy, f"{name} reaches {sorted(wrong - lazy)}"


@pytest.mark.parametrize(
    "name",
    sorted(
        n for n in MODULES if not n.startswith(("atp.cli", "atp.evaluation", "atp.study", "atp.__main__"))
    ),
)
def test_the_library_never_imports_its_command_line(name):
    assert not {other for other in GRAPH[name] if other.startswith("atp.cli")}


def test_no_module_imports_the_package_root():
    """``atp/__init__`` only names things; a module imports what it uses from where it lives."""
    assert sorted(name for name, targets in GRAPH.items() if "atp" in targets) == []


def lengths(kind) -> list[tuple[int, str]]:
    found = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, kind):
                found.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
    return sorted(found, reverse=True)


def test_no_class_or_function_too_long_to_read():
    assert [entry for entry in lengths(ast.ClassDef) if entry[0] > LONGEST_CLASS] == []
    functions = lengths((ast.FunctionDef, ast.AsyncFunctionDef))
    assert [entry for entry in functions if entry[0] > LONGEST_FUNCTION] == []


@pytest.mark.parametrize("room", ROOMS)
def test_each_room_of_the_host_is_small(room):
    assert len(MODULES[f"atp.host.{room}"].read_text().splitlines()) <= ROOM_LINES


def test_transformers_is_imported_only_where_its_knowledge_lives():
    """The host's compat, the backbones (families), and the tools that load or build models."""
    allowed = (
        "atp.host.compat",
        "atp.backbones",
        "atp.tiny",
        "atp.cli",
        "atp.evaluation",
        "atp.study",
        "atp.training",
    )
    importing = set()
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if (module or "").split(".")[0] == "transformers" or any(
                n.split(".")[0] == "transformers" for n in names
            ):
                importing.add(name)
    assert sorted(name for name in importing if not name.startswith(allowed)) == []


def test_the_top_level_shows_the_architecture():
    entries = sorted(p.name for p in ROOT.iterdir() if p.name != "__pycache__")
    packages = [name for name in entries if (ROOT / name).is_dir()]
    assert packages == [
        "backbones",
        "cli",
        "components",
        "core",
        "evaluation",
        "host",
        "policies",
        "scorers",
        "study",
        "tiny",
        "training",
    ]
    assert len(entries) <= 20, entries


def test_the_version_is_the_packages():
    pyproject = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
    assert atp.__version__ == pyproject["project"]["version"]
