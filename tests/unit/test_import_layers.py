"""The project's import graph, read from the source (imports inside functions included): no
cycle between modules, and every layer imports only the layers below it.

    proto                                  the gRPC contract
    cluster core: config, protocol,        shared types, the engine wrapper, KV movement
        engine/, kv/, models/, client
    prefill_worker/, decode_worker/        the roles' worker actors (on the core)
    router/                                front end, scheduling, migration (on the core)
    cluster/entrypoints/, cluster/bench/,  what wires everything together; the planner
        cluster/planner/                   (profile, simulator, plan) beside them

Run it as a script (`python -m tests.unit.test_import_layers`) to print the graph's problems.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "router", "prefill_worker", "decode_worker", "proto")
CORE = ("cluster.config", "cluster.protocol", "cluster.engine", "cluster.kv", "cluster.models",
        "cluster.client")
WORKERS = ("prefill_worker", "decode_worker")
ENTRY = ("cluster.entrypoints", "cluster.bench", "cluster.planner")
# (importer prefix, forbidden prefixes, why)
RULES = (
    (CORE, ("router",) + WORKERS + ENTRY, "the core of cluster/ must not know roles or the router"),
    (("router",), WORKERS + ENTRY, "the router must not know a worker's internals"),
    (WORKERS, ("router",) + ENTRY, "workers must not know the router"),
    (("proto",), ("cluster", "router") + WORKERS, "the contract depends on nothing"),
)


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def project_modules(root: Path = REPO) -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement anywhere in the file refers to."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".") if is_package else module.split(".")[:-1]
                parent = parent[:len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            # `from a import b` names module a.b when it is one, else something in module a.
            names.update(base if alias.name == "*" else f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """module -> the project modules it imports (a name resolves to its longest module prefix)."""
    modules = project_modules(root)
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in _imported_names(path, module):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        for importers, forbidden, why in RULES:
            if not _within(module, importers):
                continue
            for target in sorted(targets):
                if _within(target, forbidden):
                    problems.append(f"{module} imports {target}: {why}")
    return problems


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_layers_import_only_downwards():
    assert layer_violations(import_graph()) == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    (tmp_path / "cluster").mkdir()
    (tmp_path / "router").mkdir()
    (tmp_path / "cluster" / "__init__.py").write_text("")
    (tmp_path / "router" / "__init__.py").write_text("")
    (tmp_path / "cluster" / "config.py").write_text("def f():\n    from router import policy\n")
    (tmp_path / "router" / "policy.py").write_text("from cluster.config import f\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["cluster.config", "router.policy"]]
    assert layer_violations(graph) == [
        "cluster.config imports router.policy: the core of cluster/ must not know roles or the router"]


def test_at_most_eight_modules_directly_in_cluster():
    direct = sorted(p.name for p in (REPO / "cluster").glob("*.py"))
    assert len(direct) <= 8, direct


if __name__ == "__main__":
    g = import_graph()
    problems = [" <-> ".join(c) for c in cycles(g)] + layer_violations(g)
    print("\n".join(problems) or f"{len(g)} modules: no cycles, layers respected")
    sys.exit(1 if problems else 0)
