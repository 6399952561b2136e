"""Issue 23: the documentation is a site (``docs/``, mkdocs ``--strict``), the README is
short, and the references are generated: a stale configuration or metrics page fails
here (before, the README's hand-written reference had drifted: ``threads`` "4" while the
service ran adaptive with 64 senders)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_dashboard import running_metrics  # noqa: F401 - the fixture, shared

from ms1_tools import docs

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(docs.pages()))
def test_the_generated_reference_is_current(name: str) -> None:
    committed = (ROOT / "docs" / name).read_text()
    assert committed == docs.pages()[name], \
        f"docs/{name} is stale: run .venv/bin/python -m ms1_tools.docs"


def test_the_configuration_reference_shows_the_running_defaults() -> None:
    """The drift the issue found: the page says what the schema says."""
    page = (ROOT / "docs" / docs.CONFIGURATION).read_text()
    assert "| `threads` | (not set: adaptive concurrency) | yes |" in page
    assert "`$MS1_SEND_REQUESTS_PER_MINUTE`" in page


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs is not None, "mkdocs is in the test extra"
    built = subprocess.run([mkdocs, "build", "--strict", "-d", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    pages = sorted(p.name for p in (tmp_path / "site").rglob("index.html"))
    assert len(pages) >= 6


def test_the_readme_is_short_and_points_into_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    linked = set(re.findall(r"\]\(docs/([a-z-]+\.md)\)", readme))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}
    assert pages <= linked, pages - linked
    assert len(pages) >= 6


@pytest.mark.slow
def test_every_family_a_real_service_exports_is_in_the_metrics_reference(
        running_metrics: str) -> None:  # noqa: F811
    page = (ROOT / "docs" / docs.METRICS).read_text()
    families = set(re.findall(r"^# TYPE (\S+) ", running_metrics, re.M))
    missing = [name for name in sorted(families)  # (a histogram's _created: its own)
               if f"`{name.removesuffix('_created')}`" not in page
               and f"`{name}_total`" not in page]
    assert not missing, missing
