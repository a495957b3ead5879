"""No module reads another object's underscore names.

Parts of the node core talk through public methods and narrow protocols; reaching
into another object's ``_name`` ties two modules together behind the reader's back
(as recovery once did with the manager's ``_encode``, ``_dedupe``, ``_ask`` ...).
The scan reads every module of nats_adapter, gateway and tools and fails on
``obj._name`` where ``obj`` is not ``self``, ``cls`` or ``super()`` (dunders are
fine). The only exceptions are third-party internals, in the modules that wrap
them, each checked by a feature probe there.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("nats_adapter", "gateway", "tools")
#: modules allowed to read third-party internals (engine.io, aiohttp, asyncio,
#: python-socketio, nats-py, redis-py), with feature probes where they do
THIRD_PARTY_WRAPPERS = frozenset({
    "nats_adapter/compat.py",
    "nats_adapter/_engineio/connection.py",
    "nats_adapter/_engineio/install.py",
    "nats_adapter/_engineio/polling.py",
    "nats_adapter/_socketio_hooks.py",
    "nats_adapter/brokers/nats.py",
    "nats_adapter/brokers/redis_sharded.py",
})
#: single reads allowed elsewhere: (module, attribute) -> why
ALLOWED: dict[tuple[str, str], str] = {
    ("nats_adapter/brokers/memory.py", "_queue"):
        "one MemoryBroker hands a payload to another's queue (the same class)",
}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_reads(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, expression, attribute) of every ``obj._name`` in ``path`` where ``obj``
    is not self, cls or super()."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            # from m import _name: m's underscore name (`from . import _mod` is a module)
            yield from ((node.lineno, f"from {node.module} import {alias.name}", alias.name)
                        for alias in node.names if is_private(alias.name))
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) \
                and is_private(node.args[1].value) \
                and not (isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls")):
            # getattr(obj, "_name"): the same read, spelt so the attribute check misses it
            yield node.lineno, ast.unparse(node), node.args[1].value
            continue
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not is_private(name):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) \
                and owner.func.id == "super":
            continue
        yield node.lineno, ast.unparse(node), name


def violations() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            module = path.relative_to(REPO).as_posix()
            if module in THIRD_PARTY_WRAPPERS:
                continue
            found += [f"{module}:{line}: {expr}" for line, expr, name in private_reads(path)
                      if (module, name) not in ALLOWED]
    return found


def test_no_module_reads_another_objects_underscore_names() -> None:
    assert not violations()


def test_the_scan_finds_a_private_read(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f(m, self):\n    self._ok = m.__dict__\n    super()._fine()\n"
                      "    return m._encode(1)\n"
                      "from a.b import _detach, public\nfrom . import _module as m\n"
                      "x = getattr(m, '_info', {})\ny = getattr(m, 'public')\n")
    assert sorted((line, expr) for line, expr, _ in private_reads(source)) == [
        (4, "m._encode"), (5, "from a.b import _detach"), (7, "getattr(m, '_info', {})")]
