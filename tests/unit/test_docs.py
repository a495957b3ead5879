"""The README documents every setting the gateway reads."""

from __future__ import annotations

import re

from gateway.config import describe
from tests.helpers import REPO


def test_readme_names_every_flag_and_variable() -> None:
    readme = (REPO / "README.md").read_text()
    for flag, env, _default, _meaning in describe():
        assert f"`{flag}`" in readme or f"`{flag} " in readme or f"{flag}`" in readme, flag
        assert env in readme, env


def test_readme_architecture_names_exactly_the_library_modules() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("`nats_adapter/`, the library:"):
                     readme.index("`gateway/`, the service:")]
    named = set(re.findall(r"`([A-Za-z_]+\.py)`", section))
    modules = {path.name for path in (REPO / "nats_adapter").rglob("*.py")
               if path.name != "__init__.py"}
    assert named == modules, (f"not in the README: {sorted(modules - named)}; "
                              f"no such module: {sorted(named - modules)}")
