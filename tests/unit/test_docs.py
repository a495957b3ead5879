"""The README documents every setting the gateway reads."""

from __future__ import annotations

from gateway.config import describe
from tests.helpers import REPO


def test_readme_names_every_flag_and_variable() -> None:
    readme = (REPO / "README.md").read_text()
    for flag, env, _default, _meaning in describe():
        assert f"`{flag}`" in readme or f"`{flag} " in readme or f"{flag}`" in readme, flag
        assert env in readme, env
