"""/metrics, /healthz and /readyz over loopback HTTP, IPv4 and IPv6."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from fqdnproxy.observe import http as http_mod
from fqdnproxy.observe.metrics import Metrics


def _get(server: http_mod.MetricsHttpServer, path: str) -> tuple[int, str, str]:
    ip, port = server.address
    host = f"[{ip}]" if ":" in ip else ip
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


@pytest.fixture
def served() -> Iterator[tuple[http_mod.MetricsHttpServer, Metrics, http_mod.Readiness]]:
    metrics = Metrics()
    readiness = http_mod.Readiness()
    server = http_mod.MetricsHttpServer("127.0.0.1", 0, metrics.registry, readiness).start()
    yield server, metrics, readiness
    server.close()


def test_metrics_is_the_exposition(served) -> None:  # type: ignore[no-untyped-def]
    server, metrics, _ = served
    metrics.child(metrics.queries, "allowed", "A", "udp").inc(3)
    status, content_type, body = _get(server, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=")
    assert 'fqdnproxy_queries_total{protocol="udp",qtype="A",verdict="allowed"} 3.0' in body


def test_healthz_answers_from_the_start(served) -> None:  # type: ignore[no-untyped-def]
    assert _get(served[0], "/healthz")[::2] == (200, "ok\n")


def test_readyz_waits_for_every_condition_and_drops_at_stop(served) -> None:  # type: ignore[no-untyped-def]
    server, _, readiness = served
    status, _, body = _get(server, "/readyz")
    assert status == 503
    assert body.splitlines() == ["not ready", "policies: no", "datapath: no", "cache: no",
                                 "listeners: no"]
    readiness.mark("policies", "datapath", "cache")
    assert _get(server, "/readyz")[0] == 503
    readiness.mark("listeners")
    status, _, body = _get(server, "/readyz")
    assert status == 200 and body.startswith("ready\n")
    readiness.stopping()
    status, _, body = _get(server, "/readyz")
    assert status == 503 and "stopping: yes" in body


def test_unknown_path_and_condition(served) -> None:  # type: ignore[no-untyped-def]
    server, _, readiness = served
    assert _get(server, "/nope")[0] == 404
    with pytest.raises(KeyError):
        readiness.mark("polices")


def test_ipv6_and_bind_failure() -> None:
    metrics = Metrics()
    server = http_mod.MetricsHttpServer("::1", 0, metrics.registry, http_mod.Readiness()).start()
    try:
        assert _get(server, "/healthz")[0] == 200
        with pytest.raises(OSError):
            http_mod.MetricsHttpServer("::1", server.address[1], metrics.registry,
                                       http_mod.Readiness())
    finally:
        server.close()
