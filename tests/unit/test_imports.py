"""Every module imports on its own, and the import graph grows no new cycle.

As aiohttp's tests/test_circular_imports.py: each module of nats_adapter, gateway and
tools is imported alone in a fresh process, so a cycle or an import-order bug fails
here rather than only when some entry point happens to import in an unlucky order.
The children are forked from one interpreter that has loaded the third-party
libraries and none of our modules: each child is fresh for our code, and costs
milliseconds instead of the second it takes to import aiohttp and python-socketio.

The graph counts every import statement, lazy ones in functions and those under
``TYPE_CHECKING`` too: a cycle hidden that way still ties the modules together.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("nats_adapter", "gateway", "tools")
#: modules that run a command when imported (``python -m``)
SKIPPED = {"gateway.__main__"}
#: the cycles there are today, each a group of modules that import each other (none:
#: the node core is composed of parts that do not import each other both ways). A
#: cycle that is not inside one of these groups fails the test.
KNOWN_CYCLES: tuple[frozenset[str], ...] = ()


def module_files() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


MODULES = dict(module_files())

# Run in a child interpreter: load the third-party imports of our modules, then fork
# once per module of ours and import it there.
FORKER = r"""
import importlib, json, os, sys, traceback, warnings
third_party, ours = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name in third_party:
    try:
        importlib.import_module(name)
    except Exception:
        pass  # the child imports it, or fails on it, as a fresh interpreter would
assert not [m for m in sys.modules if m.split(".")[0] in ("nats_adapter", "gateway", "tools")]
failures = {}
for name in ours:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="redis")
        try:
            importlib.import_module(name)
            code = 0
        except BaseException:
            os.write(write, traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        error = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failures[name] = error or f"exit status {status}"
print(json.dumps(failures))
"""


def imports_of(name: str, path: Path) -> Iterator[str]:
    """Every module an import statement in ``path`` names, anywhere in it (``from p
    import x`` names ``p.x`` when that is a module of ours, else ``p``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            for alias in node.names:  # a submodule, or a name from ``module`` itself
                sub = f"{module}.{alias.name}"
                yield sub if sub in MODULES else module


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports."""
    return {name: {m for m in imports_of(name, path) if m in MODULES and m != name}
            for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_imports_alone_in_a_fresh_process() -> None:
    third_party = sorted({m for name, path in MODULES.items() for m in imports_of(name, path)
                          if m.split(".")[0] not in (*PACKAGES, "__future__")
                          and not m.startswith(".")})
    ours = sorted(set(MODULES) - SKIPPED)
    assert len(ours) > 60
    proc = subprocess.run([sys.executable, "-c", FORKER, json.dumps(third_party),
                           json.dumps(ours)], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    failures: dict[str, str] = json.loads(proc.stdout.splitlines()[-1])
    assert not failures, "\n\n".join(f"{m}:\n{e}" for m, e in failures.items())


def test_the_import_graph_has_no_new_cycle() -> None:
    new = [sorted(c) for c in cycles(import_graph())
           if not any(c <= known for known in KNOWN_CYCLES)]
    assert not new, f"import cycles: {new}"


def test_the_product_never_imports_the_tools() -> None:
    graph = import_graph()
    product = [m for m in graph if not m.startswith("tools")]
    wrong = {m: sorted(t for t in graph[m] if t.startswith("tools")) for m in product}
    assert not {m: t for m, t in wrong.items() if t}


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [{"a", "b", "c"}]
