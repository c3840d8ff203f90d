"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fqdnproxy.lab import knot
from tests.conftest import require
from tests.integration.test_knot import _knotd_present


@pytest.fixture(scope="module")
def knot_server() -> Iterator[knot.KnotServer]:
    """knot serving demo.test on 127.0.0.1 (a module may define its own, e.g. with IPv6 too)."""
    require(_knotd_present(), "knotd not installed (apt package knot; run `make bootstrap`)")
    port = knot.free_port(("127.0.0.1",))
    with knot.KnotServer(listen=[("127.0.0.1", port)], workers=1) as server:
        yield server
