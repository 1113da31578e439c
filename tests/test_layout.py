"""The package's layout, as a newcomer reads it: no import circle (lazy imports included), no two
modules with one name, and the data chain's stages in order, each saying which stage it is."""

from __future__ import annotations

import ast
import collections
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lmforge"
STAGES = ["sources", "records", "render", "store", "encode", "pack", "collate"]


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(path: pathlib.Path, known: dict) -> set[str]:
    """lmforge modules `path` imports anywhere in its text (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmforge"):
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
            found |= {node.module} & known.keys()
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & known.keys()
    return found


def test_no_import_circle():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    state: dict[str, int] = {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, " -> ".join(stack[stack.index(dep):] + [name, dep])
            if dep not in state:
                visit(dep, stack + [name])
        state[name] = 2

    for name in sorted(known):
        if name not in state:
            visit(name, [])


def test_no_two_modules_share_a_name():
    names = collections.Counter(path.name for path in PACKAGE.rglob("*.py") if path.name != "__init__.py")
    assert [n for n, count in names.items() if count > 1] == []


def test_data_chain_stages_are_in_order_and_only_look_upstream():
    known = modules()
    for number, stage in enumerate(STAGES, start=1):
        doc = ast.get_docstring(ast.parse((PACKAGE / "data" / f"{stage}.py").read_text()))
        assert doc.startswith(f"Stage {number} of the data chain"), stage
        later = {f"lmforge.data.{s}" for s in STAGES[number:]} | {"lmforge.data.batches"}
        assert not imports(PACKAGE / "data" / f"{stage}.py", known) & later, stage
    chain = ast.get_docstring(ast.parse((PACKAGE / "data" / "__init__.py").read_text()))
    positions = [chain.index(f"{stage}.py") for stage in STAGES]
    assert positions == sorted(positions)
