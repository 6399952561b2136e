"""Real rate limiters in front of ms4-sim: nginx's ``limit_req`` and HAProxy's
``http_req_rate``, as Debian packages them, each started as its own process with a
config in a temp dir, on loopback.

More: docs/internals.md, ``ms1_tools.fronts``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

KINDS = ("nginx", "haproxy")


def nginx_rate(limit: int, window: float) -> str:
    """``limit`` per ``window`` s as nginx writes a rate (whole requests per second or per
    minute); a ValueError if it has no such form."""
    per_second = Fraction(limit) / Fraction(window).limit_denominator(1000)
    if per_second.denominator == 1:
        return f"{per_second.numerator}r/s"
    per_minute = per_second * 60
    if per_minute.denominator == 1:
        return f"{per_minute.numerator}r/m"
    raise ValueError(f"nginx cannot express {limit} per {window:g} s (whole r/s or r/m)")


def nginx_process(directory: Path, *, errors: str = "warn", connections: int = 1024) -> str:
    """The top of an nginx config for one foreground process whose files all live in
    ``directory`` (as root, ``user root``), up to the ``events`` block."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}daemon off;
master_process off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log {errors};
events {{ worker_connections {connections}; }}
"""


def nginx_temp_paths(directory: Path) -> str:
    """The ``http`` block's temp paths, in ``directory`` (not the packaged defaults)."""
    return "\n".join(f"  {name}_temp_path {directory}/{name};"
                     for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def nginx_config(directory: Path, port: int, upstream: int, limit: int, window: float,
                 burst: int = 0) -> str:
    burst_text = f" burst={burst} nodelay" if burst else ""
    return f"""{nginx_process(directory)}http {{
  log_format ms4 '$status';
  access_log {directory}/access.log ms4;
{nginx_temp_paths(directory)}
  limit_req_zone $binary_remote_addr zone=ms4:1m rate={nginx_rate(limit, window)};
  limit_req_status 429;
  upstream ms4 {{ server 127.0.0.1:{upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 64m;
    keepalive_requests 100000;
    location / {{
      limit_req zone=ms4{burst_text};
      proxy_pass http://ms4;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_read_timeout 120s;
    }}
  }}
}}
"""


def haproxy_config(directory: Path, port: int, upstream: int, limit: int,
                   window: float) -> str:
    period = f"{round(window * 1000)}ms"
    return f"""global
  maxconn 2048
  pidfile {directory}/haproxy.pid
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  timeout http-keep-alive 120s
frontend ms4
  bind 127.0.0.1:{port}
  stick-table type integer size 10 expire {round(window * 2000)}ms store http_req_rate({period})
  http-request track-sc0 int(1)
  http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt {limit} }}
  default_backend sim
backend sim
  http-reuse always
  server sim 127.0.0.1:{upstream}
"""


@dataclass
class Front:
    """A running proxy: its URL, its process and its directory (config, logs)."""

    kind: str
    url: str
    process: subprocess.Popen[bytes]
    directory: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def statuses(self) -> dict[int, int]:
        """How often nginx answered each status (its access log); HAProxy: empty."""
        path = self.directory / "access.log"
        counts: dict[int, int] = {}
        if path.exists():
            for line in path.read_text(errors="replace").split():
                if line.isdigit():
                    counts[int(line)] = counts.get(int(line), 0) + 1
        return counts

    def log(self) -> str:
        path = self.directory / ("error.log" if self.kind == "nginx" else "stderr.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> Front:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def installed(kind: str) -> bool:
    return shutil.which(kind, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") \
        is not None


def start(kind: str, directory: Path, port: int, upstream: int, limit: int, window: float,
          burst: int = 0, timeout: float = 10.0) -> Front:
    """Start ``kind`` (:data:`KINDS`) on ``127.0.0.1:port`` in front of
    ``127.0.0.1:upstream``; returns once it accepts connections."""
    if kind not in KINDS:
        raise ValueError(f"front must be one of {KINDS}, got {kind!r}")
    binary = shutil.which(kind, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if binary is None:
        raise FileNotFoundError(f"{kind} is not installed (Debian package {kind})")
    directory.mkdir(parents=True, exist_ok=True)
    stderr = (directory / "stderr.log").open("wb")
    if kind == "nginx":
        if burst < 0:
            raise ValueError("burst must be >= 0")
        conf = directory / "nginx.conf"
        conf.write_text(nginx_config(directory, port, upstream, limit, window, burst))
        command = [binary, "-c", str(conf), "-p", str(directory)]
    else:
        if burst:
            raise ValueError("HAProxy's http_req_rate has no burst setting")
        conf = directory / "haproxy.cfg"
        conf.write_text(haproxy_config(directory, port, upstream, limit, window))
        command = [binary, "-f", str(conf), "-db"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    stderr.close()
    front = Front(kind, f"http://127.0.0.1:{port}", process, directory)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{kind} exited with {process.returncode}: "
                               f"{(directory / 'stderr.log').read_text(errors='replace')}"
                               f"{front.log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return front
        except OSError:
            if time.monotonic() > deadline:
                front.stop()
                raise RuntimeError(f"{kind} did not listen on {port} within {timeout:g} s: "
                                   f"{front.log()}") from None
            time.sleep(0.02)
