"""The package's layering, enforced (issue 28 item 3): imports point one way, common/ <- eval/ <- methods/ <- scripts/.

  * nothing in common/ imports eval/, methods/ or scripts/; nothing in eval/ imports methods/ or scripts/;
  * common/'s modules import each other at module level only: no import of a common/ module inside a function
    (the old way to keep a cycle alive), none under `if TYPE_CHECKING`;
  * common/'s module-level import graph is acyclic (`order()` prints it bottom-up: run this file as a script).
Third-party imports inside functions are fine (optional extras such as vllm, peft, bitsandbytes, wandb; or a heavy
module that only one path needs).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("common", "eval", "methods", "scripts")  # each may import only the ones before it


def internal_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported first-party module, line, at module level?) for every import in `path`."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] if node.module not in LAYERS else [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(n, node.lineno, id(node) in top) for n in names if n.split(".")[0] in LAYERS]
    return out


def common_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted((ROOT / "common").glob("*.py")):
        graph[path.stem] = {n.split(".")[1] for n, _, _ in internal_imports(path) if n.startswith("common.")}
    return graph


def order(graph: dict[str, set[str]]) -> list[str]:
    """The modules bottom-up (each after everything it imports); AssertionError naming a cycle if there is one."""
    done, visiting, out = set(), [], []

    def visit(name):
        if name in done:
            return
        assert name not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(name):] + [name])}"
        visiting.append(name)
        for dep in sorted(graph.get(name, ())):
            visit(dep)
        visiting.pop()
        done.add(name)
        out.append(name)

    for name in sorted(graph):
        visit(name)
    return out


def test_layers_import_downwards_only():
    bad = []
    for i, layer in enumerate(LAYERS):
        for path in sorted((ROOT / layer).rglob("*.py")):
            for name, line, _ in internal_imports(path):
                if name.split(".")[0] in LAYERS[i + 1:]:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, bad


def test_common_imports_its_own_modules_at_module_level_only():
    bad = [f"common/{path.name}:{line} imports {name} inside a function or block"
           for path in sorted((ROOT / "common").glob("*.py"))
           for name, line, at_top in internal_imports(path) if name.startswith("common") and not at_top]
    assert not bad, bad


def test_common_has_no_import_cycle():
    assert len(order(common_graph())) == len(common_graph())


def test_the_cycle_check_finds_a_cycle():
    """The checker itself: a three-module cycle is named."""
    try:
        order({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()})
    except AssertionError as e:
        assert "a -> b -> c -> a" in str(e)
    else:
        raise AssertionError("no cycle reported")


if __name__ == "__main__":
    graph = common_graph()
    for name in order(graph):
        print(f"{name:15s} <- {', '.join(sorted(graph[name])) or '-'}")
