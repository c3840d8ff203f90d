"""``make demo`` (explicit mode for now): every scripted answer is as expected."""

from __future__ import annotations

import pytest

from fqdnproxy.lab import demo
from tests.integration.test_knot import _knotd_present
from tests.conftest import require


def test_demo_passes_and_shows_answers_and_audit(capsys: pytest.CaptureFixture[str]) -> None:
    require(_knotd_present(), "knotd not installed (apt package knot; run `make bootstrap`)")
    assert demo.main([]) == 0
    out = capsys.readouterr().out
    assert out.count(" yes") == len(demo.STEPS)
    assert '"name": "api.demo.test."' in out  # the first audit record, in full
    assert "absent.demo.test." in out and "NXDOMAIN" in out
