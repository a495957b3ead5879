"""What the product declares, pins and ships: every library it imports is a declared
dependency with an exact version in constraints.txt; the tools stay out of the wheel
and the image, and the product offers no baseline backend."""

from __future__ import annotations

import argparse
import ast
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from setuptools import find_packages

from gateway import config as cfg
from tests.helpers import REPO

PRODUCT = ("nats_adapter", "gateway")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def requirements(*extras: str) -> list[Requirement]:
    project = PYPROJECT["project"]
    found = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        found += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return found


def pins() -> dict[str, str]:
    """constraints.txt: distribution -> its exact version."""
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            out[canonicalize_name(name)] = version.strip()
    return out


def third_party_imports(packages: tuple[str, ...]) -> set[str]:
    names: set[str] = set()
    for package in packages:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names
            and n not in (*PRODUCT, "tools")}


def test_every_library_the_product_imports_is_declared() -> None:
    # the otel extra: imported only with --otel (tests/unit/test_tracing.py)
    declared = {canonicalize_name(r.name) for r in requirements("otel")}
    distributions = packages_distributions()
    undeclared = {name: distributions.get(name) for name in third_party_imports(PRODUCT)
                  if not {canonicalize_name(d) for d in distributions.get(name, [])} & declared}
    assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"


def test_every_dependency_has_an_exact_pin_within_its_range() -> None:
    pinned = pins()
    for requirement in requirements("test", "bench", "otel"):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} has no pin in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {name}=={pinned[name]}, outside {requirement}"


def test_the_tools_stay_out_of_the_wheel_and_the_image() -> None:
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    packaged = find_packages(str(REPO), include=find["include"])
    assert "gateway" in packaged and "nats_adapter" in packaged
    assert not [p for p in packaged if p.split(".")[0] not in PRODUCT
                or {"bench", "capacity"} & set(p.split("."))], packaged
    dockerfile = (REPO / "infra" / "Dockerfile").read_text()
    copied = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")
              and "--from" not in line]
    assert not [c for c in copied if c.startswith("tools") or c == "."], copied
    assert "tools" in (REPO / ".dockerignore").read_text().split()


def test_the_product_has_no_baseline_backend() -> None:
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser)
    with pytest.raises(cfg.ConfigError, match="--backend"):
        cfg.from_args(parser.parse_args(["--backend", "stock-redis"]), env={})


def test_the_bench_command_says_so_where_the_tools_are_absent(tmp_path: Path) -> None:
    """As in the image: the gateway package without tools/ beside it."""
    shutil.copytree(REPO / "gateway", tmp_path / "gateway",
                    ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "gateway", "bench", "--quick"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "the benchmark is not installed here" in proc.stderr
    assert "Traceback" not in proc.stderr
