"""The code base's shape: no import cycle, no module reaching into another's private names, and the
top level holding only entry points and the method's modules."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = {p.relative_to(REPO).with_suffix("").as_posix().replace("/", "."): p
           for p in [*REPO.glob("*.py"), *REPO.glob("datasets/*.py"), *REPO.glob("util/*.py")]}
MODULES = {name.removesuffix(".__init__"): path for name, path in MODULES.items()}


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported project module, names taken from it) of every import statement of a module."""
    found = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, []) if sub in MODULES else (base, [alias.name]))
    return [(module, names) for module, names in found if module in MODULES]


def test_no_module_imports_another_modules_private_names():
    private = [(name, module, n) for name, path in MODULES.items() for module, names in _imports(name, path)
               for n in names if n.startswith("_")]
    assert private == []


def test_no_import_cycle():
    graph = {name: {module for module, _ in _imports(name, path)} - {name} for name, path in MODULES.items()}
    # A package's __init__ re-exporting its modules is not a cycle of theirs: drop package -> member edges.
    graph = {name: {m for m in deps if not m.startswith(name + ".")} for name, deps in graph.items()}
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        stack.pop()

    for name in sorted(graph):
        visit(name)
    assert cycles == []


def test_the_top_level_holds_entry_points_and_the_methods_modules():
    top = sorted(p.stem for p in REPO.glob("*.py"))
    assert top == sorted(["augment", "dfc_finetune", "embed", "engine", "losses", "meterml_finetune",
                          "meterml_pretrain", "models", "pack", "predict", "prepare_scene", "sen12ms_pretrain", "summarize",
                          "synthetic_data"])


# The layers, bottom up: util/ imports nothing of the project above it; the data package takes only from itself
# and util/; the method's modules only from util/; the engine no data module; a script or tool no other one.
METHOD = ("augment", "losses", "models")
LAYER_RULES = {"util": ("util",), "datasets": ("datasets", "util"), **{m: ("util",) for m in METHOD},
               "engine": ("util", *METHOD)}


def _layer(module: str) -> str:
    return module.split(".")[0]


def test_each_layer_takes_only_from_below():
    broken = [(name, module) for name, path in MODULES.items() for module, _ in _imports(name, path)
              if _layer(name) in LAYER_RULES and _layer(module) != _layer(name)
              and _layer(module) not in LAYER_RULES[_layer(name)]]
    assert broken == []


def test_no_script_or_tool_imports_another():
    entry_points = {name for name in MODULES if "." not in name and name not in LAYER_RULES}
    borrowed = [(name, module) for name in entry_points for module, _ in _imports(name, MODULES[name])
                if _layer(module) in entry_points]
    assert borrowed == []


def test_models_holds_the_models_only():
    assert len((REPO / "models.py").read_text().splitlines()) <= 400


@pytest.mark.slow
def test_the_methods_modules_load_no_data_reader():
    """Importing losses, models or augment (a fresh interpreter) loads neither rasterio nor the data package."""
    code = ("import sys, augment, losses, models; "
            "print(sorted(m for m in ('rasterio', 'datasets', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
