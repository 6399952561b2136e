"""A third-party ms1 plugin: a transport that writes batches to a file, a policy, an observer.

Selected from an ms1 config with ``[ms4] transport = example`` and
``[batch] policy = pairs``; configured in its own ``[transport.example]`` section.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

from ms1.api import (
    Batch,
    BatchPolicy,
    Config,
    Option,
    Request,
    Response,
    SizeBatchPolicy,
    Transport,
    hookimpl,
)


class FileTransport(Transport):
    """Appends each request as one JSON line; answers ``status`` (202 by default)."""

    name = "example"

    def __init__(self, path: str, status: int) -> None:
        self._path = path
        self._status = status
        self._lock = threading.Lock()

    def send(self, request: Request) -> Response:
        if self._status == 202:
            line = json.dumps({"path": request.path, "key": request.idempotency_key,
                               "body": json.loads(request.body)})
            with self._lock, open(self._path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        return Response(self._status)


@hookimpl
def ms1_config_options() -> Sequence[Option]:
    return [
        Option("transport.example", "out", "path", "example-out.jsonl", "file to append to"),
        Option("transport.example", "status", "int", 202, "status to answer", min=100, max=599),
    ]


@hookimpl
def ms1_components() -> Sequence[tuple[str, str]]:
    return [("transport", "example"), ("batch_policy", "pairs")]


@hookimpl
def ms1_make_transport(name: str, config: Config) -> Transport | None:
    if name != "example":
        return None
    return FileTransport(config.get_str("transport.example", "out"),
                         config.get_int("transport.example", "status"))


@hookimpl
def ms1_make_batch_policy(name: str, config: Config) -> BatchPolicy | None:
    if name != "pairs":
        return None
    policy = SizeBatchPolicy(max_items=2, max_bytes=config.get_int("batch", "max_bytes"),
                             max_wait=config.get_float("batch", "max_wait"))
    policy.name = "pairs"
    return policy


@hookimpl
def ms1_batch_sent(batch: Batch, status: int, attempt: int, latency: float) -> None:
    print(f"example-plugin saw batch {batch.id} size {len(batch)} status {status}", flush=True)
