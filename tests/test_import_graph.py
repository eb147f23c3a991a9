"""The project's modules import one another in one direction: no cycles, and the rooms of
``lorastream/`` point the way the README says (the CLI uses the operations, never the other
way round; schemas imports nothing of ours).

Every import statement counts, wherever it stands: a lazy import inside a function is the
same arrow as one at the top, only hidden. ``if TYPE_CHECKING:`` imports count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "streams", "trainer", "lorastream")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _imported(node: ast.AST, here: str, is_package: bool, known: set[str]) -> list[str]:
    """The project modules one import statement names (a ``from X import y`` names X.y
    when y is a module, else X)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = here.split(".") if is_package else here.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, *([node.module] if node.module else [])])
    else:
        target = node.module or ""
    names = []
    for alias in node.names:
        if f"{target}.{alias.name}" in known:
            names.append(f"{target}.{alias.name}")
        elif target in known:
            names.append(target)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = {
            target
            for node in ast.walk(tree)
            for target in _imported(node, name, is_package, known)
            if target != name
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_project_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 50, sorted(graph)  # the walk found the project, not an empty tree
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_a_lazy_import_inside_a_function_is_an_arrow_too() -> None:
    tree = ast.parse("def run():\n    from trainer import core, Trainer\n    import schemas\n")
    known = {"trainer", "trainer.core", "schemas"}
    found = [t for node in ast.walk(tree) for t in _imported(node, "lorastream.x", False, known)]
    assert sorted(found) == ["schemas", "trainer", "trainer.core"]


@pytest.mark.parametrize(
    ("room", "must_not_reach"),
    [
        ("schemas", ("streams", "trainer", "lorastream")),
        ("streams", ("trainer", "lorastream")),
        ("trainer", ("streams", "lorastream")),
        ("lorastream.ops", ("lorastream.cli", "lorastream.demo")),
        ("lorastream.dev", ("lorastream.cli", "lorastream.demo")),
        ("lorastream.serving", ("lorastream.cli", "lorastream.demo")),
        ("lorastream.settings", ("lorastream.cli", "lorastream.ops", "lorastream.demo")),
        ("lorastream.stages", ("lorastream.cli", "lorastream.ops", "lorastream.demo")),
    ],
)
def test_the_rooms_point_one_way(room: str, must_not_reach: tuple[str, ...]) -> None:
    graph = import_graph()
    members = [name for name in graph if name == room or name.startswith(f"{room}.")]
    assert members, room
    wrong = sorted(
        f"{name} -> {target}"
        for name in members
        for target in graph[name]
        if any(target == other or target.startswith(f"{other}.") for other in must_not_reach)
    )
    assert wrong == []
