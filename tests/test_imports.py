"""No import cycles between rankops modules, counting imports inside functions too.

The graph is built from the source alone (every module's AST, every Import and ImportFrom
node wherever it stands), so an import deferred into a function to dodge a cycle at import time
still counts: such a cycle is a knot in the design even when Python tolerates it.

An edge a -> b means module a names module b in an import: `import rankops.b`,
`from rankops.b import name`, `from rankops import b` (b a submodule), or their relative
forms. Importing a submodule also initialises its parent packages, but that is not counted:
every module would otherwise be in a cycle with the package __init__ that imports it.
"""
import ast
from pathlib import Path

import rankops

PACKAGE_DIR = Path(rankops.__file__).resolve().parent


def module_files(root: Path = PACKAGE_DIR) -> dict:
    """{dotted module name: source path} of every module in the package; compiled extensions
    (rankops._C) are modules too, with no source (None) and so no imports."""
    modules = {}
    for path in sorted(root.rglob("*")):
        if path.suffix == ".py":
            parts = ("rankops",) + path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
        elif path.suffix in (".so", ".pyd"):  # _C.cpython-311-x86_64-linux-gnu.so: module _C
            parts = ("rankops",) + path.relative_to(root).parent.parts + (path.name.split(".")[0],)
            modules[".".join(parts)] = None
    # The compiled extension is a module even where the build keeps it outside the source tree
    # (an editable install): `from rankops import _C` names it, not the package.
    modules.setdefault("rankops._C", None)
    return modules


def imports_of(name: str, path: Path, modules) -> set:
    """The rankops modules that module `name` (at path) imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package holding this module, level - 1 up
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)  # `from pkg import submodule`
    return {m for m in found if m in modules and m != name}


def import_graph(modules) -> dict:
    return {name: imports_of(name, path, modules) if path is not None else set()
            for name, path in modules.items()}


def cycles(graph) -> list:
    """Every strongly connected component with more than one module (Tarjan), each sorted,
    with one cycle through it as a readable path."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(component, cycle_through(graph, component)) for component in sorted(components)]


def cycle_through(graph, component) -> list:
    """A shortest path from the component's first module back to itself, inside the component."""
    start, members = component[0], set(component)
    paths, frontier = {start: [start]}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not strongly connected")


def test_no_import_cycles():
    graph = import_graph(module_files())
    found = cycles(graph)
    report = []
    for component, path in found:
        inside = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & set(component))]
        report.append(f"  {' -> '.join(path)}\n    every import among these modules: {'; '.join(inside)}")
    assert not found, "import cycles between rankops modules (imports inside functions count):\n" + \
        "\n".join(report)


def test_the_check_sees_cycles(tmp_path):
    # The graph builder on a package of its own, with every kind of import that can close a
    # cycle: absolute, relative, `from package import submodule`, and inside a function.
    pkg = tmp_path / "rankops"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from rankops import a\n",
        "a.py": "def f():\n    from .sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "from ..c import x\n",
        "c.py": "import rankops.a\nx = 1\n",
        "d.py": "from rankops.sub import b\n",   # into the cycle, not part of it
        "e.py": "from . import f\n",
        "f.py": "def g():\n    import rankops.e\n",
        "_C.cpython-311-x86_64-linux-gnu.so": "",   # a compiled extension is a module
        "g.py": "from rankops import _C\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    modules = module_files(pkg)
    graph = import_graph(modules)
    assert graph["rankops"] == {"rankops.a"} and graph["rankops.d"] == {"rankops.sub.b"}
    assert graph["rankops.g"] == {"rankops._C"} and graph["rankops._C"] == set()
    assert cycles(graph) == [
        (["rankops.a", "rankops.c", "rankops.sub.b"], ["rankops.a", "rankops.sub.b", "rankops.c", "rankops.a"]),
        (["rankops.e", "rankops.f"], ["rankops.e", "rankops.f", "rankops.e"]),
    ]


def test_public_names():
    # Every name rankops exports exists, and the list is sorted (new names go in their place).
    missing = [name for name in rankops.__all__ if not hasattr(rankops, name)]
    assert not missing, f"rankops.__all__ names what rankops does not have: {missing}"
    assert rankops.__all__ == sorted(rankops.__all__)
    for name in ("compensated_cross_entropy", "compensated_linear_cross_entropy",
                 "CompensatedCausalLMLoss", "CompensatedCausalLMLinearLoss", "linear_token_stats"):
        assert name in rankops.__all__
