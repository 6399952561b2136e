"""Issue 21: TLS that can be configured from the INI alone, against real TLS servers.

* MS4 behind nginx (Debian's) terminating TLS with a private CA and requiring a client
  certificate (``ssl_verify_client on``), in front of ms4-sim: ``[transport.http]
  ca_file``, ``client_cert_file``, ``client_key_file``; a wrong CA, or no client
  certificate, stops the senders as a configuration error naming the option and file;
* Redis with ``--tls-port`` and ``--tls-auth-clients yes``: ``[redis] ca_file``,
  ``client_cert_file``, ``client_key_file`` with a ``rediss://`` URL.

Before: no such options; a private CA could only be trusted by changing the system's
store, and a client certificate not at all. The certificates are made here with the
``openssl`` command (a CA, a second CA that signed nothing of ours, a server certificate
for 127.0.0.1 and localhost, a client certificate)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from support import ini, wait_until
from test_redis_durability import start_sim

from ms1.pipeline import samples
from ms1_tools import fronts

pytestmark = [pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl"),
              pytest.mark.slow]  # subprocesses and real servers: not in the floors' unit run


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def certificate(pki: Path, name: str, ca: str, *, server: bool) -> None:
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=pki)
    extensions = pki / f"{name}.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n" if server
                          else "extendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile",
            str(extensions), cwd=pki)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pki = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
                "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN=ms1 test {ca}", cwd=pki)
    certificate(pki, "server", "ca", server=True)
    certificate(pki, "client", "ca", server=False)
    return pki


def wait_listening(port: int, timeout: float = 20) -> bool:
    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False
    return wait_until(up, timeout)


@pytest.fixture
def https_ms4(pki: Path, tmp_path: Path, procs: list[Any]) -> Iterator[tuple[str, Any]]:
    """nginx on a free port, TLS with the private CA's server certificate, a client
    certificate from that CA required, proxying to an ms4-sim: (its URL, the sim)."""
    if shutil.which("nginx") is None:
        pytest.fail("nginx is not installed (apt-get install -y nginx-light)")
    sim = start_sim(procs, tmp_path)
    upstream = sim.url.removeprefix("http://")
    port = free_port()
    folder = tmp_path / "nginx"
    folder.mkdir()
    (folder / "nginx.conf").write_text(f"""{fronts.nginx_process(folder, errors="info",
                                                             connections=256)}http {{
  access_log off;
{fronts.nginx_temp_paths(folder)}
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {pki}/server.crt;
    ssl_certificate_key {pki}/server.key;
    ssl_client_certificate {pki}/ca.crt;
    ssl_verify_client on;
    location / {{ proxy_pass http://{upstream}; proxy_http_version 1.1;
                 proxy_set_header Connection ""; }}
  }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(folder / "nginx.conf"), "-p", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(proc)
    assert wait_listening(port), (folder / "error.log").read_text()
    yield f"https://127.0.0.1:{port}", sim


def once_config(tmp_path: Path, base_url: str, once_timeout: float = 20, **tls: str) -> Path:
    config = tmp_path / "ms1.ini"
    config.write_text(ini({
        "source": {"name": "files"}, "queue": {"backend": "memory"},
        "dead_letters": {"backend": "jsonl"},
        "dead_letters.jsonl": {"path": tmp_path / "dead.jsonl"},
        "batch": {"max_wait": 0.05}, "ms1": {"once_timeout": once_timeout, "log_format": "text"},
        "send": {"requests_per_minute": 100_000, "breaker_reset": 30},
        "ms4": {"transport": "http"},
        "transport.http": {"base_url": base_url, **tls}}))
    return config


def emails(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "emails.jsonl"
    samples.write_jsonl(str(path), samples.generate(count, invalid_every=0))
    return path


def run(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ms1.cli", "--config", str(config), *args],
                          env={**os.environ, "MS1_MS4_API_KEY": "durability-test-key"},
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_ms4_over_https_with_a_private_ca_and_a_client_certificate_from_the_ini(
        pki: Path, https_ms4: tuple[str, Any], tmp_path: Path) -> None:
    url, sim = https_ms4
    config = once_config(tmp_path, url, ca_file=str(pki / "ca.crt"),
                         client_cert_file=str(pki / "client.crt"),
                         client_key_file=str(pki / "client.key"))
    result = run(config, "--once", str(emails(tmp_path, 500)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sim.accepted() == 500
    assert "WARNING" not in result.stderr, result.stderr  # verified TLS: nothing to warn of


@pytest.mark.slow
@pytest.mark.parametrize(("tls", "named"), [
    ({"ca_file": "other-ca.crt", "client_cert_file": "client.crt",
      "client_key_file": "client.key"},
     ["not trusted by [transport.http] ca_file", "configuration error"]),
    # nginx completes the handshake and answers 400 "No required SSL certificate was sent"
    # to every request: before, every invoice was split out and dead-lettered with it; now
    # a refusal storm (ms1.pipeline.sending.pacer.Pacer.refusal) stops the senders, keeping them all
    ({"ca_file": "ca.crt"}, ["No required SSL certificate was sent", "naming no invoice"])])
def test_a_refused_certificate_stops_the_senders_naming_it(
        tls: dict[str, str], named: list[str], pki: Path, https_ms4: tuple[str, Any],
        tmp_path: Path) -> None:
    """Not an outage retried forever with a breaker's generic words, nor a dead letter per
    invoice: one CRITICAL naming the cause, every sender stopped, the batches kept."""
    url, sim = https_ms4
    restart = "configuration error" in named  # only a restart ends the stop; else a probe
    config = once_config(tmp_path, url, once_timeout=20 if restart else 6,
                         **{key: str(pki / name) for key, name in tls.items()})
    started = time.monotonic()
    result = run(config, "--once", str(emails(tmp_path, 500)))
    took = time.monotonic() - started
    critical = [line for line in result.stderr.splitlines() if " CRITICAL " in line]
    print("\n" + "\n".join(critical))
    assert result.returncode == 1, result.stderr[-3000:]
    assert len(critical) == 1, result.stderr[-3000:]
    assert all(text in critical[0] for text in named), critical
    assert "All senders stopped" in critical[0]
    assert not (tmp_path / "dead.jsonl").exists() or not (tmp_path / "dead.jsonl").read_text()
    if "ca_file" in tls and "other-ca" in tls["ca_file"]:
        assert str(pki / "other-ca.crt") in critical[0]
    assert sim.accepted() == 0
    if restart:  # --once ends at once (it waited out once_timeout, 20 s)
        assert took < 10, took
        assert "--once ends now: stopped:" in result.stderr
    else:  # a storm is MS4's (its front's): a probe may end it, --once waits for it
        assert took >= 6, took


@pytest.mark.parametrize(("key", "value", "said"), [
    ("ca_file", "missing.crt", "ca_file: cannot load"),
    ("client_cert_file", "ca.key", "client_cert_file: cannot load"),
    ("verify", "no", None)])
def test_tls_files_are_checked_at_start_and_verify_no_is_a_warning(
        key: str, value: str, said: str | None, pki: Path, tmp_path: Path) -> None:
    config = once_config(tmp_path, f"https://127.0.0.1:{free_port()}", once_timeout=2,
                         **{key: str(pki / value) if key != "verify" else value})
    result = run(config, "--once", str(emails(tmp_path, 1)), timeout=60)
    if said is None:
        assert "verify = no" in result.stderr and "WARNING" in result.stderr
        return
    assert result.returncode == 2, result.stderr
    assert said in result.stderr and str(config) in result.stderr
    assert "[transport.http]" in result.stderr


def test_plain_http_to_another_host_is_a_warning(tmp_path: Path) -> None:
    # TEST-NET-1: nothing answers
    config = once_config(tmp_path, "http://192.0.2.1:9", once_timeout=1)
    result = run(config, "--once", str(emails(tmp_path, 1)), timeout=60)
    warned = [line for line in result.stderr.splitlines()
              if "plain http to 192.0.2.1" in line and "WARNING" in line]
    assert len(warned) == 1, result.stderr


# --- Redis over TLS --------------------------------------------------------------------


@pytest.fixture
def tls_redis(pki: Path, tmp_path: Path, procs: list[Any]) -> int:
    """redis-server with only a TLS port, client certificates required."""
    port = free_port()
    data = tmp_path / "redis-tls"
    data.mkdir()
    proc = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(pki / "server.crt"), "--tls-key-file", str(pki / "server.key"),
         "--tls-ca-cert-file", str(pki / "ca.crt"), "--tls-auth-clients", "yes",
         "--dir", str(data), "--save", "", "--appendonly", "yes",
         "--logfile", str(data / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(proc)
    if not wait_listening(port):
        log = (data / "redis.log").read_text() if (data / "redis.log").exists() else ""
        pytest.fail(f"redis-server --tls-port did not start: {log[-2000:]}")
    return port


@pytest.mark.slow
def test_redis_over_tls_with_a_private_ca_and_a_client_certificate_from_the_ini(
        pki: Path, tls_redis: int, tmp_path: Path) -> None:
    config = tmp_path / "ms1.ini"
    settings = {
        "source": {"name": "redis"}, "queue": {"backend": "redis"},
        "dead_letters": {"backend": "redis"}, "ms4": {"transport": "memory"},
        "batch": {"max_wait": 0.05}, "ms1": {"once_timeout": 30},
        "redis": {"url": f"rediss://127.0.0.1:{tls_redis}/0", "block_timeout": 0.2,
                  "ca_file": pki / "ca.crt", "client_cert_file": pki / "client.crt",
                  "client_key_file": pki / "client.key"}}
    config.write_text(ini(settings))
    pushed = run(config, "enqueue", str(emails(tmp_path, 300)))
    assert pushed.returncode == 0 and "enqueued 300 e-mails" in pushed.stdout, pushed.stderr
    status = run(config, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert "300" in json.dumps(json.loads(status.stdout))
    once = run(config, "--once")
    assert once.returncode == 0, once.stderr[-3000:]
    assert "delivered: 6 batches (300 invoices)" in once.stdout, once.stdout
    # without the client certificate Redis refuses the handshake: named, not a hang
    settings["redis"] = {key: value for key, value in settings["redis"].items()
                         if key not in ("client_cert_file", "client_key_file")}
    config.write_text(ini(settings))
    started = time.monotonic()
    refused = run(config, "status")
    assert refused.returncode == 1 and time.monotonic() - started < 30, refused
    assert "[redis] client_cert_file is unset" in refused.stdout, refused.stdout
    # a CA that did not sign Redis's certificate: named
    settings["redis"]["ca_file"] = pki / "other-ca.crt"
    config.write_text(ini(settings))
    untrusted = run(config, "status")
    assert untrusted.returncode == 1
    assert f"not trusted by [redis] ca_file {pki / 'other-ca.crt'}" in untrusted.stdout, \
        untrusted.stdout
    # a CA file that does not exist: a configuration error naming it
    settings["redis"]["ca_file"] = tmp_path / "nope.crt"
    config.write_text(ini(settings))
    missing = run(config, "status")
    assert missing.returncode == 2 and "ca_file: cannot load" in missing.stderr, \
        missing.stderr
