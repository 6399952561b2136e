"""The operator's files, shipped in the package: the INI templates, the systemd unit, the
Prometheus alert rules (and their promtool tests) and the Grafana dashboard.

``ms1-service conf list`` names them, ``conf show NAME`` prints one, ``conf write DIR``
writes them all (never over an existing file unless ``--force``). The unit is rendered
for the installation that writes it: ``@MS1_SERVICE@`` becomes the path of this
installation's ``ms1-service``, ``@CONF_DIR@`` the directory written to (``/etc/ms1``
when shown). In a git checkout ``conf/`` is a link to these files.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ms1.errors import Ms1Error

#: the files, by name (their path under the written directory), with what each is
FILES: dict[str, str] = {
    "prod.ini": "the production configuration (Redis source, queue and dead letters)",
    "dev.ini": "a development configuration (files in, MS4 on localhost)",
    "ms1-service.service": "the systemd unit (hardened; ExecStart: this installation)",
    "alerts/ms1.rules.yml": "Prometheus alert rules",
    "alerts/ms1.rules.test.yml": "the alert rules' promtool tests",
    "grafana/ms1-dashboard.json": "the Grafana dashboard",
}
#: the directory ``conf show`` renders the unit for
DEFAULT_DIR = "/etc/ms1"
UNIT = "ms1-service.service"


class UnknownFile(Ms1Error):
    """``conf show NAME`` of a name that is no operator file."""


@dataclass(frozen=True)
class Written:
    """What ``conf write`` did: the files written and those it left as they were."""

    written: tuple[Path, ...]
    kept: tuple[Path, ...]


def service_path() -> str:
    """The ``ms1-service`` of this installation: next to its Python, else on ``PATH``."""
    beside = Path(sys.executable).parent / "ms1-service"
    if beside.exists():
        return str(beside.absolute())
    found = shutil.which("ms1-service")
    return str(Path(found).absolute()) if found else str(beside.absolute())


def read(name: str, directory: str = DEFAULT_DIR) -> str:
    """The text of the operator file ``name`` (the unit rendered for ``directory``)."""
    if name not in FILES:
        raise UnknownFile(f"no operator file {name!r} (files: {', '.join(FILES)})")
    text = resources.files(__name__).joinpath("files", *name.split("/")).read_text(
        encoding="utf-8")
    if name == UNIT:
        text = text.replace("@MS1_SERVICE@", service_path()).replace(
            "@CONF_DIR@", str(Path(directory).absolute()))
    return text


def write(directory: str, force: bool = False) -> Written:
    """Write every operator file under ``directory`` (created if missing); an existing
    file is kept unless ``force``."""
    root = Path(directory)
    written, kept = [], []
    for name in FILES:
        target = root / name
        if target.exists() and not force:
            kept.append(target)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        text = read(name, str(root))
        partial = target.with_name(f".{target.name}.tmp")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, target)
        written.append(target)
    return Written(tuple(written), tuple(kept))
