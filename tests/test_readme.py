"""The README's two commands are real: CI runs the test one verbatim; the demo one names
files and options that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    test_command = next(b.strip() for b in sh_blocks(readme) if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_demo_command_uses_the_shipped_config() -> None:
    readme = (ROOT / "README.md").read_text()
    demo = sh_blocks(readme)[0].strip()
    assert demo.startswith(
        "python3 -m venv .venv && .venv/bin/pip install -q -c requirements/lock.txt -e . -e tools "
        "&& ")
    assert "ms4-sim --port 8404 -- .venv/bin/ms1-service --config conf/dev.ini --once" in demo
    assert "127.0.0.1:8404" in (ROOT / "conf" / "dev.ini").read_text()
