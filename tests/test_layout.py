"""Imports between the library's modules run one way: no cycles, and the product's parts keep to
their rooms (training and serving never import each other; data and the shared modules import
neither; conversion imports only the shared modules)."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "alpaca_tune"
SHARED = {"settings", "errors", "cli", "base_model", "device", "adapter_files", "adapter_check", "allocator"}
# part -> parts it may import (besides itself and the shared modules)
ALLOWED = {"data": set(), "training": {"data"}, "serving": {"data"}, "conversion": set(), "shared": set(),
           "export": {"data", "serving", "conversion"},
           "webui": {"data", "serving", "export"}}  # export reads adapters as serving does, writes as conversion


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the alpaca_tune modules it imports (anywhere in it, functions included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            found |= {c for c in candidates if c in modules and c != name}
        graph[name] = found
    return graph


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in SHARED:
        return "shared"
    return parts[1]


def test_the_import_graph_has_no_cycles():
    graph = _imports()
    assert len(graph) > 40  # the parser found the modules
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for target in graph[module]:
            if target.endswith("__init__") or target == module.rsplit(".", 1)[0]:
                continue  # a package's own __init__ (docstrings and an error class) holds no logic
            assert state.get(target) != "open", " -> ".join(path + [target])
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_each_part_imports_only_what_it_may():
    wrong = []
    for module, targets in _imports().items():
        mine = _part(module)
        for target in targets:
            theirs = _part(target)
            if theirs not in {mine, "shared"} | ALLOWED[mine]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)
