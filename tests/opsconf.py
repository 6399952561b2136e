"""The operator's files in ``conf/`` — the Prometheus alert rules and the Grafana
dashboard — as the tests read them: their PromQL expressions, the metric names those
use, and the names a running ms1 exports (:func:`exported_names`), so that a metric
renamed on either side fails a test (:func:`unknown_names`).

The rules and their unit tests are YAML; the project does not depend on PyYAML, so
:func:`load_yaml` reads the plain subset those files are written in (block mappings and
sequences, plain and quoted scalars, ``|`` and ``>`` block scalars, ``[]`` and ``{}``)
and refuses anything else, rather than misread it. promtool reads the same files with a
full YAML parser; ``tests/test_alerts.py`` checks both see the same rules.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).parent.parent
RULES = ROOT / "conf" / "alerts" / "ms1.rules.yml"
RULE_TESTS = ROOT / "conf" / "alerts" / "ms1.rules.test.yml"
DASHBOARD = ROOT / "conf" / "grafana" / "ms1-dashboard.json"

#: series Prometheus makes itself for every target (not on any /metrics)
PROMETHEUS_SERIES = frozenset({
    "up", "scrape_duration_seconds", "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling", "scrape_series_added", "ALERTS",
    "ALERTS_FOR_STATE",
})

# --- PromQL: the metric names an expression uses ----------------------------------------

#: PromQL functions (Prometheus 2.x and 3.x); ``start``/``end`` are the ``@`` modifiers'
FUNCTIONS = frozenset({
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan",
    "atanh", "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "cos", "cosh", "count_over_time", "day_of_month", "day_of_week", "day_of_year",
    "days_in_month", "deg", "delta", "deriv", "double_exponential_smoothing", "exp",
    "floor", "histogram_avg", "histogram_count", "histogram_fraction",
    "histogram_quantile", "histogram_stddev", "histogram_stdvar", "histogram_sum",
    "holt_winters", "hour", "idelta", "increase", "info", "irate", "label_join",
    "label_replace", "last_over_time", "ln", "log10", "log2", "mad_over_time",
    "max_over_time", "min_over_time", "minute", "month", "pi", "predict_linear",
    "present_over_time", "quantile_over_time", "rad", "rate", "resets", "round",
    "scalar", "sgn", "sin", "sinh", "sort", "sort_by_label", "sort_by_label_desc",
    "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan",
    "tanh", "time", "timestamp", "vector", "year", "start", "end"
})
#: aggregation operators (followed by ``(`` or by a ``by``/``without`` clause)
AGGREGATIONS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio"
})
#: keywords followed by a parenthesised list of label names (not metrics)
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
#: other keywords and binary operators spelt as words
KEYWORDS = frozenset({"bool", "and", "or", "unless", "offset", "atan2"})

_TOKEN = re.compile(r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<var>\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\])
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w:]))
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<punct>==|!=|<=|>=|=~|!~|[{}()\[\],=<>+\-*/%^@:])
""", re.VERBOSE)


class PromQLError(ValueError):
    """An expression the name extraction cannot read (or an unknown function)."""


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    pos: int


def _tokens(expr: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise PromQLError(f"cannot read {expr[pos:pos + 20]!r} at {pos} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append(_Token(kind, match.group(), pos))
        pos = match.end()
    return tokens


def _closing(tokens: list[_Token], start: int, expr: str) -> int:
    """Index of the bracket closing the one at ``start``."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack = [pairs[tokens[start].text]]
    for index in range(start + 1, len(tokens)):
        text = tokens[index].text
        if tokens[index].kind != "punct":
            continue
        if text in pairs:
            stack.append(pairs[text])
        elif text in (")", "]", "}"):
            if text != stack.pop():
                raise PromQLError(f"unbalanced {text!r} at {tokens[index].pos} in {expr!r}")
            if not stack:
                return index
    raise PromQLError(f"unclosed {tokens[start].text!r} at {tokens[start].pos} in {expr!r}")


def _balanced(tokens: list[_Token], expr: str) -> None:
    """PromQLError unless every bracket of ``expr`` is closed by its own kind."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack: list[_Token] = []
    for token in tokens:
        if token.kind != "punct":
            continue
        if token.text in pairs:
            stack.append(token)
        elif token.text in (")", "]", "}") and (
                not stack or pairs[stack.pop().text] != token.text):
            raise PromQLError(f"unbalanced {token.text!r} at {token.pos} in {expr!r}")
    if stack:
        raise PromQLError(f"unclosed {stack[-1].text!r} at {stack[-1].pos} in {expr!r}")


def _unquote(text: str) -> str:
    if text.startswith("`"):
        return text[1:-1]
    return str(json.loads('"' + text[1:-1].replace('\\"', '"').replace('"', '\\"') + '"'))


def metric_names(expr: str) -> list[str]:
    """The metric names ``expr`` selects, in order, once each: bare selectors (``x``,
    ``x{...}``, ``x[5m]``) and ``{__name__="x"}``. Function and aggregation names, label
    names (in ``{...}``, ``by``/``without``/``on``/``ignoring``/``group_*`` lists),
    keywords, numbers, durations, strings and Grafana variables (``$x``, ``${x}``,
    ``[[x]]``) are not metrics. An identifier followed by ``(`` that is no PromQL function
    or aggregation raises :class:`PromQLError` (a typo must not pass unnoticed)."""
    tokens = _tokens(expr)
    _balanced(tokens, expr)
    names: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        opens = following is not None and following.text == "("
        if token.text == "{":
            end = _closing(tokens, index, expr)
            inner = tokens[index + 1:end]
            for at, item in enumerate(inner):
                if item.text == "__name__" and at + 2 < len(inner):
                    if inner[at + 1].text != "=" or inner[at + 2].kind != "string":
                        raise PromQLError(f"a __name__ matcher other than = in {expr!r}: "
                                          "its metric names cannot be checked")
                    names.append(_unquote(inner[at + 2].text))
            index = end + 1
            continue
        if token.text == "[":
            index = _closing(tokens, index, expr) + 1  # a range or subquery: durations
            continue
        if token.kind == "ident":
            word = token.text
            if word in LABEL_LISTS:
                index = _closing(tokens, index + 1, expr) + 1 if opens else index + 1
                continue
            if word in KEYWORDS or word.lower() in ("inf", "nan"):
                index += 1
                continue
            if word in AGGREGATIONS and following is not None \
                    and (opens or following.text in ("by", "without")):
                index += 1
                continue
            if opens:
                if word not in FUNCTIONS:
                    raise PromQLError(f"unknown function {word!r} in {expr!r}")
                index += 1
                continue
            names.append(word)
        index += 1
    return list(dict.fromkeys(names))


# --- what a running ms1 exports -----------------------------------------------------------

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
}


def exported_names(metrics_text: str) -> set[str]:
    """Every series name a Prometheus scraping ``metrics_text`` stores: the samples', and
    for each family declared (even one without samples yet) the names its type gives —
    ``x_total`` for a counter ``x`` (never ``x`` itself), ``x_bucket``/``x_sum``/``x_count``
    for a histogram, ``x`` for a gauge."""
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names


# --- the expressions in conf/ -------------------------------------------------------------

def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """``(where, PromQL)`` of every query in a Grafana dashboard: each panel's targets (rows'
    panels too), the template variables' queries (``label_values(selector, label)``,
    ``query_result(expr)``) and the annotation queries."""
    found: list[tuple[str, str]] = []

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((f"panel {panel.get('title')!r} {target.get('refId', '')}",
                              target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        call = re.fullmatch(r"\s*(label_values|query_result)\((.*)\)\s*", text, re.DOTALL)
        if call is None:
            raise PromQLError(f"variable {variable.get('name')!r}: cannot read {text!r}")
        inner = call.group(2)
        if call.group(1) == "label_values":
            selector, comma, _label = inner.rpartition(",")
            inner = selector if comma else ""
        if inner.strip():
            found.append((f"variable {variable.get('name')!r}", inner))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            found.append((f"annotation {annotation.get('name')!r}", annotation["expr"]))
    return found


def rule_exprs(rules: dict[str, Any]) -> list[tuple[str, str]]:
    """``(where, PromQL)`` of every alerting and recording rule in a rules file."""
    return [(f"rule {rule.get('alert') or rule.get('record')!r}", str(rule["expr"]))
            for group in rules["groups"] for rule in group["rules"]]


def unknown_names(exprs: list[tuple[str, str]], known: set[str]) -> dict[str, list[str]]:
    """For each expression using a metric neither in ``known`` nor made by Prometheus
    (:data:`PROMETHEUS_SERIES`): where it is, and those names."""
    missing: dict[str, list[str]] = {}
    for where, expr in exprs:
        unknown = [name for name in metric_names(expr)
                   if name not in known and name not in PROMETHEUS_SERIES]
        if unknown:
            missing[where] = unknown
    return missing


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


# --- a YAML subset (the rules and their tests) ----------------------------------------------

class YamlSubsetError(ValueError):
    """YAML outside the subset :func:`load_yaml` reads."""


_KEY = re.compile(r"(?P<key>[A-Za-z_][\w.-]*|\"[^\"]*\"|'[^']*'):(?:\s+(?P<rest>.*))?$")


def load_yaml(text: str) -> Any:
    """Read the YAML subset of ``conf/alerts`` (see the module's documentation)."""
    lines = [(len(raw) - len(raw.lstrip(" ")), raw.rstrip()) for raw in text.split("\n")]
    for number, (_, raw) in enumerate(lines, 1):
        if "\t" in raw[:len(raw) - len(raw.lstrip())]:
            raise YamlSubsetError(f"line {number}: a tab in the indentation")
    reader = _Reader(lines)
    reader.skip_blank()
    if reader.at_end():
        return None
    value = reader.block(reader.indent())
    reader.skip_blank()
    if not reader.at_end():
        raise YamlSubsetError(f"line {reader.index + 1}: unexpected {reader.text()!r}")
    return value


class _Reader:
    def __init__(self, lines: list[tuple[int, str]]) -> None:
        self.lines = lines
        self.index = 0

    def at_end(self) -> bool:
        return self.index >= len(self.lines)

    def indent(self) -> int:
        return self.lines[self.index][0]

    def text(self) -> str:
        return self.lines[self.index][1].strip()

    def skip_blank(self) -> None:
        while not self.at_end() and (not self.text() or self.text().startswith("#")):
            self.index += 1

    def block(self, indent: int) -> Any:
        if self.text().startswith("- ") or self.text() == "-":
            return self.sequence(indent)
        return self.mapping(indent, {})

    def sequence(self, indent: int) -> list[Any]:
        items: list[Any] = []
        while True:
            self.skip_blank()
            if self.at_end() or self.indent() != indent or not (
                    self.text().startswith("- ") or self.text() == "-"):
                return items
            rest = self.text()[1:].strip()
            if not rest:
                self.index += 1
                self.skip_blank()
                items.append(self.block(self.indent()))
            elif _KEY.match(rest):
                # "- key: value": a mapping whose first line follows the dash
                inner = indent + 2
                self.lines[self.index] = (inner, " " * inner + rest)
                items.append(self.mapping(inner, {}))
            else:
                self.index += 1
                items.append(self.scalar(rest, indent))
            if self.at_end():
                return items

    def mapping(self, indent: int, into: dict[str, Any]) -> dict[str, Any]:
        while True:
            self.skip_blank()
            if self.at_end() or self.indent() < indent:
                return into
            if self.indent() > indent:
                raise YamlSubsetError(f"line {self.index + 1}: unexpected indentation")
            match = _KEY.match(self.text())
            if match is None or self.text().startswith("- "):
                if self.text().startswith("- "):
                    return into  # a sequence at the parent's level
                raise YamlSubsetError(f"line {self.index + 1}: not 'key: value': "
                                      f"{self.text()!r}")
            key = match.group("key")
            if key[0] in "'\"":
                key = key[1:-1]
            if key in into:
                raise YamlSubsetError(f"line {self.index + 1}: key {key!r} twice")
            rest = (match.group("rest") or "").strip()
            self.index += 1
            if not rest or rest.startswith("#"):
                self.skip_blank()
                if self.at_end() or self.indent() < indent or (
                        self.indent() == indent and not self.text().startswith("- ")):
                    into[key] = None
                else:
                    into[key] = self.block(self.indent())
            else:
                into[key] = self.scalar(rest, indent)

    def scalar(self, rest: str, indent: int) -> Any:
        if rest[0] in "|>":
            return self.block_scalar(rest, indent)
        if rest[0] == '"':
            end = _quoted_end(rest, '"')
            value: Any = json.loads(rest[:end + 1])
        elif rest[0] == "'":
            end = _quoted_end(rest, "'")
            value = rest[1:end].replace("''", "'")
        elif rest.startswith("["):
            end = rest.index("]") if "]" in rest else -1
            inner = rest[1:end].strip() if end > 0 else None
            if inner is None:
                raise YamlSubsetError(f"line {self.index}: unclosed flow sequence")
            value = [self.scalar(item.strip(), indent) for item in inner.split(",")] \
                if inner else []
        elif rest.startswith("{"):
            end = rest.index("}") if "}" in rest else -1
            if end < 0 or rest[1:end].strip():
                raise YamlSubsetError(f"line {self.index}: only {{}} is read as a flow "
                                      "mapping")
            value = {}
        else:
            plain = re.split(r"\s+#", rest, maxsplit=1)[0].strip()
            if plain.startswith(("&", "*", "!", "%", "@", "`")) or ": " in plain:
                raise YamlSubsetError(f"line {self.index}: not read: {plain!r}")
            return plain
        tail = rest[end + 1:].strip()
        if tail and not tail.startswith("#"):
            raise YamlSubsetError(f"line {self.index}: text after the value: {tail!r}")
        return value

    def block_scalar(self, header: str, indent: int) -> str:
        style, chomp = header[0], header[1:].split("#")[0].strip()
        if chomp not in ("", "-", "+"):
            raise YamlSubsetError(f"line {self.index}: block scalar header {header!r}")
        body: list[str] = []
        inner: int | None = None
        while not self.at_end():
            width, raw = self.lines[self.index]
            if raw.strip() and width <= indent:
                break
            if raw.strip() and inner is None:
                inner = width
            body.append(raw[inner:] if raw.strip() and inner is not None else "")
            self.index += 1
        while body and not body[-1]:
            body.pop()
        if style == "|":
            text = "\n".join(body)
        else:  # folded: lines joined by a space, an empty line is a newline
            text = ""
            for line in body:
                if line.startswith((" ", "\t")):
                    raise YamlSubsetError(f"line {self.index}: a more indented line in a "
                                          "folded scalar")
                if not line:
                    text += "\n"
                elif text and not text.endswith("\n"):
                    text += " " + line
                else:
                    text += line
        return text if chomp == "-" else text + "\n"


def _quoted_end(rest: str, quote: str) -> int:
    index = 1
    while index < len(rest):
        if quote == '"' and rest[index] == "\\":
            index += 2
            continue
        if rest[index] == quote:
            if quote == "'" and rest[index + 1:index + 2] == "'":
                index += 2
                continue
            return index
        index += 1
    raise YamlSubsetError(f"unclosed quote in {rest!r}")


# --- promtool ---------------------------------------------------------------------------------

def promtool() -> str:
    """Path of ``promtool`` (Debian's ``prometheus`` package). Absent, the test fails saying
    what to install — or is skipped, only when ``MS1_NO_PROMTOOL`` is set."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("MS1_NO_PROMTOOL"):
            pytest.skip("promtool is not installed and MS1_NO_PROMTOOL is set")
        pytest.fail("promtool is not installed: install the prometheus package "
                    "(apt-get install -y prometheus), or set MS1_NO_PROMTOOL=1 to skip the "
                    "tests that need it", pytrace=False)
    return path


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``promtool args...``: its exit status and output (stdout and stderr together)."""
    return subprocess.run([promtool(), *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120, check=False)
