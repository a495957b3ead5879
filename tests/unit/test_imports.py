"""Every module imports on its own, and the import graph grows no new cycle.

As aiohttp's tests/test_circular_imports.py: each module of nats_adapter, gateway and
tools is imported alone in a fresh process, so a cycle or an import-order bug fails
here rather than only when some entry point happens to import in an unlucky order.
The children are forked from one interpreter that has loaded the third-party
libraries and none of our modules: each child is fresh for our code, and costs
milliseconds instead of the second it takes to import aiohttp and python-socketio.
Packages go first: importing ``p.m`` alone runs ``p`` alone first, so where that
already loaded ``p.m`` the two imports are the same, and ``p.m`` needs no child.

The graph counts every import statement, lazy ones in functions and those under
``TYPE_CHECKING`` too: a cycle hidden that way still ties the modules together.
"""

from __future__ import annotations

import ast
import functools
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
ROOTS = ("nats_adapter", "gateway", "tools")  # PACKAGES, in their layers' order
assert not [m for m in sys.modules if m.split(".")[0] in ROOTS]
failures, loaded_by, children = {}, {}, 0


def child(name, write):
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="redis")
    try:
        importlib.import_module(name)
        loaded = [m for m in sys.modules if m.split(".")[0] in ROOTS]
        os.write(write, json.dumps({"loaded": loaded}).encode())
        os._exit(0)
    except BaseException:
        os.write(write, json.dumps({"error": traceback.format_exc()}).encode())
        os._exit(1)


# Root by root (the library, the service, the tools: none imports one after it, see
# test_the_layers_import_downwards_only), wave by wave within a root (packages before
# what is in them), the children of a wave at once. A root whose modules all import
# alone is then loaded here, as any import of the next roots loads it first.
for root in ROOTS:
    mine = [m for m in ours if m.split(".")[0] == root]
    for depth in range(1 + max(m.count(".") for m in mine)):
        wave = {}
        for name in sorted(m for m in mine if m.count(".") == depth):
            parts = name.split(".")
            ancestors = [".".join(parts[:i]) for i in range(1, len(parts))]
            if any(name in loaded_by.get(a, ()) for a in ancestors):
                continue  # an ancestor imported alone loaded it: the same import
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                child(name, write)
            os.close(write)
            wave[name] = (pid, read)
        children += len(wave)
        for name, (pid, read) in wave.items():
            with os.fdopen(read, "rb") as pipe:
                raw = pipe.read().decode()
            _, status = os.waitpid(pid, 0)
            report = json.loads(raw) if raw else {}
            if status != 0:
                failures[name] = report.get("error") or f"exit status {status}"
            else:
                loaded_by[name] = set(report["loaded"])
    if failures:
        break
    importlib.import_module(root)
print(json.dumps({"failures": failures, "children": children}))
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


@functools.cache
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
    result = json.loads(proc.stdout.splitlines()[-1])
    failures: dict[str, str] = result["failures"]
    assert result["children"] >= len(PACKAGES)
    assert not failures, "\n\n".join(f"{m}:\n{e}" for m, e in failures.items())


def test_the_import_graph_has_no_new_cycle() -> None:
    new = [sorted(c) for c in cycles(import_graph())
           if not any(c <= known for known in KNOWN_CYCLES)]
    assert not new, f"import cycles: {new}"


def test_the_layers_import_downwards_only() -> None:
    """The library imports neither the service nor the tools; the service never the
    tools (they are not in the wheel or the image)."""
    graph = import_graph()
    wrong = {m: sorted(t for t in targets
                       if PACKAGES.index(t.split(".")[0]) > PACKAGES.index(m.split(".")[0]))
             for m, targets in graph.items()}
    assert not {m: t for m, t in wrong.items() if t}


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [{"a", "b", "c"}]
