"""The package's shape, read from its source with `ast`: imports run one way through the layers, without cycles
and without long chains, and no module grows past 400 lines (docs/architecture.md)."""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sqaudio"
# Bottom to top. A module may import its own sub-package and any lower layer; the shared leaves may also import
# each other (never in a cycle); data and models, or training and evaluation, never import each other.
LAYERS = [
    {"errors", "config", "files", "checkpoint", "distributed", "plots"},
    {"data", "models"},
    {"codec"},
    {"training", "evaluation"},
    {"cli"},
]
ENTRY = "sqaudio.__main__"  # `python -m sqaudio`: it only calls the CLI
MAX_CHAIN = 8
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=1)
def modules() -> dict[str, Path]:
    found = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    found.pop(ENTRY, None)
    return found


def imports(path: Path) -> set[str]:
    """The sqaudio modules `path` imports, at module level or inside functions."""
    known, found = modules(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sqaudio":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found - {"sqaudio"}


@lru_cache(maxsize=1)
def graph() -> dict[str, set[str]]:
    return {name: imports(path) - {name} for name, path in modules().items()}


def group(module: str) -> str:
    """The top-level part of sqaudio a module belongs to: `data` for sqaudio.data.store, `config` for sqaudio.config."""
    return module.split(".")[1] if "." in module else "__init__"


def layer(module: str) -> int:
    name = group(module)
    return next((i for i, names in enumerate(LAYERS) if name in names), -1)


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer(m) < 0 and group(m) != "__init__"] == []


def test_imports_run_down_the_layers():
    wrong = [f"{m} imports {i}" for m, deps in graph().items() for i in sorted(deps)
             if group(i) != group(m) and group(i) != "__init__" and layer(i) >= max(layer(m), 1)]
    assert wrong == [], "imports must point to a lower layer (docs/architecture.md):\n" + "\n".join(wrong)


def test_no_import_cycles():
    edges, state, cycles = graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(edges[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [node, dep]) if dep in path else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, path + [node])
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_import_chains_are_short():
    """At most MAX_CHAIN imports from any module down to the bottom (counted in import steps)."""
    edges = graph()

    @lru_cache(maxsize=None)
    def longest(node: str) -> tuple[str, ...]:
        below = [longest(dep) for dep in edges[node]]
        return (node,) + max(below, key=len, default=())

    chain = max((longest(m) for m in edges), key=len)
    assert len(chain) - 1 <= MAX_CHAIN, " -> ".join(chain)


def test_modules_are_small():
    big = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}


def test_the_checker_sees_real_imports():
    """The graph is read, not empty: the CLI reaches training, training reaches the models."""
    edges = graph()
    assert "sqaudio.cli.app" in edges["sqaudio.cli.train"]
    assert any(group(d) == "models" for d in edges["sqaudio.training.sqvae"])
