"""The package's layout keeps the promises of docs/architecture.md: no import cycle between segrt's modules, and no
module over 400 lines without the reason stated in its docstring (a paragraph starting "Size:")."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "segrt"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """segrt modules ``name`` imports (at any depth of the file: lazy imports count too). ``from pkg import sub``
    names the submodule when ``pkg.sub`` is a module, else the package."""
    is_pkg = path.name == "__init__.py"
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.split(".")[0] == "segrt"}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative import
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            if mod.split(".")[0] != "segrt":
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in modules]
            deps |= set(subs) if len(subs) == len(node.names) else {mod, *subs}
    deps.discard(name)
    return {d for d in deps if d in modules}


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    # a package's __init__ importing its own submodules is how packages expose them, not a cycle of concepts
    for m in graph:
        graph[m] = {d for d in graph[m] if not (modules[m].name == "__init__.py" and d.startswith(m + "."))}
    state, stack, cycles = {}, [], []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_large_modules_state_why():
    missing = []
    for name, path in _modules().items():
        text = path.read_text()
        n = text.count("\n")
        if n > MAX_LINES:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "Size:" not in doc:
                missing.append(f"{name} ({n} lines)")
    assert not missing, f"modules over {MAX_LINES} lines without a 'Size:' reason in the docstring: {missing}"


def test_the_checker_finds_a_cycle(tmp_path):
    """The cycle check can fail: two modules importing each other are found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from segrt import b\n")
    b.write_text("import segrt.a\n")
    mods = {"segrt.a": a, "segrt.b": b}
    assert _imports("segrt.a", a, mods) == {"segrt.b"} and _imports("segrt.b", b, mods) == {"segrt.a"}
