"""The layout of feed/ is its layering: a lower layer never imports a higher one, and no two
modules import each other, however indirectly.

Read from the source (AST), so every import counts: at module level, inside a function (lazy) and
under `if TYPE_CHECKING:` alike, because each of them is a dependency a reader has to follow. From
the bottom up (each package's __init__.py says the same):

    shared      feed/__init__.py, errors.py, options.py, metrics.py, tls.py: used by every
                layer
    core        feed/core/: the change, row filters, rooms, the filter index, target rooms,
                snapshot chunks
    connectors  connectors/: the sources, built on the core
    security    feed/security/: auth, access rules, limits, the guard, room budgets
    delivery    feed/delivery/: the client protocol, the transport, the lean websocket
    routing     feed/routing/: the hub and the [server] settings it reads
    engine      feed/engine/: the cluster engine (reaches the hub; the hub names it by protocol)
    app         feed/app/ and feed/__main__.py: config, command line, server, HTTP, status
    demo        feed/demo/: `feed demo` (the command line loads it lazily, by name)

A module may import its own layer and any layer below it. A new module must go in a layer: one
that fits none fails here until it is placed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("feed", "connectors")

SHARED = {"feed", "feed.errors", "feed.options", "feed.metrics", "feed.tls"}
LAYERS = [
    "shared",
    "core",
    "connectors",
    "security",
    "delivery",
    "routing",
    "engine",
    "app",
    "demo",
]
PREFIXES = {
    "feed.core": "core",
    "connectors": "connectors",
    "feed.security": "security",
    "feed.delivery": "delivery",
    "feed.routing": "routing",
    "feed.engine": "engine",
    "feed.app": "app",
    "feed.__main__": "app",
    "feed.demo": "demo",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "dashboard" not in path.relative_to(ROOT).parts
    }


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every feed or connectors module `name` imports, wherever the import statement is."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1 more
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            # `from feed.app import listen` imports the module feed.app.listen
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # `import feed.core.change.x` style names: the longest known module they start with
            while target and target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def layer_of(module: str) -> str | None:
    if module in SHARED:
        return "shared"
    for prefix, layer in PREFIXES.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
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


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        source = layer_of(module)
        if source is None:
            problems.append(f"{module} is in no layer: move it into a layer's package")
            continue
        for target in sorted(targets):
            layer = layer_of(target)
            if layer is not None and LAYERS.index(layer) > LAYERS.index(source):
                problems.append(
                    f"{module} ({source}) imports {target} ({layer}), a higher layer: move the "
                    f"piece down, or pass it in as a callable or protocol"
                )
    return problems


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_the_layout(graph: dict[str, set[str]]) -> None:
    """A guard on the guard: an empty or misread graph would pass the two tests below."""
    assert "feed.routing.hub" in graph["feed.engine.core"]
    assert "feed.core.change" in graph["connectors.base"]
    assert "feed.app.listen" in graph["feed.demo.demo"]  # `from feed.app import listen`
    assert "feed.engine.redis" in graph["feed.app.cli"]  # a lazy import counts
    assert {layer_of(m) for m in graph} == set(LAYERS)


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    """No circle through a feed module. Circles inside connectors/ (a Redis or Postgres helper
    naming its connector's class for type hints) are the connectors' own business."""
    assert [c for c in cycles(graph) if any(m.split(".")[0] == "feed" for m in c)] == []


def test_no_import_from_a_lower_layer_into_a_higher_one(graph: dict[str, set[str]]) -> None:
    assert layer_violations(graph) == []


def test_the_checks_catch_what_they_are_for() -> None:
    """The checks themselves, on a made-up graph with one back-edge that also closes a cycle."""
    made_up = {
        "feed.core.rooms": {"feed.routing.hub"},
        "feed.routing.hub": {"feed.core.rooms", "feed.errors"},
        "feed.errors": set(),
        "feed.stray": set(),
    }
    assert cycles(made_up) == [["feed.core.rooms", "feed.routing.hub"]]
    assert layer_violations(made_up) == [
        "feed.core.rooms (core) imports feed.routing.hub (routing), a higher layer: move the "
        "piece down, or pass it in as a callable or protocol",
        "feed.stray is in no layer: move it into a layer's package",
    ]
