"""The package's own import graph has no cycle.

Every module under lowrank_kernels is parsed with ``ast``; each import statement that can run
(module level or inside a function; ``if TYPE_CHECKING:`` blocks never run and are left out),
relative or absolute, gives an edge to the lowrank_kernels module it loads. A cycle is a module
that imports, directly or through others, a module that imports it back, even lazily inside a
function. Importing a submodule also runs its parent packages' ``__init__``; those implicit edges
are left out, since a package's ``__init__`` gathers its submodules by design.
"""

import ast
import pathlib

import lowrank_kernels

ROOT = pathlib.Path(lowrank_kernels.__file__).resolve().parent
PACKAGE = "lowrank_kernels"
def module_names() -> dict:
    """Dotted module name -> path, for every .py file of the package (a package is its __init__)."""
    names = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE,) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """The Import/ImportFrom nodes of ``tree`` that can run (not under ``if TYPE_CHECKING:``)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict:
    """Module -> the set of package modules it imports (self-imports left out)."""
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names if alias.name in modules)
                continue
            if node.level:
                # A relative import counts from the module's package (a package's own name for __init__).
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                # `from pkg import sub` loads the submodule pkg.sub; `from mod import name` loads mod.
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    targets.add(sub)
                elif base in modules:
                    targets.add(base)
        targets.discard(name)
        graph[name] = targets
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_graph_sees_every_kind_of_import():
    graph = import_graph()
    # Module level, absolute: nn/lora.py -> nn/registry.py.
    assert "lowrank_kernels.nn.registry" in graph["lowrank_kernels.nn.lora"]
    # Inside a function: nn/sora.py's prune_sora imports nn/convert.py.
    assert "lowrank_kernels.nn.convert" in graph["lowrank_kernels.nn.sora"]
    # `from package import submodule` in a package's __init__.
    assert "lowrank_kernels.nn.lora" in graph["lowrank_kernels.nn"]
    # TYPE_CHECKING-only imports never run: nn/registry.py names LowRankLinear only for annotations.
    assert "lowrank_kernels.nn.module" not in graph["lowrank_kernels.nn.registry"]


def test_cycles_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def _assert_no_cycle(graph: dict) -> None:
    found = cycles(graph)
    assert not found, "import cycles among lowrank_kernels modules: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_import_cycle():
    _assert_no_cycle(import_graph())


def private_reads() -> list:
    """Every place a package module reads another package module's private (underscore) name:
    ``from lowrank_kernels.x import _name`` or ``alias._name`` on an imported package module. A
    private module itself (``ops._checks``) may be imported; its public names are its interface."""
    modules = module_names()
    leaves = {m.split(".")[-1] for m in modules}  # what a relative import may name
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        module_aliases = set()
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                module_aliases.update((a.asname or a.name).split(".")[0] for a in node.names
                                      if a.name.split(".")[0] == PACKAGE)
                continue
            base = node.module or ""
            if not (node.level or base.split(".")[0] == PACKAGE):
                continue
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if f"{base}.{alias.name}" in modules or (node.level and alias.name in leaves):
                    module_aliases.add(alias.asname or alias.name)
                elif private:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name} from {base}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {node.value.id}.{node.attr}")
    return found


def test_no_module_reads_another_modules_private_names():
    assert private_reads() == []
