"""The package's layout, as a newcomer reads it: the top level holds the entry points and the shared
basics only (the rest lives on its floor: modeling/, training/, data/, rl/, kernels/), every
package's docstring names each of its modules, no import circle (lazy imports included), no two
modules with one name, and the data chain's stages in order, each saying which stage it is."""

from __future__ import annotations

import ast
import collections
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lmforge"
STAGES = ["sources", "records", "render", "store", "encode", "pack", "collate"]
# `lmforge <command>` and `python -m lmforge.<command>` (torchrun, deepspeed --module) entries, which
# must stay where they are, and the basics every floor reads: flags, parsing, errors, logs, the recipe.
ENTRIES = ["__init__", "__main__", "cli", "commands", "sft", "lora", "pretrain", "dpo", "grpo", "prepare",
           "export", "tokenizer", "chat", "demo", "report"]
BASICS = ["flags", "flag_help", "config", "errors", "logs", "recipe"]


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


def test_top_level_holds_only_the_entries_and_the_basics():
    top = {path.stem for path in PACKAGE.glob("*.py")}
    assert sorted(top) == sorted(ENTRIES + BASICS), "a new module belongs on a floor (a package), not at the top"


def test_every_package_docstring_names_each_of_its_modules():
    packages = [path.parent for path in PACKAGE.rglob("__init__.py") if path.parent != PACKAGE]
    assert {p.name for p in packages} >= {"modeling", "training", "data", "rl", "kernels"}
    for package in packages:
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
        unnamed = [p.name for p in sorted(package.glob("*.py"))
                   if p.name != "__init__.py" and not re.search(rf"(?<![\w/.]){re.escape(p.name)}", doc)]
        assert unnamed == [], f"{package.name}/__init__.py does not name {unnamed}"


def test_package_inits_import_nothing():
    """Every floor is imported lazily: an `__init__` that imported its modules would load torch
    with `lmforge.flags` (the help runs without it)."""
    for init in PACKAGE.rglob("__init__.py"):
        tree = ast.parse(init.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))], init
