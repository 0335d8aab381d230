"""The code base's shape: no import cycle, no module reaching into another's private names, and the
top level holding only entry points and the method's modules."""
import ast
from pathlib import Path

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
                          "meterml_pretrain", "models", "pack", "predict", "sen12ms_pretrain", "summarize",
                          "synthetic_data"])
