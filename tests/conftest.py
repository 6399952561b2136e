"""Shared fixtures: a real plugin manager (entry points of the installed package) and
config files written to a temp dir."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pluggy
import pytest

from ms1 import pluginmanager
from ms1.config import Config


@pytest.fixture
def pm() -> pluggy.PluginManager:
    return pluginmanager.make_plugin_manager()


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str, name: str = "ms1.ini") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture
def make_config(pm: pluggy.PluginManager, write_config: Callable[[str], Path]
                ) -> Callable[[str], Config]:
    """Load a config from INI text through the full plugin schema."""

    def make(text: str = "") -> Config:
        return pluginmanager.load(pm, str(write_config(text)))

    return make
