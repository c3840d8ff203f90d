"""The pure parts of `make bench` (benchmarks/report.py): percentiles, dnsperf parsing, markdown,
README refresh. No root, no processes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import report

DNSPERF = """DNS Performance Testing Tool
[Status] Sending queries (to 127.0.0.1:5300)
> NOERROR api.demo.test A 0.000300
> NXDOMAIN absent.demo.test A 0.000100
> NOERROR many.demo.test A 0.000200
> REFUSED blocked.demo.test A 0.004000
[Status] Testing complete (time limit)

Statistics:

  Queries sent:         5
  Queries completed:    4 (80.00%)
  Queries lost:         1 (20.00%)

  Response codes:       NOERROR 2 (50.00%), NXDOMAIN 1 (25.00%), REFUSED 1 (25.00%)
  Run time (s):         1.000227
  Queries per second:   3.999092

  Average Latency (s):  0.001150 (min 0.000100, max 0.004000)
"""


@pytest.mark.parametrize("values, fraction, expected", [
    ([1.0], 0.5, 1.0),
    ([1.0, 2.0], 0.5, 1.0),
    ([1.0, 2.0, 3.0, 4.0], 0.5, 2.0),
    ([float(i) for i in range(1, 101)], 0.99, 99.0),
    ([float(i) for i in range(1, 1001)], 0.999, 999.0),
    ([float(i) for i in range(1, 11)], 0.999, 10.0),  # fewer values than the rank: the largest
    ([1.0, 2.0, 3.0], 1.0, 3.0),
])
def test_percentile_is_nearest_rank(values: list[float], fraction: float, expected: float) -> None:
    assert report.percentile(values, fraction) == expected


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(report.percentile([], 0.99))


def test_parse_dnsperf_reads_summary_and_per_query_latencies() -> None:
    run = report.parse_dnsperf(DNSPERF)
    assert (run.sent, run.completed, run.lost) == (5, 4, 1)
    assert run.qps == pytest.approx(3.999092)
    assert run.loss == pytest.approx(0.2)
    assert run.p50_ms == pytest.approx(0.2)  # sorted 0.1 0.2 0.3 4.0: the 2nd
    assert run.p99_ms == pytest.approx(4.0)
    assert run.p999_ms == pytest.approx(4.0)
    assert run.rcodes == {"NOERROR": 2, "NXDOMAIN": 1, "REFUSED": 1}


def test_parse_dnsperf_refuses_output_without_a_summary() -> None:
    with pytest.raises(ValueError, match="Queries per second"):
        report.parse_dnsperf("> NOERROR a.test A 0.001\n")


@pytest.mark.parametrize("value, base, expected", [
    (2.0, 1.0, 2.0), (1.0, 0.0, None), (None, 1.0, None), (1.0, None, None), (math.nan, 1.0, None),
])
def test_ratio(value: float | None, base: float | None, expected: float | None) -> None:
    assert report.ratio(value, base) == expected


def _doc() -> dict:
    return {
        "date": "2026-01-01 00:00 UTC", "commit": "abc1234", "command": "make bench",
        "machine": {"cores": 2, "cpu": "Test CPU", "kernel": "6.1.0", "python": "3.11.2"},
        "noise": "Quiet machine.",
        "sections": [
            {"title": "DNS", "text": "Some words.", "headers": ["target", "queries/s", "p99"],
             "rows": [("knot directly", 147173.7, 1.004), ("fqdnproxy", 10625.2, 0.0231)],
             "command": "dnsperf -s 127.0.0.1"},
            {"title": "Only text", "text": "- a line"},
        ],
        "targets": [
            {"name": "q/s vs dnsmasq", "figure": "0.40x", "goal": "≥ 1.0x", "met": False},
            {"name": "decision", "figure": "2 µs", "goal": "≤ 10 µs", "met": True},
            {"name": "RSS", "figure": "–", "goal": "≤ 250 MB", "met": None},
        ],
        "not_done": ["learn: failed (boom)"],
    }


def test_markdown_names_machine_and_command_and_formats_numbers() -> None:
    text = report.render_markdown(_doc())
    assert "`make bench`, on 2 cores (Test CPU), Linux 6.1.0" in text
    assert "Command: `dnsperf -s 127.0.0.1` (2 cores, Linux 6.1.0)" in text
    assert "| target | queries/s | p99 |\n| --- | ---: | ---: |" in text
    assert "| knot directly | 147,174 | 1.00 |" in text
    assert "| fqdnproxy | 10,625 | 0.023 |" in text
    assert "#### Only text\n\n- a line\n" in text


def test_markdown_gives_every_target_a_verdict() -> None:
    text = report.render_markdown(_doc())
    assert "| q/s vs dnsmasq | ≥ 1.0x | 0.40x | MISSED |" in text
    assert "| decision | ≤ 10 µs | 2 µs | met |" in text
    assert "| RSS | ≤ 250 MB | – | not measured |" in text
    assert text.endswith("Not measured in this run: learn: failed (boom).\n")


def test_refresh_readme_replaces_only_between_the_markers() -> None:
    readme = ("# x\n\n## Benchmarks\n\nintro\n\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\n"
              "## Next\n")
    once = report.refresh_readme(readme, "new table\n")
    assert once == ("# x\n\n## Benchmarks\n\nintro\n\n<!-- bench:start -->\nnew table\n"
                    "<!-- bench:end -->\n\n## Next\n")
    assert report.refresh_readme(once, "new table") == once  # idempotent


@pytest.mark.parametrize("readme", [
    "no markers", "<!-- bench:start --> only the start", "<!-- bench:end -->\n<!-- bench:start -->"])
def test_refresh_readme_without_markers_is_an_error(readme: str) -> None:
    with pytest.raises(report.ReadmeMarkersMissing):
        report.refresh_readme(readme, "x")


def test_the_repository_readme_has_the_markers() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert report.refresh_readme(readme, "x").count("<!-- bench:start -->") == 1


def _dns_row(target: str, load: str, qps: float, p99_ms: float) -> dict[str, object]:
    return {"target": target, "load": load, "qps": qps, "lost": 0, "p99_ms": p99_ms}


def test_the_added_p99_is_judged_over_the_lower_of_the_upstreams_runs() -> None:
    """A stall during one of knot's fixed-rate runs raises only that run's tail: the added p99
    is taken over the lower of its runs, never made negative by the stalled one."""
    from benchmarks import run

    rows = [_dns_row("knot directly", "5000 q/s", 5000, 1.78),
            _dns_row("fqdnproxy", "5000 q/s", 5000, 0.517),
            _dns_row("knot directly (again)", "5000 q/s", 5000, 0.046)]
    rows += [_dns_row(t, "full", 1.0, 1.0) for t in ("dnsmasq", "dnsmasq + nftset", "fqdnproxy")]
    judged = {t.name: t for t in run.targets({"dns": {"rows": rows}})}
    p99 = judged["p99 added over knot at 5000 q/s"]
    assert p99.figure == "+0.471 ms (knot's p99: 0.046 ms, the lower of its 2 runs)"
    assert p99.met


def test_throughput_and_learning_targets_name_both_configurations() -> None:
    """With the DNS-workers rows in the run, a target line gives one process's figure and the
    workers' figure, and the verdict is the better one's (a deployment picks dns.workers)."""
    from benchmarks import run

    rows = [_dns_row(t, "5000 q/s", 5000, 0.1)
            for t in ("knot directly", "fqdnproxy", "fqdnproxy, 2 workers")]
    rows += [_dns_row("dnsmasq", "full", 40_000.0, 1.0),
             _dns_row("dnsmasq + nftset", "full", 15_000.0, 1.0),
             _dns_row("fqdnproxy", "full", 16_000.0, 1.0),
             _dns_row("fqdnproxy, 2 workers", "full", 44_000.0, 1.0)]
    learn = {"learned_per_s": 90_000.0, "workers_learned_per_s": 130_000.0, "rss_mb": 171.0,
             "rss_cache_entries": 10**6, "rss_datapath_mb": 210.0, "rss_datapath_entries": 10**6}
    judged = {t.name: t for t in run.targets({"dns": {"rows": rows}, "learn": learn})}
    plain = judged["fqdnproxy q/s vs dnsmasq forwarding, no loss"]
    assert plain.figure == ("1 process: 16,000 q/s = 0.40x, 0 lost; "
                            "2 workers: 44,000 q/s = 1.10x, 0 lost")
    assert plain.met
    assert not judged["fqdnproxy q/s vs dnsmasq + nftset, no loss"].met  # 2.93x at best
    learned = judged["learned (endpoint, IP) entries per second, end to end"]
    assert learned.figure == "1 process: 90,000/s; 2 workers: 130,000/s" and learned.met
    # A run without the workers rows (an older results file) is judged as before.
    single = [r for r in rows if not r["target"].endswith("workers")]
    line = {t.name: t for t in run.targets({"dns": {"rows": single}})}[
        "fqdnproxy q/s vs dnsmasq forwarding, no loss"]
    assert line.figure == "1 process: 16,000 q/s = 0.40x, 0 lost" and not line.met
