"""The layout's rules, checked over the source (an AST walk, nothing imported): no function over 60 lines outside
tests, no import circle among the project's modules, and the core never importing a stage (ARCHITECTURE.md)."""
import ast
from pathlib import Path

from tests.conftest import ROOT

MAX_LINES = 60
CORE = {"model", "tokenizer", "checkpoint", "lora", "generate", "llm", "precision", "cli", "jsonl", "data",
        "constrain", "schema", "quant", "memory_plan"}
STAGES = {"scrape", "annotate", "selfinstruct", "retrieval", "evaluate", "demo", "serve", "train_ddp", "bench"}


def sources(root: Path) -> dict[str, Path]:
    """module name -> file, for every .py outside tests, the venv and outputs."""
    skip = {".venv", "tests", "out", ".git"}
    found = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root).with_suffix("").parts)
        if skip & set(parts):
            continue
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = p
    return found


def long_functions(root: Path) -> list[str]:
    out = []
    for path in sources(root).values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} is {n} lines")
    return out


def _targets(node, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: climb from the importing module's package
        up = package.split(".")[: max(len(package.split(".")) - node.level + 1, 0)] if package else []
        base = ".".join([*up, base] if base else up)
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports (at the top or inside functions)."""
    paths = sources(root)
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for t in _targets(node, package):
                while t and t not in paths:
                    t = t.rpartition(".")[0]
                if t and t != name and not name.startswith(t + "."):  # a submodule may import its own package
                    found.add(t)
        graph[name] = found
    return graph


def import_cycles(root: Path) -> list[str]:
    graph, state, cycles = import_graph(root), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_function_is_longer_than_a_screen():
    long = long_functions(ROOT)
    assert not long, f"functions over {MAX_LINES} lines (split them along their steps):\n" + "\n".join(long)


def test_no_import_circle():
    cycles = import_cycles(ROOT)
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_core_never_imports_a_stage():
    bad = [f"{m} imports {t}" for m, ts in import_graph(ROOT).items() if m.split(".")[0] in CORE
           for t in ts if t.split(".")[0] in STAGES]
    assert not bad, "core modules must not import stages:\n" + "\n".join(bad)


def test_the_checks_find_a_long_function_and_a_circle(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from .a import f\n")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from pkg import b\n" + "    x = 1\n" * MAX_LINES)
    (tmp_path / "pkg" / "b.py").write_text("import pkg.a\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("def test():\n" + "    x = 1\n" * 99)  # tests may be long
    assert long_functions(tmp_path) == [f"{Path('pkg/a.py')}:1 f is {MAX_LINES + 2} lines"]
    assert import_cycles(tmp_path) == ["pkg.a -> pkg.b -> pkg.a"]
    graph = import_graph(tmp_path)  # a package importing its own submodules, and they it, is no circle
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
