"""The import graph keeps its layers: each package imports only the ones below it, the model
library imports no Ray, and no production package imports the toy domain (it plugs in through
entry points, `pipelines.plugins`). Imports inside functions count as well."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first: a package may import those before it, never those after it.
LAYERS = ("omniflow", "pipelines", "serve", "jobs", "shapesworld", "benchmarks")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def edges(package: str) -> list[tuple[str, str]]:
    """(file:line, imported top-level package) for every import of a project package."""
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imports(path):
            top = module.split(".")[0]
            if top in LAYERS or top == "ray":
                out.append((f"{path.relative_to(ROOT)}:{line}", top))
    return out


@pytest.mark.parametrize("package", LAYERS)
def test_no_import_reaches_up(package):
    allowed = set(LAYERS[: LAYERS.index(package) + 1]) | {"ray"}
    if package == "omniflow":
        allowed.discard("ray")
    wrong = [f"{where} imports {top}" for where, top in edges(package) if top not in allowed]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_check_sees_lazy_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from shapesworld.toy import models\n    import ray.data\n")
    assert imports(path) == [(2, "shapesworld.toy"), (3, "ray.data")]
