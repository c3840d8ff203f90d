"""The pure half of `make bench`: dnsperf parsing, percentiles, targets, markdown, README refresh.

Nothing here opens a socket or starts a process, so tests/test_bench_harness.py covers it without
root. benchmarks/run.py measures and hands this module plain dicts (the shape of latest.json).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"

# `dnsperf -v` prints one line per answered query: "> NOERROR api.demo.test A 0.000179".
_VERBOSE = re.compile(r"^> (\S+) \S+ \S+ (\d+\.\d+)$", re.MULTILINE)


class ReadmeMarkersMissing(ValueError):
    """The README lacks the bench markers (or has them out of order)."""


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in (0, 1]) of already sorted values; NaN if none.

    Nearest rank, not interpolation: p99.9 of 1,000 latencies is the 999th smallest, a latency
    some query really had.
    """
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True)
class DnsperfRun:
    """What one dnsperf run reports (latencies in ms)."""

    qps: float
    sent: int
    completed: int
    lost: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    rcodes: dict[str, int]

    @property
    def loss(self) -> float:
        """Lost queries as a fraction of those sent."""
        return self.lost / self.sent if self.sent else 0.0


def parse_dnsperf(output: str) -> DnsperfRun:
    """Read the summary and the per-query ``-v`` lines of one dnsperf run.

    Raises:
        ValueError: a summary field is missing (dnsperf failed or changed its format).
    """

    def number(pattern: str) -> float:
        match = re.search(pattern, output)
        if not match:
            raise ValueError(f"dnsperf output lacks {pattern!r}")
        return float(match.group(1))

    latencies = sorted(float(m.group(2)) * 1e3 for m in _VERBOSE.finditer(output))
    rcodes: dict[str, int] = {}
    for m in _VERBOSE.finditer(output):
        rcodes[m.group(1)] = rcodes.get(m.group(1), 0) + 1
    return DnsperfRun(
        qps=number(r"Queries per second:\s+([\d.]+)"),
        sent=int(number(r"Queries sent:\s+(\d+)")),
        completed=int(number(r"Queries completed:\s+(\d+)")),
        lost=int(number(r"Queries lost:\s+(\d+)")),
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        p999_ms=percentile(latencies, 0.999),
        rcodes=rcodes,
    )


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``, None when either is missing or the base is 0."""
    if value is None or base is None or base == 0 or math.isnan(value) or math.isnan(base):
        return None
    return value / base


@dataclass(frozen=True)
class Target:
    """One target of issue 8, item 5, and whether this run met it."""

    name: str
    figure: str  # what was measured, as text ("12,345 q/s = 0.45x dnsmasq")
    goal: str  # the target, as text ("at least 1.0x")
    met: bool | None  # None: not measured in this run

    def verdict(self) -> str:
        """met / MISSED / not measured."""
        return "not measured" if self.met is None else ("met" if self.met else "MISSED")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        digits = 0 if abs(value) >= 100 else (2 if abs(value) >= 1 else 3)
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[bool] | None = None) -> list[str]:
    """A GitHub markdown table; numbers formatted with thousands separators."""
    right = right or [i > 0 for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---:" if r else "---" for r in right) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return lines


def render_markdown(doc: dict[str, Any]) -> str:
    """The whole results page (benchmarks/results/latest.md) from latest.json's document."""
    m = doc["machine"]
    out = [
        f"Run of {doc['date']} (commit {doc['commit']}), `{doc['command']}`, on {m['cores']} cores "
        f"({m['cpu']}), Linux {m['kernel']}, Python {m['python']}. {doc['noise']}",
        "",
    ]
    for section in doc["sections"]:
        out += [f"#### {section['title']}", ""]
        if section.get("text"):
            out += [section["text"], ""]
        if section.get("headers"):
            out += table(section["headers"], section["rows"])
            out.append("")
        if section.get("command"):
            out += [f"Command: `{section['command']}` ({m['cores']} cores, Linux {m['kernel']})", ""]
    out += ["#### Targets (issue 8)", ""]
    out += table(["target", "goal", "this run", "verdict"],
                 [(t["name"], t["goal"], t["figure"], Target(**t).verdict()) for t in doc["targets"]],
                 right=[False, False, False, False])
    if doc.get("not_done"):
        out += ["", "Not measured in this run: " + "; ".join(doc["not_done"]) + "."]
    return "\n".join(out).rstrip() + "\n"


def refresh_readme(readme: str, body: str) -> str:
    """``readme`` with the text between the bench markers replaced by ``body``.

    Raises:
        ReadmeMarkersMissing: either marker is absent, or the end comes first.
    """
    start, end = readme.find(README_START), readme.find(README_END)
    if start < 0 or end < 0 or end < start:
        raise ReadmeMarkersMissing(f"README needs {README_START} ... {README_END}")
    head = readme[: start + len(README_START)]
    return f"{head}\n{body.strip()}\n{readme[end:]}"
