"""The Grafana dashboard in ``conf/grafana`` and the names the operator's files use.

* every metric name in every dashboard query and every alert rule is on the ``/metrics``
  of a real ms1 (a subprocess on Redis, sending to ms4-sim), so a metric renamed on
  either side fails here — and a renamed copy shows the check does catch it;
* the dashboard's queries are PromQL promtool accepts, and it has the operator's panels;
* the metric-name extraction itself, and the metrics ms1 added for the alerts
  (``ms1_backlog_drain_seconds``, ``ms1_ms4_ceiling_requests_per_second``,
  ``ms1_pipeline_threads``, ``process_*``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RedisServer, free_port
from opsconf import (
    DASHBOARD,
    RULES,
    PromQLError,
    dashboard_exprs,
    exported_names,
    load_dashboard,
    load_yaml,
    metric_names,
    rule_exprs,
    run_promtool,
    unknown_names,
)
from prometheus_client import generate_latest
from support import service_ini, wait_until

from ms1.ops.metrics import Exporter, ServiceView, pipeline_threads
from ms1.pipeline import samples
from ms1.pipeline.outbound import QueueStats
from ms1.pipeline.sending.breaker import Breaker
from ms1.pipeline.sending.limiter import SlidingWindowLimiter
from ms1.pipeline.sending.pacer import Pacer


def all_exprs(dashboard: dict[str, Any] | None = None,
              rules_text: str | None = None) -> list[tuple[str, str]]:
    """Every PromQL expression of the dashboard and the alert rules, with where it is."""
    rules = load_yaml(rules_text if rules_text is not None else RULES.read_text())
    return dashboard_exprs(dashboard if dashboard is not None else load_dashboard()) \
        + rule_exprs(rules)


# --- the names on a running ms1's /metrics ---------------------------------------------------

def scrape(address: str, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def start_sim(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "ms1_tools.sim", "--port", "0",
                             "--rate-limit", "0", *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ms4-sim listening on "), line
    return proc, line.split()[-1]


@pytest.fixture(scope="module")
def running_metrics(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[str]:
    """The /metrics text of a real ms1 (``python -m ms1.cli``: Redis source, queue and dead
    letters, http transport to ms4-sim) that has delivered invoices, dead-lettered invalid
    e-mails and rejected payloads: every metric it can export is there."""
    client = redis_server.client()
    client.flushall()
    client.close()
    tmp = tmp_path_factory.mktemp("dashboard")
    sim, url = start_sim("--api-key", "k", "--latency", "0.01", "--reject-every", "30")
    address = f"127.0.0.1:{free_port()}"
    config = tmp / "ms1.ini"
    config.write_text(service_ini(redis_server.url, ms4_url=url, settings={
        "ms1": {"shutdown_timeout": 5, "log_format": "json"},
        "metrics": {"address": address},
        "batch": {"max_wait": 0.1},
        "send": {"retry_max": 0.2},
        "redis": {"consumer": "dashboard-test"},
    }))
    env = {**os.environ, "MS1_MS4_API_KEY": "k"}
    data = tmp / "in.jsonl"
    data.write_bytes(b"".join(s.data + b"\n" for s in samples.generate(300, invalid_every=25)))
    enqueued = subprocess.run([sys.executable, "-m", "ms1.cli", "--config", str(config),
                               "enqueue", str(data)], capture_output=True, text=True,
                              timeout=60, env=env, check=False)
    assert enqueued.returncode == 0, enqueued.stderr
    log = tmp / "service.log"
    service = subprocess.Popen([sys.executable, "-m", "ms1.cli", "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=log.open("wb"), env=env)
    try:
        def settled() -> bool:
            text = scrape(address)[1]
            return "ms1_ms4_latency_seconds " in text and "ms1_dead_letters " in text \
                and "ms1_ledger_unreconciled_emails 0" in text \
                and re.search(r"^ms1_emails_read_total 300", text, re.M) is not None \
                and re.search(r"^ms1_queue_ready_batches 0", text, re.M) is not None \
                and re.search(r"^ms1_queue_in_flight_batches 0", text, re.M) is not None

        assert wait_until(settled, 60), log.read_text()[-3000:]
        text = scrape(address)[1]
        yield text
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait(10)
        sim.send_signal(signal.SIGTERM)
        sim.communicate(timeout=30)


@pytest.mark.slow
def test_every_metric_in_the_dashboard_and_the_alerts_is_on_metrics(running_metrics: str
                                                                    ) -> None:
    known = exported_names(running_metrics)
    exprs = all_exprs()
    assert len(exprs) > 40  # every panel's queries, the variables and the rules
    missing = unknown_names(exprs, known)
    assert not missing, "metric names not on ms1's /metrics:\n" + "\n".join(
        f"  {where}: {', '.join(names)}" for where, names in missing.items())
    # the series ms1 itself must export (the rest is Prometheus's own: up)
    used = {name for _, expr in exprs for name in metric_names(expr)}
    assert used - known == {"up"}


@pytest.mark.slow
def test_a_renamed_metric_is_reported(running_metrics: str) -> None:
    known = exported_names(running_metrics)
    # the dashboard renames one: the copy fails, naming the panel and the name
    dashboard = load_dashboard()
    renamed = copy.deepcopy(dashboard)
    drain = next(p for p in renamed["panels"] if p["title"] == "Backlog drain time")
    drain["targets"][0]["expr"] = drain["targets"][0]["expr"].replace(
        "ms1_backlog_drain_seconds", "ms1_backlog_drain_secs")
    missing = unknown_names(dashboard_exprs(renamed), known)
    assert missing == {"panel 'Backlog drain time' A": ["ms1_backlog_drain_secs"]}
    # a counter without its _total, as Prometheus never stores it
    counter = copy.deepcopy(dashboard)
    counter["panels"][6]["targets"][0]["expr"] = "rate(ms1_emails_read[5m])"
    assert list(unknown_names(dashboard_exprs(counter), known).values()) == [["ms1_emails_read"]]
    # an alert rule renames one
    rules = RULES.read_text().replace("expr: ms1_queue_reachable == 0",
                                      "expr: ms1_redis_reachable == 0")
    assert unknown_names(rule_exprs(load_yaml(rules)), known) == {
        "rule 'MS1RedisUnreachable'": ["ms1_redis_reachable"]}
    # ms1 renames one: every panel and rule that uses it is reported
    without = known - {"ms1_dead_letters", "ms1_queue_ready_batches"}
    missing = unknown_names(all_exprs(), without)
    assert "rule 'MS1NoDeliveryWithBacklog'" in missing
    assert missing["panel 'Dead letters kept' A"] == ["ms1_dead_letters"]
    assert {name for names in missing.values() for name in names} == {
        "ms1_dead_letters", "ms1_queue_ready_batches"}


# --- the dashboard itself ----------------------------------------------------------------

def test_the_dashboard_has_the_operators_panels() -> None:
    dashboard = load_dashboard()
    panels = dashboard["panels"]
    titles = {p["title"] for p in panels}
    assert {"E-mails in / invoices delivered per second", "Backlog (batches)",
            "Backlog drain time", "Requests in flight and concurrency target", "MS4 latency",
            "Senders held back, by cause", "MS4 answers: 429 / 401 / 5xx", "Dead letters",
            "Circuit breaker, 401 spell, 429 pause", "Redis reachable",
            "Pipeline threads"} <= titles
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            # every query follows the job and instance pickers
            for selector in re.findall(r"[a-z_:]+\{([^}]*)\}", target["expr"]):
                assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, \
                    (panel["title"], target["expr"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & area, f"{panel['title']!r} overlaps another panel"
        cells |= area
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["includeAll"] and variables["instance"]["multi"]


def test_the_dashboard_queries_are_promql_promtool_accepts(tmp_path: Path) -> None:
    """Each query, Grafana's variables filled in, as a recording rule: promtool parses it."""
    filled = {"$__rate_interval": "1m", "${datasource}": "", "$job": "ms1", "$instance": ".*"}
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for index, (_where, expr) in enumerate(dashboard_exprs(load_dashboard())):
        for variable, value in filled.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        lines += [f"      - record: dashboard:query_{index}", f"        expr: {json.dumps(expr)}"]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text("\n".join(lines) + "\n")
    result = run_promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout


def test_the_dashboard_file_is_what_json_dump_writes() -> None:
    """Plain JSON, two-space indent: Grafana's import and a reviewer's diff read it alike."""
    text = DASHBOARD.read_text()
    assert text == json.dumps(json.loads(text), indent=2) + "\n"


# --- metric names in PromQL ----------------------------------------------------------------

@pytest.mark.parametrize(("expr", "names"), [
    ("ms1_up == 0", ["ms1_up"]),
    ('sum by (cause) (rate(ms1_held_back_seconds_total{cause!="empty_queue"}[5m]))',
     ["ms1_held_back_seconds_total"]),
    ("histogram_quantile(0.99, sum without (instance) (rate(x_bucket[$__rate_interval])))",
     ["x_bucket"]),
    ("a / on (job, instance) group_left (stage) b offset 5m", ["a", "b"]),
    ("a and ignoring (le) b unless c or d > bool 1e3", ["a", "b", "c", "d"]),
    ('{__name__="ms1_dead_letters", job="ms1"} - ms1_dead_letters offset -1h',
     ["ms1_dead_letters"]),
    ('max_over_time(rate(requests_total{job=~"by|sum|rate"}[5m])[1h:1m]) @ end()',
     ["requests_total"]),
    ("topk by (instance) (3, x) + count_values(\"v\", y) + quantile(0.5, z)",
     ["x", "y", "z"]),
    ('label_replace(up{job="ms1"}, "host", "$1", "instance", "(.*):.*")', ["up"]),
    ("sum(x) + Inf - NaN + 0x1f + .5 + time() # comment: y_total", ["x"]),
    ("abs(-recording:rule:rate5m)", ["recording:rule:rate5m"]),
    ("vector(1)", []),
])
def test_metric_names_of_an_expression(expr: str, names: list[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize("expr", [
    "rat(x[5m])",  # a typo: no such function
    "sum(x",  # unbalanced
    '{__name__=~"ms1_.*"}',  # names that cannot be checked
    "x ; y",  # not PromQL
])
def test_what_the_extraction_cannot_read_is_an_error(expr: str) -> None:
    with pytest.raises(PromQLError):
        metric_names(expr)


def test_the_names_a_scrape_stores() -> None:
    text = (
        "# HELP c_total A counter\n# TYPE c_total counter\nc_total 1.0\n"
        "# HELP e_total A counter with no sample yet\n# TYPE e_total counter\n"
        "# HELP h A histogram\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 0.0\nh_sum 0.0\n"
        "h_count 0.0\n"
        "# HELP g A gauge\n# TYPE g gauge\ng 2.0\n"
    )
    names = exported_names(text)
    assert {"c_total", "e_total", "h_bucket", "h_sum", "h_count", "g"} <= names
    assert "c" not in names and "e" not in names and "h" not in names


def test_the_variables_and_the_annotations_are_read() -> None:
    dashboard = {"templating": {"list": [
        {"name": "a", "type": "query", "query": "label_values(ms1_up, job)"},
        {"name": "b", "type": "query", "query": {"query": 'label_values(x{job=~"$a"}, i)'}},
        {"name": "c", "type": "query", "query": "label_values(job)"},
        {"name": "d", "type": "query", "query": "query_result(topk(3, y))"},
        {"name": "e", "type": "datasource", "query": "prometheus"},
    ]}, "annotations": {"list": [{"name": "restarts", "expr": "changes(z[5m]) > 0"}]},
        "panels": [{"title": "row", "type": "row", "panels": [
            {"title": "inner", "targets": [{"refId": "A", "expr": "w"}]}]}]}
    assert [(where, metric_names(expr)) for where, expr in dashboard_exprs(dashboard)] == [
        ("panel 'inner' A", ["w"]), ("variable 'a'", ["ms1_up"]), ("variable 'b'", ["x"]),
        ("variable 'd'", ["y"]), ("annotation 'restarts'", ["z"])]


# --- the metrics the alerts and the dashboard need -----------------------------------------

def test_drain_time_ceiling_and_threads_are_exported() -> None:
    pacer = Pacer(SlidingWindowLimiter(120, 60), Breaker(5, 30))
    exporter = Exporter(ServiceView(
        counters=dict, alive=lambda: True, pacer=pacer,
        queue_stats=lambda: QueueStats(7000, 200, None), dead_letter_count=lambda: 3),
        "127.0.0.1:0")
    stop = threading.Event()
    names = ("reader", "batcher", "committer", "sender-1", "sender-2", "sender-x")
    threads = [threading.Thread(target=stop.wait, name=name, daemon=True) for name in names]
    before = pipeline_threads()
    for thread in threads:
        thread.start()
    try:
        exporter.queue_watch.fresh(1.0)  # one reading (the watch is not started)
        text = generate_latest(exporter.registry).decode()
    finally:
        stop.set()
        exporter.close()
    # 7,200 batches at MS4's 120 requests a minute, one request per batch: an hour
    assert "ms1_backlog_drain_seconds 3600.0" in text
    assert "ms1_ms4_ceiling_requests_per_second 2.0" in text
    for stage, more in (("reader", 1), ("batcher", 1), ("committer", 1), ("sender", 2)):
        assert f'ms1_pipeline_threads{{stage="{stage}"}} {before[stage] + more:.1f}' in text
    assert re.search(r"^process_start_time_seconds \d", text, re.M)
    assert re.search(r"^process_open_fds \d", text, re.M)


def test_no_queue_reading_no_drain_time() -> None:
    def unreachable() -> QueueStats:
        raise OSError("down")

    exporter = Exporter(ServiceView(
        counters=dict, alive=lambda: True, pacer=Pacer(SlidingWindowLimiter(120, 60),
                                                       Breaker(5, 30)),
        queue_stats=unreachable, dead_letter_count=lambda: 0), "127.0.0.1:0")
    try:
        text = generate_latest(exporter.registry).decode()
    finally:
        exporter.close()
    assert "ms1_backlog_drain_seconds" not in text
    assert "ms1_ms4_ceiling_requests_per_second 2.0" in text


def test_rejected_field_labels_are_bounded() -> None:
    """Issue 22: the field label came from sender-controlled text (a duplicate key's path
    names any key the e-mail holds): 500 distinct keys made 500 label values. Now indexes
    are folded and at most REJECTED_LABELS pairs exist; the rest count as "other"."""
    from ms1.model import DeadLetter
    from ms1.ops.metrics import REJECTED_LABELS

    pacer = Pacer(SlidingWindowLimiter(120, 60), Breaker(5, 30))
    exporter = Exporter(ServiceView(
        counters=dict, alive=lambda: True, pacer=pacer,
        queue_stats=lambda: QueueStats(0, 0, None), dead_letter_count=lambda: 0),
        "127.0.0.1:0")
    try:
        for n in range(500):
            exporter.ms1_payload_rejected(DeadLetter(
                reason=f"raw_json.attacker_key_{n}: duplicate key", stage="processor",
                payload=b"{}"))
            exporter.ms1_payload_rejected(DeadLetter(
                reason=f"raw_json.line_items[{n}].quantity: not a number", stage="processor",
                payload=b"{}"))
        text = generate_latest(exporter.registry).decode()
    finally:
        exporter.close()
    labels = re.findall(r'^ms1_payloads_rejected_total\{(.*)\} ', text, re.M)
    assert len(labels) <= REJECTED_LABELS + 1
    assert any('field="raw_json.line_items[].quantity"' in label for label in labels)
    total = sum(float(v) for v in re.findall(r"^ms1_payloads_rejected_total\{.*\} (\S+)",
                                             text, re.M))
    assert total == 1000  # none lost to the bound
    assert any('field="other"' in label for label in labels)
    assert re.search(r'^ms1_build_info\{python="[0-9.]+",version="[^"]+"\} 1\.0$', text, re.M)
