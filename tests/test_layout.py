"""The house's layout: imports run one way (no circles, counting the imports inside functions and
`importlib.import_module("lab....")` too), and the modules the design names are where it names them."""
import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
SCRIPTS = ["run_experiment.py", "compare.py", "bench.py"]


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources():
    return {module_name(p): p for p in [*ROOT.glob("lab/**/*.py"), *(ROOT / s for s in SCRIPTS)]}


def is_main_guard(node):
    """`if __name__ == "__main__":`: what runs when the file is a script, not part of importing it."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__")


def imported(path, known):
    """The project modules `path` imports, anywhere in it but its main guard and a package's module-level
    `__getattr__` (PEP 562: the package hands a submodule's name on when asked, the way `import lab.x` reaches it)."""
    found = set()

    def visit(node):
        if is_main_guard(node) or (isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
                                   and path.name == "__init__.py"):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from lab import build`
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant)):
            found.add(node.args[0].value)
        for child in ast.iter_child_nodes(node):
            visit(child)
    visit(ast.parse(path.read_text()))
    return {name for name in found if name in known}


def import_graph():
    known = sources()
    graph = {name: imported(path, known) - {name} for name, path in known.items()}
    for name in known:  # importing lab.x.y runs lab/x/__init__.py first
        parent = name.rpartition(".")[0]
        if parent in known and parent != name and name not in graph[parent]:
            graph[name].add(parent)
    return graph


def find_circle(graph):
    """One circle of imports as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                circle = visit(target, path + [target])
                if circle:
                    return circle
        state[node] = "done"
        return None
    for node in sorted(graph):
        if node not in state:
            circle = visit(node, [node])
            if circle:
                return circle
    return None


def test_imports_run_one_way():
    graph = import_graph()
    assert len(graph) > 20  # the walk found the house
    circle = find_circle(graph)
    assert circle is None, " -> ".join(circle)


def test_the_circle_finder_finds_one():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_the_modules_the_design_names_exist():
    for path in ["lab/model_zoo.py", "lab/schedules.py", "lab/trainer.py", "lab/eval.py", "lab/checks.py",
                 "run_experiment.py", "compare.py"]:
        assert (ROOT / path).is_file(), path
