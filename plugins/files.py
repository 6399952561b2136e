"""Built-in plugin ``files``: e-mails from files, dead letters to a JSON-lines file.

Source ``files`` reads the ``*.json`` / ``*.jsonl`` files named on the command
line (an unreadable one is reported and skipped; an e-mail over ``[source.files]
max_email_bytes`` is set aside clipped); given none, it generates ``[source.files]
sample_count`` sample e-mails (every ``sample_invalid_every``-th broken on purpose) so a
demo runs as is.
Dead-letter store ``jsonl`` appends to ``[dead_letters.jsonl] path``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ms1.config import Config, Option
from ms1.hookspecs import hookimpl
from ms1.pipeline import samples
from ms1.pipeline.deadletters import DeadLetterStore, JsonlDeadLetters
from ms1.pipeline.source import MAX_EMAIL_BYTES, FileSource, MemorySource, Source

log = logging.getLogger(__name__)


@hookimpl
def ms1_config_options() -> Sequence[Option]:
    return [
        Option("source.files", "sample_count", "int", 500,
               "e-mails generated when no input files are given on the command line",
               min=0, max=10_000_000),
        Option("source.files", "sample_invalid_every", "int", 10,
               "every n-th generated e-mail is invalid on purpose (0: none)",
               min=0, max=10_000_000),
        Option("source.files", "max_email_bytes", "int", MAX_EMAIL_BYTES,
               "largest e-mail read from a file (a *.json file, a *.jsonl line; also by "
               "'enqueue'): a larger one is never read whole but set aside as a dead letter "
               "(stage source) clipped to this size",
               min=1024, max=64 * 1024 * 1024),
        Option("dead_letters.jsonl", "path", "path", "var/dead-letters.jsonl",
               "JSON-lines file the jsonl dead-letter store appends to (relative to the "
               "working directory)"),
    ]


@hookimpl
def ms1_components() -> Sequence[tuple[str, str]]:
    return [("source", "files"), ("dead_letters", "jsonl")]


@hookimpl
def ms1_make_source(name: str, config: Config, inputs: Sequence[str]) -> Source | None:
    if name != "files":
        return None
    if inputs:  # each input's problems are its own (reported, skipped): no config key's
        return FileSource(inputs,
                          max_email_bytes=config.get_int("source.files", "max_email_bytes"))
    count = config.get_int("source.files", "sample_count")
    every = config.get_int("source.files", "sample_invalid_every")
    log.info("no input files given: generating %d sample e-mails (every %s-th invalid)",
             count, every or "no")
    source = MemorySource((s.data for s in samples.generate(count, invalid_every=every)),
                          finite=True)
    source.name = "files (generated samples)"
    return source


@hookimpl
def ms1_make_dead_letters(name: str, config: Config) -> DeadLetterStore | None:
    if name != "jsonl":
        return None
    path = config.get_str("dead_letters.jsonl", "path")
    try:
        return JsonlDeadLetters(path)
    except OSError as exc:
        raise config.error("dead_letters.jsonl", "path",
                           f"cannot open {path!r}: {exc.strerror}") from exc
