"""The layers of ``tasks/`` (docs/ARCHITECTURE.md): an import only points down, and there is no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tasks"

#: layer -> the layers its modules may import (besides their own).
ALLOWED = {
    "contracts": set(),
    "config": {"contracts"},
    "logs": {"contracts", "config"},
    "adapters": {"contracts", "config", "logs"},
    "model": {"contracts", "config", "logs", "adapters"},
    "steps": {"contracts", "config", "logs", "adapters", "model"},
    "serving": {"contracts", "config", "logs", "adapters", "model"},
    "local": {"contracts", "config", "logs", "adapters", "model", "steps", "serving"},
    "tools": {"contracts", "config", "logs", "adapters", "model", "steps", "serving", "local"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


#: top-level modules that belong to a layer of a package's name (``tasks/tracing.py`` sits beside ``tasks/logs.py``)
MODULE_LAYER = {"tracing": "logs"}


def layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in MODULE_LAYER:
        return MODULE_LAYER[parts[1]]
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tasks")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tasks") and node.level == 0:
            if node.module == "tasks":
                found |= {f"tasks.{a.name}" for a in node.names}
            else:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names
                          if (TASKS.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists()}
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in TASKS.rglob("*.py")}


def test_every_package_of_the_layout_exists():
    for pkg in ("contracts", "adapters", "model", "steps", "serving", "local", "tools"):
        assert (TASKS / pkg / "__init__.py").is_file(), f"tasks/{pkg}/ is missing"
    assert (TASKS / "config.py").is_file()


def test_imports_only_point_down():
    problems = []
    for name, path in modules().items():
        src = layer(name)
        if src is None:  # tasks/cli.py and the deprecated aliases sit on top
            continue
        for target in imports(path):
            dst = layer(target)
            if dst is not None and dst != src and dst not in ALLOWED[src]:
                problems.append(f"{name} ({src}) imports {target} ({dst})")
    assert not problems, "imports that point up:\n" + "\n".join(sorted(problems))


def test_no_import_cycles_at_module_level():
    mods = modules()
    graph = {name: {t for t in imports(path, top_level_only=True) if t in mods and t != name}
             for name, path in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from tasks.serving.consumer import StreamConsumer\n\ndef f():\n    from tasks.local import stack\n")
    assert imports(bad) >= {"tasks.serving.consumer", "tasks.local.stack"}
    assert imports(bad, top_level_only=True) == {"tasks.serving.consumer"}
