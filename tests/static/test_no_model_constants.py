"""No module outside the model spec keeps a shape, a class count or an embedding size.

Every layer reads those from the model's spec (``models/<name>/spec.yaml`` through
``tasks.config.Settings.model_spec``); a module-level constant such as ``IMAGE_SIZE = 28`` or
``NUM_CLASSES = 10`` would silently pin one model. This test reads the source of ``tasks/``,
``plugins/`` and ``dags/`` and fails on such a constant, naming the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: names that would pin one model's numbers
FORBIDDEN_NAMES = {"IMAGE_SIZE", "NUM_CLASSES", "EMBEDDING_DIM", "EMBED_DIM", "VECTOR_SIZE", "RAW_BYTES", "IMAGE_SHAPE",
                   "INPUT_SHAPE",
                   "N_CLASSES", "CLASSES", "GOLDEN_PER_CLASS", "INPUT_NAME", "OUTPUT_NAMES"}
#: the digits model's side and raw frame size as module-level integer constants (10 and 64 are too common
#: as other settings to forbid by value: the names catch them)
FORBIDDEN_VALUES = {28, 784}
ALLOWED = {Path("tasks/contracts/spec.py")}


def _sources() -> list[Path]:
    files: list[Path] = []
    for folder in ("tasks", "plugins", "dags"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return [f for f in files if f.relative_to(ROOT) not in ALLOWED]


def _module_constants(tree: ast.Module) -> list[tuple[str, int, object]]:
    out = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        value = getattr(node, "value", None)
        for t in targets:
            if isinstance(t, ast.Name):
                literal = value.value if isinstance(value, ast.Constant) else None
                out.append((t.id, node.lineno, literal))
    return out


def problems(source: str, rel: str) -> list[str]:
    found = []
    for name, line, literal in _module_constants(ast.parse(source, rel)):
        if name in FORBIDDEN_NAMES:
            found.append(f"{rel}:{line}: module constant {name} (read it from the model spec)")
        elif isinstance(literal, int) and not isinstance(literal, bool) and literal in FORBIDDEN_VALUES:
            found.append(f"{rel}:{line}: {name} = {literal} looks like the digits model's size "
                         "(read it from the model spec)")
    return found


def test_no_module_keeps_a_model_shape_class_count_or_embedding_size():
    found = [p for path in _sources()
             for p in problems(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert not found, "model numbers outside the spec:\n" + "\n".join(found)


def test_the_check_names_the_constant_and_its_line():
    found = problems("OTHER = 3\nIMAGE_SIZE = 28\nSIDE: int = 784\nLIMIT = 64\n", "x.py")
    assert found == ["x.py:2: module constant IMAGE_SIZE (read it from the model spec)",
                     "x.py:3: SIDE = 784 looks like the digits model's size (read it from the model spec)"]
