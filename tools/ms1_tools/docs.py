"""The generated reference pages of ``docs/``: the configuration reference from the option
schema (ms1's options and the built-in plugins'), the metrics reference from what the
metrics exporter yields. ``python -m ms1_tools.docs`` writes them;
``tests/test_docs.py`` fails when the committed pages are stale."""

from __future__ import annotations

import inspect
import sys
import threading
from pathlib import Path

from prometheus_client.registry import CollectorRegistry

from ms1.config import Option, env_name, index_options
from ms1.ops.metrics import Exporter, ServiceView
from ms1.pipeline.outbound import QueueStats
from ms1.pipeline.sending.answers import Answer, Kind
from ms1.pipeline.sending.breaker import Breaker
from ms1.pipeline.sending.concurrency import Controller
from ms1.pipeline.sending.limiter import SlidingWindowLimiter
from ms1.pipeline.sending.pacer import Pacer
from ms1.runtime import pluginmanager

CONFIGURATION = "configuration.md"
METRICS = "metrics.md"
HOOKS = "hooks.md"

HOOKS_HEAD = """# Hooks reference

Generated from `ms1/hookspecs.py` (`python -m ms1_tools.docs`; a test fails when this
page is stale): every hook a plugin may implement, with its signature, whether the first
non-None result wins (`firstresult`: the factory hooks) and its documentation — when it
is called, from which thread, what it gets and returns. How to write and install a
plugin: [Plugins](plugins.md).

"""

CONFIG_HEAD = """# Configuration reference

Generated from the option schema (`python -m ms1_tools.docs`; a test fails when this
page is stale): every option of ms1 and of its built-in plugins, with its default, its
environment variable and whether a reload (SIGHUP) applies it. The rules of the file
itself — comments, the environment, secrets — are in [Operations](operations.md#configuration).

"""

METRICS_HEAD = """# Metrics reference

Generated from what the metrics exporter yields (`python -m ms1_tools.docs`; a test
fails when this page is stale, another when a real service's `/metrics` holds a family
not listed here). Served on `[metrics] address` at `/metrics` (Prometheus text format),
beside `/healthz` and `/readyz`. Counters carry the suffix `_total` on the wire.

"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(option: Option) -> str:
    if option.unset:
        return f"(not set: {option.unset})"
    value = option.default
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "(empty)" if value in ("", None) else str(value)


def configuration(options: list[Option]) -> str:
    """The configuration reference page."""
    lines = [CONFIG_HEAD]
    section = None
    for (sec, key), option in sorted(index_options(options).items()):
        if sec != section:
            lines.append(f"\n## `[{sec}]`\n\n| key | default | reload | meaning |\n"
                         "|---|---|---|---|")
            section = sec
        kind = option.kind + (f" ({', '.join(option.choices)})" if option.choices else "")
        lines.append(f"| `{key}` | {_cell(_default(option))} | "
                     f"{'yes' if option.reloadable else 'restart'} | "
                     f"{_cell(option.help)} ({kind}; `${env_name(sec, key)}`) |")
    return "\n".join(lines) + "\n"


def _full_view() -> tuple[ServiceView, Pacer]:
    """A service view whose every part is present, so every metric family is yielded."""
    pacer = Pacer(SlidingWindowLimiter(120, 60.0, shaping=True), Breaker(5, 30))
    admission = pacer.admit(threading.Event())
    pacer.done(admission, 202, headers={"ratelimit-policy": '"d";q=120;w=60',
                                        "ratelimit": '"d";r=100;t=30'})
    view = ServiceView(
        counters=lambda: {"responses_202": 1}, alive=lambda: True, pacer=pacer,
        queue_stats=lambda: QueueStats(1, 0, 50), dead_letter_count=lambda: 0,
        in_flight=lambda: 0, unreconciled=lambda: 0,
        concurrency=Controller(rate=lambda: 2.0, held_back=lambda: False))
    view.concurrency.observe(Answer(202, Kind.ACCEPTED), 0.05)  # type: ignore[union-attr]
    return view, pacer


def metric_families(registry: CollectorRegistry) -> list[tuple[str, str, str, list[str]]]:
    """(name, type, help, label names) of every family ``registry`` yields, sorted."""
    found: dict[str, tuple[str, str, str, list[str]]] = {}
    for family in registry.collect():
        labels = sorted({name for sample in family.samples for name in sample.labels})
        found[family.name] = (family.name, family.type, family.documentation, labels)
    return [found[name] for name in sorted(found)]


def metrics() -> str:
    """The metrics reference page."""
    view, _ = _full_view()
    exporter = Exporter(view, "127.0.0.1:0")
    try:
        exporter.queue_watch.fresh(1.0)
        families = metric_families(exporter.registry)
    finally:
        exporter.close()
    lines = [METRICS_HEAD, "| metric | type | labels | meaning |", "|---|---|---|---|"]
    for name, kind, help_text, labels in families:
        shown = f"{name}_total" if kind == "counter" else name
        lines.append(f"| `{shown}` | {kind} | {', '.join(f'`{x}`' for x in labels) or '—'} "
                     f"| {_cell(help_text)} |")
    return "\n".join(lines) + "\n"


def hooks() -> str:
    """The hooks reference page, from :mod:`ms1.hookspecs`."""
    from ms1 import hookspecs

    lines = [HOOKS_HEAD]
    for name in sorted(vars(hookspecs)):
        function = getattr(hookspecs, name)
        options = getattr(function, f"{hookspecs.PROJECT}_spec", None)
        if not name.startswith("ms1_") or options is None:
            continue
        signature = inspect.signature(function)
        doc = inspect.getdoc(function) or ""
        first = " (firstresult)" if options.get("firstresult") else ""
        shown = str(signature).replace("'", "")  # the annotations are strings
        lines += [f"## `{name}`{first}", "", "```python", f"def {name}{shown}", "```", "",
                  doc, ""]
    return "\n".join(lines)


def pages() -> dict[str, str]:
    """Every generated page, by file name under ``docs/``."""
    pm = pluginmanager.make_plugin_manager()
    return {CONFIGURATION: configuration(pluginmanager.all_options(pm)), METRICS: metrics(),
            HOOKS: hooks()}


def main(argv: list[str] | None = None) -> int:
    """Write the generated pages to ``docs/`` (or the directory given)."""
    args = sys.argv[1:] if argv is None else argv
    docs = Path(args[0]) if args else Path("docs")
    for name, text in pages().items():
        (docs / name).write_text(text, encoding="utf-8")
        print(f"wrote {docs / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
