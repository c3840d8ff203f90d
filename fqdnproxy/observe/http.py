"""The metrics address: ``/metrics``, ``/healthz`` and ``/readyz`` from one small HTTP server.

prometheus-client's ``start_http_server`` serves only the exposition, so this module serves all
three itself, from a thread (``http.server``): a scrape reads collectors that walk BPF maps, and
that must never run on the event loop.

- ``/metrics``: the text exposition of the agent's registry (``generate_latest``);
- ``/healthz``: 200 ``ok`` while the process serves HTTP at all (liveness);
- ``/readyz``: 200 once every readiness condition holds (policies loaded, datapath attached,
  cache restored, listeners bound), 503 before, and again from the start of a stop; the body
  lists each condition, so ``curl`` says what is missing.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

# The conditions the agent marks, in the order startup reaches them.
CONDITIONS = ("policies", "datapath", "cache", "listeners")


class Readiness:
    """Named conditions that must all hold before ``/readyz`` answers 200. Thread-safe."""

    def __init__(self, conditions: Iterable[str] = CONDITIONS) -> None:
        self._lock = threading.Lock()
        self._conditions = {name: False for name in conditions}
        self._stopping = False

    def mark(self, *names: str) -> None:
        """Record that ``names`` hold now.

        Raises:
            KeyError: an unknown condition (a typo would otherwise keep the agent unready).
        """
        with self._lock:
            for name in names:
                if name not in self._conditions:
                    raise KeyError(name)
                self._conditions[name] = True

    def stopping(self) -> None:
        """The agent is stopping: not ready any more, whatever held before."""
        with self._lock:
            self._stopping = True

    @property
    def ready(self) -> bool:
        with self._lock:
            return not self._stopping and all(self._conditions.values())

    def describe(self) -> dict[str, bool]:
        """Each condition and whether it holds (plus ``stopping`` once a stop began)."""
        with self._lock:
            out = dict(self._conditions)
            if self._stopping:
                out["stopping"] = True
            return out


class MetricsHttpServer:
    """Serves ``registry`` and ``readiness`` on ``(ip, port)`` from a daemon thread."""

    def __init__(self, ip: str, port: int, registry: CollectorRegistry,
                 readiness: Readiness) -> None:
        """Bind now (port 0: the kernel picks one, see ``address``).

        Raises:
            OSError: the address cannot be bound.
        """
        handler = _handler_class(registry, readiness)
        server_class = _V6Server if ":" in ip else ThreadingHTTPServer
        self._server = server_class((ip, port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http",
                                        kwargs={"poll_interval": 0.2}, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (ip, port)."""
        ip, port = self._server.server_address[:2]
        return str(ip), int(port)

    def start(self) -> MetricsHttpServer:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and close the socket (waits for the request being served)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5.0)
        self._server.server_close()


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _handler_class(registry: CollectorRegistry, readiness: Readiness) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                conditions = readiness.describe()
                ready = readiness.ready
                lines = [f"{'ready' if ready else 'not ready'}"]
                lines += [f"{name}: {'yes' if held else 'no'}" for name, held in conditions.items()]
                self._send(200 if ready else 503, ("\n".join(lines) + "\n").encode())
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8"
                  ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None  # scrapes every few seconds would flood the agent's log

    return Handler
