"""The layout of the packages: no import cycle, and imports only go down the layers.

    runtime/            imports nothing else of the project (an artifact runs with it alone)
    passes/, formats/   the graph rewrites and format descriptions
    targets/            imports passes/ and runtime/, never compiler/
    compiler/, sparsify/, benchmarks/   the tools on top

The import graph is read from the source, not by importing it: every ``.py`` of the
project's packages is parsed and every ``import`` and ``from ... import`` in it counts,
those inside functions too (a cycle that only closes at run time is a cycle), plus
``importlib.import_module`` of a constant name. Importing ``a.b.c`` also runs the
``__init__`` of ``a`` and ``a.b``; those count too, except the packages the importer is
itself inside (they are already being imported when it runs). A module found through a
table by name (``targets.TARGETS``, ``sparsify.methods.METHODS``) is imported by the one
that looks it up, with a name that is data; the table checks below cover those.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runtime", "passes", "formats", "targets", "compiler", "sparsify", "benchmarks")


def project_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the given top-level packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imported_names(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The dotted names ``module`` imports (anywhere in the file), before resolution."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # ``from a import b`` imports the module a.b where there is one.
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports (see the module docstring for what counts)."""
    modules = project_modules(root, packages)
    graph = {}
    for module, path in modules.items():
        inside = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        targets = set()
        for name in _imported_names(module, path, modules):
            while name and name not in modules:  # ``from a.b import function``: the module a.b
                name = name.rpartition(".")[0]
            parts = name.split(".") if name else []
            for i in range(1, len(parts) + 1):
                ancestor = ".".join(parts[:i])
                if ancestor in modules and ancestor not in inside:
                    targets.add(ancestor)
        targets.discard(module)
        graph[module] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def imports_across(graph: dict[str, set[str]], source: str, forbidden: tuple[str, ...]) -> list[str]:
    """``"importer -> imported"`` for every import from package ``source`` into ``forbidden``."""
    return sorted(f"{module} -> {target}" for module, targets in graph.items() if module.split(".")[0] == source
                  for target in targets if target.split(".")[0] in forbidden)


@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT)


def test_the_project_has_no_import_cycle(graph):
    assert find_cycles(graph) == []


def test_the_runtime_imports_nothing_above_it(graph):
    assert imports_across(graph, "runtime", ("compiler", "passes", "targets", "sparsify", "benchmarks", "formats")) == []


def test_targets_import_nothing_of_the_compiler(graph):
    assert imports_across(graph, "targets", ("compiler", "sparsify", "benchmarks")) == []


def test_the_graph_sees_function_level_imports_and_package_inits(tmp_path):
    """The checks above are only as good as the graph: a cycle closed by an import inside a
    function, and one closed through a package's ``__init__``, are both found."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from pkg.b import helper\n")
    (tmp_path / "pkg" / "a.py").write_text("def late():\n    from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("import pkg.a\n\ndef helper():\n    pass\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "__init__.py").write_text("")
    (tmp_path / "other" / "c.py").write_text("from pkg.a import late\n")
    (tmp_path / "other" / "d.py").write_text("import importlib\nimportlib.import_module('other.c')\n")
    found = import_graph(tmp_path, ("pkg", "other"))
    assert found["pkg.a"] == {"pkg.b"} and found["pkg.b"] == {"pkg.a"}
    assert found["other.c"] == {"pkg", "pkg.a"} and found["other.d"] == {"other.c"}
    assert find_cycles(found) == [["pkg.a", "pkg.b"]]
    (tmp_path / "pkg" / "a.py").write_text("import other.c\n")  # closes pkg.a -> other.c -> pkg (init) -> pkg.b -> pkg.a
    assert find_cycles(import_graph(tmp_path, ("pkg", "other"))) == [["other.c", "pkg", "pkg.a", "pkg.b"]]


def test_every_sparsification_method_is_a_module_with_its_function():
    from sparsify.methods import METHODS

    for name, info in METHODS.items():
        module = importlib.import_module(info.module)
        function = {"weights": "prune", "activations": "gate"}[info.kind]
        assert callable(getattr(module, function, None)), f"{info.module} has no {function}() for {name}"
        assert list(inspect.signature(getattr(module, function)).parameters) == (
            ["model", "layers", "method", "options", "progress"] if info.kind == "weights"
            else ["model", "method", "options", "progress"]), name


def test_the_targets_look_alike():
    """Each target is a plain class (no target derives from another) with the same methods."""
    from targets import TARGETS, get_target

    specs = {"cpu": "cpu", "cuda": "cuda", "neuro": "neuro:seneca"}
    assert set(specs) == set(TARGETS)
    for name, spec in specs.items():
        target = get_target(spec)
        assert type(target).__bases__ == (object,), f"{name}: {type(target).__bases__}"
        assert target.name == name
        for method in ("unsupported_ops", "legalize", "lower", "build"):
            assert method in vars(type(target)), f"{name} does not define {method}"
