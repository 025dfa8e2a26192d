"""The package keeps its layers: each module imports only from its own layer and the ones below, no
module imports another module's `_private` names, and there is no import circle inside finetune/.

Read from the source with `ast` (imports inside functions count too), so the check needs no model.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "finetune"

# Lowest first. A module may import from its own layer and any layer below it.
LAYERS = [
    ["core"],
    ["tasks", "runtimes"],
    ["models"],
    ["data"],
    ["train", "export", "evaluate"],
    ["route"],
    ["pipeline"],
    ["__main__"],
]
LAYER_OF = {part: i for i, parts in enumerate(LAYERS) for part in parts}
MAX_LINES = 400


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources(*folders: Path) -> dict[str, Path]:
    return {module_name(p): p for folder in folders for p in sorted(folder.rglob("*.py"))}


MODULES = sources(PACKAGE)


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every `finetune` import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
                node.module == "finetune" or node.module.startswith("finetune.")):
            names = [a.name for a in node.names]
            # `from finetune.x import y` may name a submodule y
            subs = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
            for sub in subs:
                found.append((sub, [], node.lineno))
            found.append((node.module, [n for n in names if f"{node.module}.{n}" not in MODULES], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "finetune" or alias.name.startswith("finetune."):
                    found.append((alias.name, [], node.lineno))
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1]) if len(parts) > 1 else None


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, _, _ in imports_of(path):
            if target in MODULES and target != module:
                edges[module].add(target)
    return edges


def test_every_module_belongs_to_a_layer():
    loose = [m for m in MODULES if m != "finetune" and layer(m) is None]
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"


def test_each_layer_imports_only_from_itself_and_below():
    wrong = []
    for module, path in MODULES.items():
        own = layer(module)
        for target, _, line in imports_of(path):
            there = layer(target)
            if own is not None and there is not None and there > own:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module} (layer {own}) imports {target} (layer {there})")
    assert not wrong, "\n".join(wrong)


def test_core_imports_nothing_else_of_ours():
    wrong = [f"{p.relative_to(ROOT)}:{line}: {t}" for m, p in MODULES.items() if layer(m) == 0
             for t, _, line in imports_of(p) if layer(t) != 0]
    assert not wrong, "\n".join(wrong)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_circle_inside_the_package():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_check_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("folder", ["finetune", "tests", "scripts"])
def test_no_private_name_is_imported_across_modules(folder):
    wrong = []
    for module, path in sources(ROOT / folder).items():
        for target, names, line in imports_of(path):
            private = [n for n in names if n.startswith("_")]
            if private and target != module:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: from {target} import {', '.join(private)}")
    assert not wrong, "\n".join(wrong)


def test_no_file_is_over_the_size_limit():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, "\n".join(long)


def test_no_source_cites_a_file_outside_the_repository():
    outside = "FACTS" + ".md"  # the shared notes of the workplace, not part of this repository
    files = [*MODULES.values(), *sources(ROOT / "scripts").values(), *sources(ROOT / "tests").values()]
    wrong = [f"{p.relative_to(ROOT)}" for p in files if outside in p.read_text(encoding="utf-8")]
    assert not wrong, wrong


def test_no_system_exit_below_main():
    wrong = []
    for module, path in MODULES.items():
        if module.endswith(".__main__"):  # a program's entry (python -m finetune, python -m finetune.route)
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Name) and node.id == "SystemExit" or (
                    isinstance(node, ast.Attribute) and node.attr == "exit" and getattr(node.value, "id", "") == "sys"):
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not wrong, wrong
